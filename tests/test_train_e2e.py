"""End-to-end runs of the real training script on the tiny SD3 (CPU).

The script's `main` runs in-process so the test can inspect the very pipeline
it trained (a spy on `from_pretrained`, not a fake: the real loader runs).
"""

import os
import signal
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from advantage_weighted_matching.checkpoint import read_metrics
from advantage_weighted_matching.runlock import release_all
from advantage_weighted_matching.scripts import train_sd3_awm as train
from advantage_weighted_matching.stopping import STOP_SIGNALS

TINY_PRESET = os.path.join(os.path.dirname(train.__file__), "..", "config", "tiny_awm.py")


def run_training(save_dir, model_dir, *overrides, preset="tiny_cpu"):
    """Run the training script's main in-process; returns the metrics records."""
    _run_in_process(train.main, save_dir, model_dir, *overrides, preset=preset)
    return read_metrics(save_dir)


def run_cli(save_dir, model_dir, *overrides, preset="tiny_cpu"):
    """The command-line entry (`cli_main`: one message, exit status) in-process; returns the status."""
    try:
        _run_in_process(train.cli_main, save_dir, model_dir, *overrides, preset=preset)
    except SystemExit as exit_:
        return exit_.code
    return 0


def _run_in_process(entry, save_dir, model_dir, *overrides, preset):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = [
        "train_sd3_awm", f"--config={os.path.abspath(TINY_PRESET)}:{preset}", f"--config.save_dir={save_dir}",
        f"--config.pretrained.model={model_dir}", *overrides,
    ]
    saved_argv, sys.argv = sys.argv, argv  # config_flags finds its override flags in sys.argv
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        train.FLAGS.unparse_flags()
        for name in [n for n in train.FLAGS if n.startswith("config.")]:
            delattr(train.FLAGS, name)  # config_flags re-registers the override flags on every parse
        train.FLAGS(argv)
        entry(None)
    finally:  # what the process's end would do: the run dir's lock, pytest's own signal handlers
        sys.argv = saved_argv
        release_all()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture
def pipeline_spy(monkeypatch):
    """Records the pipelines that `StableDiffusion3Pipeline.from_pretrained` returns."""
    from diffusers import StableDiffusion3Pipeline

    loaded = []
    original = StableDiffusion3Pipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        pipeline = original(cls, *args, **kwargs)
        loaded.append(pipeline)
        return pipeline

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", classmethod(spy))
    return loaded


def test_two_epochs_train_lora_only_and_checkpoint_reloads(tmp_path, tiny_sd3_dir, pipeline_spy):
    from diffusers import StableDiffusion3Pipeline

    from advantage_weighted_matching.lora import adapter_parameters

    save_dir = tmp_path / "run"
    metrics = run_training(save_dir, tiny_sd3_dir, "--config.num_epochs=2", "--config.eval_freq=2",
                           "--config.save_freq=1")
    assert [m["epoch"] for m in metrics] == [0, 1]
    for record in metrics:
        for key in ("train/loss", "train/policy_loss", "train/kl_loss", "train/ema_kl_loss", "train/grad_norm"):
            assert torch.isfinite(torch.tensor(record[key])), (key, record)
    assert metrics[-1]["global_step"] == 2  # one optimizer step per epoch
    assert metrics[1]["train/kl_loss"] > 0  # the policy left the base model after step 1
    assert "eval/avg" in metrics[1] and "eval_ema/avg" in metrics[1]
    assert metrics[1]["eval/num_failures"] == 0 and metrics[1]["reward/num_failures"] == 0

    trained = pipeline_spy[0]
    model = trained.transformer  # peft injected the LoRA layers into it in place
    lora_b = [p for n, p in model.named_parameters() if "lora_B.default" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0, "LoRA B starts at 0 and must have moved"

    fresh = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    fresh_state = fresh.transformer.state_dict()
    base_state = {
        name.replace("base_layer.", ""): tensor
        for name, tensor in model.state_dict().items() if "lora_" not in name
    }
    assert set(base_state) == set(fresh_state)
    for name, tensor in fresh_state.items():
        assert torch.equal(base_state[name], tensor), f"base weight {name} changed"

    checkpoints = sorted(os.listdir(save_dir / "checkpoints"))
    assert checkpoints == ["checkpoint-000001", "checkpoint-000002"]
    last = save_dir / "checkpoints" / checkpoints[-1]
    assert sorted(os.listdir(save_dir / "samples"))[:1] and (last / "COMPLETE").exists()

    # The saved policy LoRA reloads through diffusers to the same transformer outputs.
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, 16, generator=generator), timestep=torch.tensor([700.0, 300.0]),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=generator),
        pooled_projections=torch.randn(2, 32, generator=generator),
    )
    with torch.no_grad():
        expected = model(**inputs).sample
        fresh.load_lora_weights(str(last / "lora"))
        reloaded = fresh.transformer(**inputs).sample
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    assert len(adapter_parameters(model, "default")) == len(lora_b) * 2
