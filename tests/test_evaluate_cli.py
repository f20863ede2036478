"""`python -m advantage_weighted_matching.evaluate` on the tiny SD3 (CPU), as a subprocess.

A perturbed LoRA is saved in the trainer's checkpoint layout; the CLI loads it
with diffusers' `load_lora_weights` and must write summary.json / scores.jsonl /
grid.png, reproduce its scores exactly, and differ from the base model.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from advantage_weighted_matching.config import tiny_awm
from advantage_weighted_matching.evaluate import EvaluateError, resolve_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO_ROOT, "advantage_weighted_matching", "config", "tiny_awm.py")


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "advantage_weighted_matching.evaluate", *map(str, args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def tiny_args(model_dir, config=f"{TINY_CONFIG}:tiny_cpu"):
    return [f"--config={config}", f"--config.pretrained.model={model_dir}", "--config.sample.num_eval_images=4"]


def read_outputs(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "scores.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return summary, lines


@pytest.fixture(scope="module")
def run_dir(tiny_sd3_dir, tmp_path_factory):
    """RUN/checkpoints/checkpoint-000002/{lora, COMPLETE}: a LoRA whose B weights are
    perturbed (B starts at zero, which would leave the model unchanged)."""
    from diffusers import SD3Transformer2DModel

    from advantage_weighted_matching.checkpoint import COMPLETE_MARKER
    from advantage_weighted_matching.lora import adapter_parameters, add_lora, lora_config, save_adapter

    config = tiny_awm.tiny_cpu()
    train = config.train
    cfg = lora_config(train.lora_rank, train.lora_alpha, train.lora_init, config.lora_type)
    model = add_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer"), cfg, False)
    generator = torch.Generator().manual_seed(1)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in named.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    assert len(adapter_parameters(model, "default")) > 0
    run = tmp_path_factory.mktemp("run")
    checkpoint = run / "checkpoints" / "checkpoint-000002"
    save_adapter(model, "default", str(checkpoint / "lora"), cfg)
    (checkpoint / COMPLETE_MARKER).write_text("ok\n")
    return run


def test_resolve_checkpoint_forms(run_dir, tmp_path):
    checkpoint = str(run_dir / "checkpoints" / "checkpoint-000002")
    lora = os.path.join(checkpoint, "lora")
    assert resolve_checkpoint("none") == (None, None)
    assert resolve_checkpoint(checkpoint) == (checkpoint, lora)
    assert resolve_checkpoint(str(run_dir)) == (checkpoint, lora)  # latest complete checkpoint
    assert resolve_checkpoint(lora) == (lora, lora)  # a LoRA dir directly
    with pytest.raises(EvaluateError, match="ema_lora"):
        resolve_checkpoint(checkpoint, "ema_lora")  # this run had no weight-EMA
    with pytest.raises(EvaluateError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(EvaluateError, match="neither"):
        resolve_checkpoint(str(tmp_path))


def test_jpeg_lora_vs_base_deterministic(tiny_sd3_dir, run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "checkpoint-000002"
    runs = {
        "ckpt": (checkpoint, None),  # default output: {checkpoint}/eval_test
        "lora_dir": (checkpoint / "lora", tmp_path / "again"),  # same LoRA, given directly
        "base": ("none", tmp_path / "base"),
    }
    results = {}
    for name, (path, out) in runs.items():
        args = ["--checkpoint", path, *tiny_args(tiny_sd3_dir)] + (["--output", out] if out else [])
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = out or checkpoint / "eval_test"
        summary, lines = read_outputs(out)
        assert summary["num_images"] == 4 and len(lines) == 4 and summary["num_reward_failures"] == 0
        assert summary["eval_num_steps"] == 6 and summary["split"] == "test" and summary["preset"] == "tiny_cpu"
        assert summary["config"].endswith("tiny_awm.py:tiny_cpu") and summary["dtype"] == "float32"
        assert set(summary["rewards"]) == {"avg", "jpeg_compressibility"}
        for key in ("avg", "jpeg_compressibility"):
            assert summary["rewards"][key] == pytest.approx(np.mean([line[key] for line in lines]), abs=1e-12)
        assert all(set(line) == {"index", "prompt", "avg", "jpeg_compressibility"} for line in lines)
        with Image.open(out / "grid.png") as grid:
            grid.load()
            assert grid.size[0] > 0
        assert '"num_images": 4' in proc.stdout  # the summary is printed
        results[name] = (summary, [line["jpeg_compressibility"] for line in lines])
    assert results["ckpt"][0]["checkpoint"] == str(checkpoint)
    assert results["ckpt"][0]["lora"] == str(checkpoint / "lora")
    assert results["base"][0]["checkpoint"] == "none" and results["base"][0]["lora"] is None
    assert results["ckpt"][1] == results["lora_dir"][1]  # deterministic, bit for bit
    assert results["ckpt"][1] != results["base"][1]  # the LoRA was applied


def test_ocr_reward_from_config_file(tiny_sd3_dir, tmp_path):
    dataset = tmp_path / "ocr_prompts"
    dataset.mkdir()
    (dataset / "train.txt").write_text('a sign that says "hello"\na mug printed with "coffee"\n')
    (dataset / "test.txt").write_text('a sign that says "open"\na poster reading "sale today"\n'
                                      'a shirt with "AWM" on it\n')
    config_file = tmp_path / "ocr_tiny.py"
    config_file.write_text(textwrap.dedent(f"""
        import ml_collections

        from advantage_weighted_matching.config import tiny_awm


        def get_config(name):
            config = tiny_awm.tiny_cpu()
            config.run_name = name
            config.reward_fn = ml_collections.ConfigDict({{"ocr": 1.0}})
            config.dataset = {str(dataset)!r}
            return config
    """))
    out = tmp_path / "out"
    proc = run_cli("--checkpoint", "none", "--output", out, *tiny_args(tiny_sd3_dir, f"{config_file}:ocr_tiny"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, lines = read_outputs(out)
    assert summary["num_images"] == 3 and summary["preset"] == "ocr_tiny"  # num_eval_images 4 > 3 prompts
    assert set(summary["rewards"]) == {"avg", "ocr"}
    assert [line["prompt"] for line in lines] == (dataset / "test.txt").read_text().splitlines()
    for line in lines:
        assert 0.0 <= line["ocr"] <= 1.0 and line["avg"] == pytest.approx(line["ocr"])
    assert summary["rewards"]["ocr"] == pytest.approx(np.mean([line["ocr"] for line in lines]))
    assert summary["rewards"]["ocr"] < 0.5  # the tiny random model draws noise, not text
    assert (out / "grid.png").is_file()


def test_bad_input_fails_before_models(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    model = tmp_path / "no_such_model"
    proc = run_cli("--checkpoint", missing, f"--config={TINY_CONFIG}:tiny_cpu",
                   f"--config.pretrained.model={model}")  # tiny_seed 0: a model load would build it there
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "no_such_model" not in proc.stderr  # no model load was tried
    assert not model.exists()

    proc = run_cli("--checkpoint", "none", f"--config={TINY_CONFIG}:tiny_cpu", "--config.sample.no_such_key=3")
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr


def test_preset_process_count_read_from_the_preset_module():
    from advantage_weighted_matching.evaluate import _preset_num_processes

    assert _preset_num_processes("advantage_weighted_matching/config/dgx_awm.py:geneval_sd3_no_cfg_4nodes") == 32
    assert _preset_num_processes("advantage_weighted_matching/config/dgx_awm.py:ocr_sd3_no_cfg_1node") == 8
    assert _preset_num_processes("advantage_weighted_matching/config/tiny_awm.py:tiny_cpu") == 1  # no table: 1
