"""The whole AWM loop on a tiny random FLUX.1-dev-shaped pipeline (issue K): rollouts through
the FLUX backbone, AWM loss with KL and KL-EMA, checkpoints that `FluxPipeline.load_lora_weights`
reads back, exact resume, and the evaluate CLI. Same code as SD3 except the backbone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_e2e import run_training  # noqa: E402

from advantage_weighted_matching.checkpoint import read_metrics  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ("--config.eval_freq=0", "--config.log_image_freq=0")


def _flux(save_dir, model_dir, *overrides):
    return run_training(save_dir, model_dir, *QUIET, *overrides, preset="tiny_cpu_flux")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_flux_dir):
    save_dir = tmp_path_factory.mktemp("flux") / "straight"
    return save_dir, _flux(save_dir, tiny_flux_dir, "--config.num_epochs=2", "--config.save_freq=1")


def _lora(path):
    from safetensors.torch import load_file

    return load_file(str(path / "pytorch_lora_weights.safetensors"))


def test_flux_loop_trains_with_kl_terms(straight_run):
    _, metrics = straight_run
    assert [m["global_step"] for m in metrics] == [1, 2]
    for record in metrics:
        for key in ("train/loss", "train/policy_loss", "train/kl_loss", "train/ema_kl_loss", "train/grad_norm"):
            assert torch.isfinite(torch.tensor(record[key])), (key, record)
    assert metrics[1]["train/kl_loss"] > 0 and metrics[1]["train/ema_kl_loss"] > 0


def test_flux_lora_loads_with_flux_pipeline(straight_run, tiny_flux_dir):
    from diffusers import FluxPipeline

    from advantage_weighted_matching.backbones import Flux
    from advantage_weighted_matching.lora import add_lora, load_adapter, lora_config

    save_dir, _ = straight_run
    last = save_dir / "checkpoints" / "checkpoint-000002"
    saved = _lora(last / "lora")
    assert saved and max(t.abs().max().item() for k, t in saved.items() if "lora_B" in k) > 0
    # FluxPipeline.load_lora_weights vs the trainer's own adapter loader: same transformer outputs
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    pipe.load_lora_weights(str(last / "lora"))
    ours = add_lora(FluxPipeline.from_pretrained(str(tiny_flux_dir)).transformer,
                    lora_config(4, 8, "gaussian", "attn", Flux), False)
    load_adapter(ours, str(last / "lora"), "default")
    embeds, pooled = Flux.encode_prompts(pipe, ["a cat"], "cpu", max_sequence_length=32)
    x = Flux.initial_noise(pipe, 1, 32, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_diffusers = Flux.velocity(pipe.transformer, x, 0.6, embeds, pooled, guidance_scale=3.5)
        via_trainer = Flux.velocity(ours.get_base_model(), x, 0.6, embeds, pooled, guidance_scale=3.5)
        pipe.unload_lora_weights()
        base = Flux.velocity(pipe.transformer, x, 0.6, embeds, pooled, guidance_scale=3.5)
    torch.testing.assert_close(via_diffusers, via_trainer, rtol=0, atol=1e-6)
    assert (via_diffusers - base).abs().max() > 1e-6  # the LoRA is applied, not ignored


def test_flux_resume_is_exact(straight_run, tiny_flux_dir, tmp_path):
    straight_dir, straight = straight_run
    resumed_dir = tmp_path / "resumed"
    _flux(resumed_dir, tiny_flux_dir, "--config.num_epochs=1", "--config.save_freq=1")
    _flux(resumed_dir, tiny_flux_dir, "--config.num_epochs=2", "--config.save_freq=1",
          f"--config.resume_from={resumed_dir}")
    resumed = read_metrics(resumed_dir)
    for a, b in zip(straight, resumed):
        for key in ("train/loss", "reward/avg", "train/grad_norm"):
            assert a[key] == b[key], (key, a[key], b[key])
    for name in ("lora", "kl_ema_lora", "ema_lora"):
        want = _lora(straight_dir / "checkpoints" / "checkpoint-000002" / name)
        got = _lora(resumed_dir / "checkpoints" / "checkpoint-000002" / name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)


def test_flux_evaluate_cli(straight_run, tiny_flux_dir, tmp_path):
    save_dir, _ = straight_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "advantage_weighted_matching.evaluate", "--checkpoint", str(save_dir),
         "--config", f"{REPO_ROOT}/advantage_weighted_matching/config/tiny_awm.py:tiny_cpu_flux",
         f"--config.pretrained.model={tiny_flux_dir}", "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 8 and "jpeg_compressibility" in json.dumps(summary)
