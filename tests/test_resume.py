"""Exact resume: SIGKILL or SIGTERM a tiny run, resume it, and match the
uninterrupted run's per-epoch losses, rewards and final LoRA bit for bit (CPU)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from advantage_weighted_matching.checkpoint import list_checkpoints
from test_train_e2e import TINY_PRESET, read_metrics, run_training

NUM_EPOCHS = 6
COMMON = ["--config.eval_freq=0", "--config.log_image_freq=0", "--config.save_freq=1",
          f"--config.num_epochs={NUM_EPOCHS}", "--config.num_checkpoint_limit=3"]
COMPARED = ("train/loss", "train/policy_loss", "train/kl_loss", "train/ema_kl_loss", "train/grad_norm",
            "reward/avg", "advantage/mean_group_std", "global_step")


def start_training(save_dir, model_dir, *overrides):
    script = os.path.join(os.path.dirname(TINY_PRESET), "..", "scripts", "train_sd3_awm.py")
    command = [sys.executable, script, f"--config={os.path.abspath(TINY_PRESET)}:tiny_cpu",
               f"--config.save_dir={save_dir}", f"--config.pretrained.model={model_dir}", *COMMON, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    log = open(os.path.join(os.path.dirname(save_dir), f"{os.path.basename(save_dir)}.log"), "ab")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_checkpoint(process, save_dir, epoch, timeout=120):
    marker = os.path.join(save_dir, "checkpoints", f"checkpoint-{epoch:06d}", "COMPLETE")
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        assert process.poll() is None, f"training exited early with {process.returncode}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def final_lora(save_dir):
    latest = list_checkpoints(os.path.join(save_dir, "checkpoints"))[-1]
    assert latest.endswith(f"checkpoint-{NUM_EPOCHS:06d}")
    return {name: load_file(os.path.join(latest, name, "pytorch_lora_weights.safetensors"))
            for name in ("lora", "ema_lora", "kl_ema_lora")}


def assert_same_run(reference_dir, resumed_dir):
    reference, resumed = read_metrics(reference_dir), read_metrics(resumed_dir)
    assert [r["epoch"] for r in resumed] == list(range(NUM_EPOCHS))
    for expected, got in zip(reference, resumed):
        for key in COMPARED:
            assert got[key] == expected[key], (got["epoch"], key, got[key], expected[key])
    expected_weights, got_weights = final_lora(reference_dir), final_lora(resumed_dir)
    for adapter, tensors in expected_weights.items():
        assert tensors.keys() == got_weights[adapter].keys()
        for key, tensor in tensors.items():
            assert torch.equal(got_weights[adapter][key], tensor), (adapter, key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_sd3_dir):
    save_dir = tmp_path_factory.mktemp("reference") / "run"
    run_training(save_dir, tiny_sd3_dir, *COMMON)
    return save_dir


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_sd3_dir, reference_run):
    save_dir = str(tmp_path / "killed")
    process = start_training(save_dir, tiny_sd3_dir)
    wait_for_checkpoint(process, save_dir, 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    done = len(read_metrics(save_dir))
    assert done < NUM_EPOCHS, "the run finished before it could be killed"

    resumed = start_training(save_dir, tiny_sd3_dir, f"--config.resume_from={save_dir}")
    assert resumed.wait(timeout=180) == 0
    assert_same_run(reference_run, save_dir)
    with open(f"{save_dir}.log") as f:  # the killed run's lock died with it: taken over, and said so
        assert f"taking over from pid {process.pid}" in f.read()


def test_sigterm_saves_then_exits_and_resumes_exactly(tmp_path, tiny_sd3_dir, reference_run):
    save_dir = str(tmp_path / "terminated")
    process = start_training(save_dir, tiny_sd3_dir)
    wait_for_checkpoint(process, save_dir, 1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143  # 128 + SIGTERM: stopped on request, after saving
    saved = list_checkpoints(os.path.join(save_dir, "checkpoints"))
    stopped_at = len(read_metrics(save_dir))
    assert saved[-1].endswith(f"checkpoint-{stopped_at:06d}"), (saved, stopped_at)

    resumed = start_training(save_dir, tiny_sd3_dir, f"--config.resume_from={saved[-1]}")
    assert resumed.wait(timeout=180) == 0
    assert_same_run(reference_run, save_dir)


def test_resume_with_a_different_batch_plan_is_refused(tmp_path, tiny_sd3_dir, reference_run):
    from advantage_weighted_matching.config import ConfigError

    with pytest.raises(ConfigError) as error:
        run_training(tmp_path / "other", tiny_sd3_dir, *COMMON, f"--config.resume_from={reference_run}",
                     "--config.sample.num_batches_per_epoch=4", "--config.train.gradient_accumulation_steps=8",
                     "--config.train.lora_rank=8")
    message = str(error.value)
    for key in ("sample.num_batches_per_epoch", "train.gradient_accumulation_steps", "train.lora_rank"):
        assert key in message
    assert "train.beta" not in message
