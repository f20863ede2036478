"""Value checks through the real training script (issue G.8): the pieces that unit tests of
the math modules cannot see, because they are wired in the script.

* the KL-EMA adapter after an epoch equals d * before + (1 - d) * policy (d by hand);
* off-policy rollouts are sampled with the `ema` adapter: their latents equal a rollout
  re-run with the `ema` adapter switched on through peft's own API, and differ from the
  policy's;
* Flow-GRPO visits every step j < int(N * 0.99) of every sample, in order, and steps the
  optimizer twice per epoch (SPEC 7).

Spies wrap the real functions and call them; nothing is faked.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_e2e import run_training  # noqa: E402

from advantage_weighted_matching.scripts import train_sd3_awm as train  # noqa: E402


def _lora_params(transformer, adapter):
    """{layer name: tensor} of one adapter's LoRA weights, in a fixed order."""
    return {name: p.detach().clone() for name, p in transformer.named_parameters()
            if f".{adapter}." in name and "lora_" in name}


def _set_peft_adapter(transformer, adapter):
    """peft's own per-layer switch (not the trainer's AdapterSwitch)."""
    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(adapter)


@pytest.fixture(scope="module")
def off_policy_run(tmp_path_factory, tiny_sd3_dir):
    """Two epochs off-policy with a constant KL-EMA decay; the rollout spy records, at each
    epoch's first rollout, both adapters and the latents of re-runs under each adapter."""
    from advantage_weighted_matching import rollout as rollout_module
    from advantage_weighted_matching.rollout import ChunkNoise

    records = []
    original = rollout_module.rollout  # the trainer samples through ChunkedRollout, which calls it per chunk
    patch = pytest.MonkeyPatch()

    def spy(pipeline, transformer, embeds, pooled, sigmas, resolution, generator, noise=None, **kwargs):
        result = original(pipeline, transformer, embeds, pooled, sigmas, resolution, generator, noise=noise, **kwargs)
        # one rollout batch per epoch (num_batches_per_epoch=1, chunk = batch): every call is an epoch's first
        rerun = {}
        for adapter in ("ema", "default"):
            _set_peft_adapter(transformer, adapter)
            again = ChunkNoise(noise.pieces)  # the batch keeps its draws: a fresh view replays them
            rerun[adapter] = original(pipeline, transformer, embeds, pooled, sigmas, resolution, generator,
                                      noise=again, **kwargs).latents[-1]
        _set_peft_adapter(transformer, "default")  # the trainer's state: default active and trainable
        records.append({"embeds": embeds, "latents": result.latents[-1], "rerun": rerun,
                        "ema": _lora_params(transformer, "ema"), "default": _lora_params(transformer, "default")})
        return result

    patch.setattr(rollout_module, "rollout", spy)
    try:
        run_training(tmp_path_factory.mktemp("off_policy") / "run", tiny_sd3_dir, "--config.num_epochs=2",
                     "--config.eval_freq=0", "--config.save_freq=0", "--config.log_image_freq=0",
                     "--config.train.off_policy=True", "--config.train.kl_ema_decay_type=constant",
                     "--config.train.kl_ema_decay=0.3", "--config.train.learning_rate=0.05",
                     "--config.sample.num_batches_per_epoch=1")
    finally:
        patch.undo()
    return records


def test_kl_ema_adapter_update_is_d_before_plus_one_minus_d_policy(off_policy_run):
    first, second = off_policy_run  # one rollout batch per epoch: epoch 0, epoch 1
    # constant decay: d = kl_ema_decay = 0.3 whatever the step
    d = 0.3
    assert first["ema"] and {n.replace(".ema.", ".default.") for n in first["ema"]} == set(first["default"])
    for name, before in first["ema"].items():
        policy_after = second["default"][name.replace(".ema.", ".default.")]
        expected = d * before + (1 - d) * policy_after
        torch.testing.assert_close(second["ema"][name], expected, rtol=1e-6, atol=1e-7)
    # the update is not trivial: the policy moved, so d and 1 - d swapped would be far off
    moved = max((second["default"][n.replace(".ema.", ".default.")] - b).abs().max().item()
                for n, b in first["ema"].items())
    assert moved > 1e-3


def test_off_policy_rollouts_use_the_ema_adapter(off_policy_run):
    for record in off_policy_run:
        torch.testing.assert_close(record["latents"], record["rerun"]["ema"], rtol=1e-5, atol=1e-6)
    # at epoch 1 the adapters differ, so the policy would have sampled something else
    second = off_policy_run[1]
    assert (second["rerun"]["default"] - second["rerun"]["ema"]).abs().max().item() > 1e-4


def test_flow_grpo_trains_every_step_of_every_sample_in_order(tmp_path, tiny_sd3_dir, monkeypatch):
    calls, steps = [], []
    original_loss, original_rows = train.flow_grpo_step_loss, train.step_rows

    def rows_spy(latents, log_probs, sigmas, j):
        steps.append(j)
        return original_rows(latents, log_probs, sigmas, j)

    def loss_spy(*args, **kwargs):
        calls.append(args[-1].shape[0])  # advantages [B]: the micro-batch
        return original_loss(*args, **kwargs)

    monkeypatch.setattr(train, "step_rows", rows_spy)
    monkeypatch.setattr(train, "flow_grpo_step_loss", loss_spy)
    metrics = run_training(tmp_path / "run", tiny_sd3_dir, "--config.num_epochs=1", "--config.eval_freq=0",
                           "--config.save_freq=0", "--config.log_image_freq=0", preset="tiny_cpu_flow_grpo")
    # tiny_cpu_flow_grpo: 6 steps, timestep_fraction 0.99 -> steps 0..4; 2 micro-batches of the whole
    # 4-image rollout batch; accumulation 1 micro-batch x 5 steps -> 2 optimizer steps in the epoch
    assert steps == [0, 1, 2, 3, 4] * 2
    assert calls == [4] * 10
    assert metrics[-1]["global_step"] == 2
