"""Resume only from what can be trusted (issue J.4, J.10, J.11), through the real training entry point.

* a corrupt newest checkpoint is skipped, with the file and the reason, for the newest one
  that verifies; an explicit corrupt checkpoint is one error naming the file;
* a resume whose reward, seed or dataset changed is refused before any model loads,
  unless `resume_allow_changes`, which logs the changes and keeps the old config;
* identical runs write byte-identical checkpoints, whatever the process's hash seed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from advantage_weighted_matching.checkpoint import read_json
from advantage_weighted_matching.config import ConfigError
from test_train_e2e import TINY_PRESET, pipeline_spy, read_metrics, run_cli, run_training  # noqa: F401 (fixture)

COMMON = ["--config.eval_freq=0", "--config.log_image_freq=0", "--config.save_freq=1", "--config.num_epochs=2"]
LORA_FILE = os.path.join("lora", "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd3_dir):
    """2 epochs, checkpoints 1 and 2 (the tiny preset keeps two)."""
    save_dir = tmp_path_factory.mktemp("finished") / "run"
    run_training(save_dir, tiny_sd3_dir, *COMMON)
    return save_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_bit(path):  # the last byte of a safetensors file is tensor data, not its header
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_is_skipped_for_the_one_before(run_copy, tiny_sd3_dir, finished_run, caplog):
    newest = run_copy / "checkpoints" / "checkpoint-000002"
    _truncate(newest / LORA_FILE)
    metrics = run_training(run_copy, tiny_sd3_dir, *COMMON[:-1], "--config.num_epochs=3",
                           f"--config.resume_from={run_copy}")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    reference = read_metrics(finished_run)
    for key in ("train/loss", "reward/avg", "global_step"):  # epoch 1 was redone from checkpoint 1, exactly
        assert metrics[1][key] == reference[1][key], key
    skipped = [r.getMessage() for r in caplog.records if "resume: skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert f"resume: skipping checkpoint checkpoint-000002: {newest / LORA_FILE}: " in skipped[0]
    assert "when saved (truncated or overwritten)" in skipped[0]


def test_explicit_corrupt_checkpoint_is_one_error_naming_the_file(run_copy, tiny_sd3_dir, pipeline_spy, capsys):
    newest = run_copy / "checkpoints" / "checkpoint-000002"
    _flip_last_bit(newest / LORA_FILE)
    code = run_cli(run_copy, tiny_sd3_dir, *COMMON, f"--config.resume_from={newest}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("train_sd3_awm:")] == [
        f"train_sd3_awm: {newest / LORA_FILE}: sha256 differs from the one saved (corrupt)"]
    assert pipeline_spy == []


def test_no_checkpoint_verifies_lists_each_reason(run_copy, tiny_sd3_dir, pipeline_spy, capsys):
    root = run_copy / "checkpoints"
    (root / "checkpoint-000002" / "rng_state_0.json").write_text("{not json")
    shutil.rmtree(root / "checkpoint-000001" / "kl_ema_lora")
    code = run_cli(run_copy, tiny_sd3_dir, *COMMON, f"--config.resume_from={run_copy}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"train_sd3_awm: resume_from='{run_copy}': no checkpoint verifies:" in err
    assert f"{root / 'checkpoint-000002' / 'rng_state_0.json'}: " in err
    assert f"{root / 'checkpoint-000001' / 'kl_ema_lora' / 'pytorch_lora_weights.safetensors'}: missing" in err
    assert pipeline_spy == []


def test_a_fresh_run_in_a_run_dir_with_checkpoints_is_refused(run_copy, tiny_sd3_dir, pipeline_spy):
    """Its checkpoints would mix with the old run's, and pruning would keep the old run's newest."""
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=f"run dir {run_copy} already holds checkpoints of a run"):
        run_training(run_copy, tiny_sd3_dir, *COMMON)
    assert pipeline_spy == [] and sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


# ---------------------------------------------------------------- J.10 changed configs


@pytest.mark.parametrize("override, difference", [
    ("--config.seed=7", "seed: checkpoint 42 != now 7"),
    ("--config.reward_fn.jpeg_compressibility=2.0", "reward_fn.jpeg_compressibility: checkpoint 1.0 != now 2.0"),
    ("--config.dataset={other}", "dataset: checkpoint "),
    ("--config.train.learning_rate=0.01", "train.learning_rate: checkpoint 0.001 != now 0.01"),
])
def test_resume_with_a_changed_config_is_refused_before_loading(run_copy, tiny_sd3_dir, pipeline_spy, tmp_path,
                                                               override, difference):
    other = tmp_path / "other_prompts"
    shutil.copytree(Path(read_json(run_copy / "config.json")["dataset"]), other)
    before = (run_copy / "config.json").read_bytes()
    with pytest.raises(ConfigError) as error:
        run_training(run_copy, tiny_sd3_dir, *COMMON, f"--config.resume_from={run_copy}",
                     override.format(other=other))
    message = str(error.value)
    assert difference in message and "--config.resume_allow_changes=true" in message
    assert pipeline_spy == []
    assert (run_copy / "config.json").read_bytes() == before  # the run's config is untouched


def test_resume_allow_changes_logs_them_and_keeps_the_old_config(run_copy, tiny_sd3_dir, caplog):
    metrics = run_training(run_copy, tiny_sd3_dir, *COMMON[:-1], "--config.num_epochs=3", "--config.seed=7",
                           f"--config.resume_from={run_copy}", "--config.resume_allow_changes=true")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    changes = [r.getMessage().split("] ")[-1] for r in caplog.records if "resume with a changed config" in r.getMessage()]
    assert "resume with a changed config: seed: 42 -> 7" in changes
    assert "resume with a changed config: num_epochs: 2 -> 3" in changes
    assert read_json(run_copy / "config.json")["seed"] == 7
    assert read_json(run_copy / "config.previous-1.json")["seed"] == 42


def test_resume_adding_a_kl_ema_adapter_is_refused_before_loading(tmp_path, tiny_sd3_dir, pipeline_spy):
    save_dir = tmp_path / "no_kl_ema"
    run_training(save_dir, tiny_sd3_dir, *COMMON[:-1], "--config.num_epochs=1", "--config.train.ema_beta=0")
    pipeline_spy.clear()
    with pytest.raises(ConfigError, match="the checkpoint has no KL-EMA adapter") as error:
        run_training(save_dir, tiny_sd3_dir, *COMMON[:-1], "--config.num_epochs=2", "--config.train.ema_beta=1.0",
                     f"--config.resume_from={save_dir}", "--config.resume_allow_changes=true")
    assert "train.ema_beta=0.0" in str(error.value) and "train.ema_beta=1.0" in str(error.value)
    assert pipeline_spy == []


# ---------------------------------------------------------------- J.11 byte-identical checkpoints


def test_identical_runs_write_byte_identical_checkpoints(tmp_path, tiny_sd3_dir):
    """Two processes with different string-hash seeds (set order differs between them)."""
    save_dir = tmp_path / "run"
    script = os.path.join(os.path.dirname(TINY_PRESET), "..", "scripts", "train_sd3_awm.py")
    trees = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, script, f"--config={os.path.abspath(TINY_PRESET)}:tiny_cpu", f"--config.save_dir={save_dir}",
             f"--config.pretrained.model={tiny_sd3_dir}", "--config.eval_freq=0", "--config.log_image_freq=0",
             "--config.num_epochs=1"], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        root = save_dir / "checkpoints"
        trees.append({str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
        shutil.rmtree(save_dir)
    assert trees[0].keys() == trees[1].keys() and len(trees[0]) == 8
    different = [name for name in trees[0] if trees[0][name] != trees[1][name]]
    assert different == [], different
    metadata = json.loads(trees[0]["checkpoint-000001/checksums.json"])
    assert "checkpoint-000001/lora/pytorch_lora_weights.safetensors" not in metadata["files"]  # relative paths
    assert "lora/pytorch_lora_weights.safetensors" in metadata["files"]
