"""Issue I execution switches keep the mathematics: rollout chunks, the batched reference forward,
fused AdamW and regional compilation give the same latents, velocities, losses and gradients as
the plain path (tiny SD3, and tiny FLUX where the backbone matters). Their speed is a device
measurement (`benchmarks/throughput.py`)."""

import copy

import pytest
import torch

from advantage_weighted_matching import speed
from advantage_weighted_matching.backbones import SD3, Flux
from advantage_weighted_matching.lora import AdapterSwitch, adapter_parameters, add_lora, lora_config
from advantage_weighted_matching.objective import awm_loss
from advantage_weighted_matching.optim import build_optimizer
from advantage_weighted_matching.rollout import ChunkedRollout, rollout

PROMPTS = [["a red cube", "a cat", "two dogs", "blue sky"], ["the word 'hi'", "a tree", "a boat", "green grass"]]
RES = 32


def _pipeline(backbone, tiny_sd3_dir, tiny_flux_dir):
    return backbone.load_pipeline(str(tiny_sd3_dir if backbone is SD3 else tiny_flux_dir), "main", torch.float32,
                                  "cpu")


def _lora_model(pipeline, backbone, seed=0):
    """The transformer with `default` and `ema` adapters, moved off their init so that
    policy, base model and `ema` all differ."""
    torch.manual_seed(seed)
    model = add_lora(pipeline.transformer, lora_config(4, 8, "gaussian", "attn", backbone), with_ema_adapter=True)
    with torch.no_grad():
        for adapter, scale in (("default", 0.05), ("ema", 0.03)):
            for p in adapter_parameters(model, adapter):
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + len(adapter))))
    return model


# ---------------------------------------------------------------- rollout chunks
def _rollouts(pipeline, chunk, backbone=SD3, **kwargs):
    """Two rollout batches of 4 through ChunkedRollout; [(Rollout, tag)] in order."""
    sigmas = backbone.sigmas(pipeline, 6, RES)
    sampler = ChunkedRollout(pipeline, pipeline.transformer, chunk, sigmas, RES, backbone=backbone, **kwargs)
    done = []
    for i, prompts in enumerate(PROMPTS):
        embeds, pooled = backbone.encode_prompts(pipeline, prompts, "cpu", 16)
        done += sampler.push(embeds, pooled, torch.Generator().manual_seed(10 + i), tag=i, last=i + 1 == len(PROMPTS))
    assert [tag for _, tag in done] == [0, 1]
    return [result for result, _ in done]


def _unchunked(pipeline, backbone=SD3, **kwargs):
    sigmas = backbone.sigmas(pipeline, 6, RES)
    results = []
    for i, prompts in enumerate(PROMPTS):
        embeds, pooled = backbone.encode_prompts(pipeline, prompts, "cpu", 16)
        results.append(rollout(pipeline, pipeline.transformer, embeds, pooled, sigmas, RES,
                               torch.Generator().manual_seed(10 + i), backbone=backbone, **kwargs))
    return results


@pytest.mark.parametrize("solver", ["sa_solver", "sde"])
def test_rollout_chunks_do_not_change_any_image(solver, tiny_pipeline):
    """Chunks of 1, 2, 3, the batch (4) and two batches (8) give every image the same start noise,
    solver draws and result as one unchunked `rollout` per batch. Chunks of the batch size or a
    divisor that keeps the transformer's batch bit-compatible are exact; others differ only by
    float32 rounding of a differently sized matmul (a different draw would differ by O(1))."""
    kwargs = dict(use_sa_solver=True, noise_level=0.4) if solver == "sa_solver" else dict(
        use_sa_solver=False, noise_level=0.7, sde_frac=1.0)
    expected = _unchunked(tiny_pipeline, **kwargs)
    for chunk in (1, 2, 3, 4, 8):
        for got, want in zip(_rollouts(tiny_pipeline, chunk, **kwargs), expected):
            assert len(got.latents) == len(want.latents)
            for x, y in zip(got.latents, want.latents):
                if chunk in (4, 8):  # the batch's own shape, or whole batches side by side
                    assert torch.equal(x, y), chunk
                else:
                    torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.images, want.images, rtol=0, atol=1e-5)


def test_rollout_chunks_flux(tiny_flux_dir):
    pipeline = Flux.load_pipeline(str(tiny_flux_dir), "main", torch.float32, "cpu")
    kwargs = dict(use_sa_solver=True, noise_level=0.4, guidance_scale=3.5)
    expected = _unchunked(pipeline, Flux, **kwargs)
    for chunk in (2, 8):
        for got, want in zip(_rollouts(pipeline, chunk, Flux, **kwargs), expected):
            torch.testing.assert_close(got.latents[-1], want.latents[-1], rtol=0, atol=1e-5)


def test_chunked_rollout_returns_batches_as_they_complete(tiny_pipeline):
    sigmas = SD3.sigmas(tiny_pipeline, 3)
    embeds, pooled = SD3.encode_prompts(tiny_pipeline, PROMPTS[0], "cpu", 16)
    calls = []
    sampler = ChunkedRollout(tiny_pipeline, tiny_pipeline.transformer, 8, sigmas, RES,
                             region=lambda rows: _Record(calls, rows), use_sa_solver=True, noise_level=0.4)
    assert sampler.push(embeds, pooled, torch.Generator().manual_seed(0), tag="a") == []  # 4 of 8 rows queued
    done = sampler.push(embeds, pooled, torch.Generator().manual_seed(1), tag="b")
    assert [tag for _, tag in done] == ["a", "b"] and calls == [8]
    assert done[0][0].images.shape[0] == 4
    sampler = ChunkedRollout(tiny_pipeline, tiny_pipeline.transformer, 8, sigmas, RES, use_sa_solver=True)
    assert [tag for _, tag in sampler.push(embeds, pooled, torch.Generator(), tag="c", last=True)] == ["c"]


class _Record:
    def __init__(self, calls, rows):
        self.calls, self.rows = calls, rows

    def __enter__(self):
        self.calls.append(self.rows)

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- batched reference
@pytest.mark.parametrize("backbone", [SD3, Flux], ids=["sd3", "flux"])
def test_batched_reference_equals_separate_forwards(backbone, tiny_sd3_dir, tiny_flux_dir):
    pipeline = _pipeline(backbone, tiny_sd3_dir, tiny_flux_dir)
    model = _lora_model(pipeline, backbone)
    transformer, adapters = model.get_base_model(), AdapterSwitch(model)
    embeds, pooled = backbone.encode_prompts(pipeline, ["a red cube", "a cat", "a dog"], "cpu", 16)
    x = backbone.initial_noise(pipeline, 3, RES, "cpu", torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.6, 0.9])
    kwargs = dict(guidance_scale=3.5, dtype=torch.float32)
    with torch.no_grad():
        with adapters.disabled():
            v_ref = backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)
        with adapters.use("ema"):
            v_ema = backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)
        v_policy = backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)
        b_ref, b_ema = speed.reference_and_ema_velocity(backbone, transformer, adapters, x, t, embeds, pooled,
                                                        **kwargs)
        after = backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)
    assert (v_ref - v_ema).abs().max() > 1e-3 and (v_ema - v_policy).abs().max() > 1e-3  # three different models
    torch.testing.assert_close(b_ref, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_ema, v_ema, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, v_policy)  # the mixed batch leaves the policy adapter as it was


@pytest.mark.parametrize("backbone", [SD3, Flux], ids=["sd3", "flux"])
def test_batched_reference_keeps_awm_loss_and_gradients(backbone, tiny_sd3_dir, tiny_flux_dir):
    pipeline = _pipeline(backbone, tiny_sd3_dir, tiny_flux_dir)
    model = _lora_model(pipeline, backbone)
    transformer, adapters = model.get_base_model(), AdapterSwitch(model)
    model.train()
    params = adapter_parameters(model, "default")
    embeds, pooled = backbone.encode_prompts(pipeline, ["a red cube", "a cat"], "cpu", 16)
    embeds, pooled = embeds.repeat(2, 1, 1), pooled.repeat(2, 1)  # T = 2 timesteps x B = 2 samples
    clean = backbone.initial_noise(pipeline, 2, RES, "cpu", torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.8, 0.5, 0.6])
    kwargs = dict(guidance_scale=3.5, dtype=torch.float32)

    def policy_v(x, t):
        return backbone.velocity(model, x, t, embeds, pooled, **kwargs)

    def ref_v(x, t):
        with adapters.disabled():
            return backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)

    def ema_v(x, t):
        with adapters.use("ema"):
            return backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)

    def loss_and_grads(ref_fn, ema_fn):
        loss, metrics = awm_loss(policy_v, clean, noise, t, torch.tensor([1.0, -0.5]), 2, weighting="ghuber",
                                 clip_range=1.0, beta=0.1, ref_velocity_fn=ref_fn, ema_beta=1.0,
                                 ema_velocity_fn=ema_fn)
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return metrics, grads

    separate, grads = loss_and_grads(ref_v, ema_v)
    batched, grads_batched = loss_and_grads(*speed.paired_reference(
        lambda x, t: speed.reference_and_ema_velocity(backbone, transformer, adapters, x, t, embeds, pooled,
                                                      **kwargs)))
    assert separate["kl_loss"] > 0 and separate["ema_kl_loss"] > 0
    for key in separate:
        torch.testing.assert_close(batched[key], separate[key], rtol=1e-5, atol=1e-8)
    for g, g_batched in zip(grads, grads_batched):
        torch.testing.assert_close(g_batched, g, rtol=1e-5, atol=1e-8)


def test_paired_reference_refuses_mismatched_calls():
    ref_v, ema_v = speed.paired_reference(lambda x, t: (x + 1, x + 2))
    x, t = torch.zeros(2), torch.zeros(2)
    with pytest.raises(RuntimeError, match="must follow ref_v"):
        ema_v(x, t)
    assert torch.equal(ref_v(x, t), x + 1) and torch.equal(ema_v(x, t), x + 2)
    ref_v(x, t)
    with pytest.raises(RuntimeError):
        ema_v(torch.zeros(2), t)  # another tensor: not the pair's inputs


# ---------------------------------------------------------------- fused AdamW
def _adam_run(fused, steps=4, resume_from=None):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    optimizer = build_optimizer(params, 3e-3, (0.9, 0.999), 1e-4, 1e-8, fused=fused)
    if resume_from is not None:
        with torch.no_grad():
            for p, saved in zip(params, resume_from["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(copy.deepcopy(resume_from["optimizer"]))  # torch keeps the step tensors it loads
    for step in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (step + 1)) + 0.1
        optimizer.step()
    return params, optimizer


def test_fused_adamw_takes_the_same_steps():
    plain, _ = _adam_run(fused=False)
    fused, optimizer = _adam_run(fused=True)
    assert optimizer.param_groups[0]["fused"]
    for p, q in zip(plain, fused):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_optimizer_implementation_may_change_on_resume(saved_fused, resumed_fused):
    """A checkpoint of one implementation resumes under the other (an execution switch, free to
    change: torch would otherwise take `fused` from the checkpoint) and takes the same steps."""
    params, optimizer = _adam_run(saved_fused, steps=2)
    saved = {"params": [p.detach().clone() for p in params], "optimizer": copy.deepcopy(optimizer.state_dict())}
    resumed_params, resumed = _adam_run(resumed_fused, steps=2, resume_from=saved)
    assert bool(resumed.param_groups[0]["fused"]) == resumed_fused
    continued, _ = _adam_run(saved_fused, steps=2, resume_from=saved)
    for p, q in zip(continued, resumed_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- regional compilation
@pytest.mark.parametrize("backbone", [SD3, Flux], ids=["sd3", "flux"])
def test_compiled_blocks_keep_every_forward_and_the_gradients(backbone, tiny_sd3_dir, tiny_flux_dir):
    """`compile_repeated_blocks` wiring with the "eager" backend (dynamo captures each block,
    every adapter state, grad mode and the mixed batch; no code generation: inductor's CPU
    compile of even the tiny model takes minutes on 2 cores). Inductor's numerics are a device
    measurement (`benchmarks/throughput.py` parity)."""
    import torch._dynamo

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        pipeline = _pipeline(backbone, tiny_sd3_dir, tiny_flux_dir)
        model = _lora_model(pipeline, backbone)
        transformer, adapters = model.get_base_model(), AdapterSwitch(model)
        if compiled:
            from torch._dynamo.utils import counters

            counters.clear()
            count = speed.compile_repeated_blocks(transformer, backbone.repeated_blocks, backend="eager")
            assert count == sum(type(m).__name__ in backbone.repeated_blocks for m in transformer.modules())
            assert torch._dynamo.config.recompile_limit >= speed.RECOMPILE_LIMIT
        embeds, pooled = backbone.encode_prompts(pipeline, ["a red cube", "a cat"], "cpu", 16)
        x = backbone.initial_noise(pipeline, 2, RES, "cpu", torch.Generator().manual_seed(1))
        t = torch.tensor([0.3, 0.7])
        kwargs = dict(guidance_scale=3.5, dtype=torch.float32)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no block may fall back to eager
            with torch.no_grad():
                outputs = [backbone.velocity(transformer, x, t, embeds, pooled, **kwargs)]
                with adapters.disabled():
                    outputs.append(backbone.velocity(transformer, x, t, embeds, pooled, **kwargs))
                with adapters.use("ema"):
                    outputs.append(backbone.velocity(transformer, x, t, embeds, pooled, **kwargs))
                outputs.extend(speed.reference_and_ema_velocity(backbone, transformer, adapters, x, t, embeds,
                                                                pooled, **kwargs))
                # the mixed batch's hooks, registered at its first use, do not invalidate compiled entries
                assert torch.equal(backbone.velocity(transformer, x, t, embeds, pooled, **kwargs), outputs[0])
            model.train()
            loss = backbone.velocity(model, x, t, embeds, pooled, **kwargs).square().mean()
            loss.backward()
        grads = [p.grad for p in adapter_parameters(model, "default")]
        results.append((outputs, loss.detach(), grads))
        if compiled:  # each block kind x (policy, base, ema, mixed, policy with grad), captured whole
            assert counters["stats"]["unique_graphs"] == 2 * 5 and not counters["graph_break"]
    (plain, loss, grads), (fast, loss_fast, grads_fast) = results
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fast, loss, rtol=1e-6, atol=0)
    for g, h in zip(grads, grads_fast):
        torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-8)
    torch._dynamo.reset()


# ---------------------------------------------------------------- settings
def test_settings_resolve_auto_per_device():
    from advantage_weighted_matching.config.tiny_awm import tiny_cpu

    config = tiny_cpu()
    cpu, cuda = speed.Settings.from_config(config, "cpu"), speed.Settings.from_config(config, "cuda")
    assert not cpu.compile and not cpu.fused_adam and cuda.compile and cuda.fused_adam
    assert cpu.rollout_chunk == config.sample.train_batch_size and not cpu.batched_reference
    config.train.compile, config.train.fused_adam, config.sample.rollout_chunk = "true", "false", 8
    config.train.batched_reference = True
    on = speed.Settings.from_config(config, "cpu")
    assert on.compile and not on.fused_adam and on.rollout_chunk == 8 and on.batched_reference
    config.train.beta = 0.0  # only the KL-EMA forward runs: nothing to batch
    assert not speed.Settings.from_config(config, "cpu").batched_reference
    with pytest.raises(ValueError):
        speed.resolve("yes", "cpu")


# ---------------------------------------------------------------- the training script
def test_training_with_every_switch_matches_the_plain_run(tmp_path, tiny_sd3_dir):
    """Two epochs of the tiny preset with all switches on (rollouts of the whole epoch in one chunk,
    batched reference, fused AdamW, regional compilation with the "eager" backend) log the same
    rewards and losses as the plain run, and the per-epoch throughput keys (MFU and peak memory
    are CUDA-only)."""
    import torch._dynamo
    from test_train_e2e import run_training

    common = ["--config.num_epochs=2", "--config.eval_freq=2", "--config.log_image_freq=0"]
    plain = run_training(tmp_path / "plain", tiny_sd3_dir, *common)
    fast = run_training(tmp_path / "fast", tiny_sd3_dir, *common, "--config.sample.rollout_chunk=8",
                        "--config.train.batched_reference=true", "--config.train.fused_adam=true",
                        "--config.train.compile=true", "--config.train.compile_backend=eager")
    torch._dynamo.reset()
    assert len(plain) == len(fast) == 2 and {"reward/avg", "train/loss", "eval/avg"} <= set(plain[-1])
    for a, b in zip(plain, fast):
        for key in ("reward/avg", "eval/avg", "train/loss", "train/policy_loss", "train/kl_loss",
                    "train/ema_kl_loss", "train/grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
        for record in (a, b):
            assert record["perf/rollout_images_per_s"] > 0 and record["perf/epoch_images_per_s"] > 0
            assert record["perf/epoch_images_per_s"] < record["perf/rollout_images_per_s"]
            assert not any(key.startswith(("perf/mfu", "perf/peak_gib")) for key in record)
    assert fast[-1]["perf/compile_s"] > 0 and "perf/compile_s" not in plain[-1]
