"""Rollouts on the tiny random SD3 pipeline (SPEC section 3): grid, encoders, SA-Solver and SDE loops, decode."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advantage_weighted_matching.rollout import decode, encode_prompts, flow_sigmas, initial_noise, rollout, velocity
from advantage_weighted_matching.sa_solver import sa_solver_sample, sa_solver_time_grid

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ['a sign that says "hello"', "a red cup on a table"]
RES = 32  # tiny VAE downsamples 2x: latents [B, 4, 16, 16]


@pytest.fixture(scope="module")
def embeds(tiny_pipeline):
    return encode_prompts(tiny_pipeline, PROMPTS, "cpu")


class CallCounter:
    """Counts transformer forward calls and records their timesteps."""

    def __init__(self, module):
        self.timesteps = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.timesteps.append(kwargs["timestep"].detach().clone())

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------------------
def test_flow_sigmas_match_scheduler_and_leave_it_untouched(tiny_pipeline):
    scheduler = tiny_pipeline.scheduler
    assert scheduler.config.shift == 3.0
    state_before = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in scheduler.__dict__.items()}
    sigmas = flow_sigmas(scheduler, 14)
    # the pipeline's scheduler is untouched
    assert scheduler.__dict__.keys() == state_before.keys()
    for key, value in scheduler.__dict__.items():
        if torch.is_tensor(value):
            assert torch.equal(value, state_before[key]), key
        elif key != "config":
            assert value == state_before[key], key
    # equal to the scheduler's own grid after set_timesteps(14)
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(14)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (15,)
    torch.testing.assert_close(sigmas, reference.sigmas.to(torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(sigmas[:-1] * 1000, reference.timesteps.to(torch.float64), rtol=1e-6, atol=1e-4)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert float(sigmas[1]) == pytest.approx(0.973058, abs=1e-6)  # 3u/(1+2u), u = 1 - (1 - 0.002994)/13


def test_flow_sigmas_do_not_reset_a_configured_scheduler(tiny_pipeline):
    scheduler = copy.deepcopy(tiny_pipeline.scheduler)
    scheduler.set_timesteps(40)
    sigmas = flow_sigmas(scheduler, 6)
    assert sigmas.shape == (7,)
    assert scheduler.sigmas.shape == (41,) and scheduler.num_inference_steps == 40
    assert scheduler.timesteps.shape == (40,)


def test_flow_sigmas_four_steps_by_hand(tiny_pipeline):
    # u = linspace(1, 0.0029940, 4) = [1, 0.667996, 0.335992, 0.0029940]; sigma = 3u / (1 + 2u)
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)
    torch.testing.assert_close(
        sigmas, torch.tensor([1.0, 0.857692, 0.602151, 0.0089286, 0.0], dtype=torch.float64), rtol=0, atol=2e-6
    )


def test_encode_prompts(tiny_pipeline, embeds):
    prompt_embeds, pooled = embeds
    # 77 CLIP tokens + 128 T5 tokens; width = T5 d_model 32 (CLIP 16 + 16 zero-padded)
    assert prompt_embeds.shape == (2, 77 + 128, 32)
    assert pooled.shape == (2, 32)  # the two CLIP projections (16 each) concatenated
    with torch.no_grad():  # (autograd-enabled kernels differ in the last bits)
        reference = tiny_pipeline.encode_prompt(
            prompt=PROMPTS, prompt_2=PROMPTS, prompt_3=PROMPTS, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=128,
        )
    assert torch.equal(prompt_embeds, reference[0])
    assert torch.equal(pooled, reference[2])
    assert not torch.equal(prompt_embeds[0], prompt_embeds[1])  # the prompts matter
    short, _ = encode_prompts(tiny_pipeline, PROMPTS, "cpu", max_sequence_length=16)
    assert short.shape == (2, 77 + 16, 32)


def test_initial_noise_is_generator_gaussian(tiny_pipeline):
    x = initial_noise(tiny_pipeline, 2, RES, "cpu", torch.Generator().manual_seed(7))
    assert x.shape == (2, 4, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(7)))


def test_velocity_timestep_scaling(tiny_pipeline, embeds):
    counter = CallCounter(tiny_pipeline.transformer)
    try:
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        v = velocity(tiny_pipeline.transformer, x, 0.25, *embeds)
    finally:
        counter.remove()
    assert v.shape == x.shape and v.dtype == torch.float32
    assert len(counter.timesteps) == 1
    assert torch.equal(counter.timesteps[0], torch.tensor([250.0, 250.0]))


# ---------------------------------------------------------------------------
# SA-Solver rollout
def test_sa_solver_rollout_calls_and_shapes(tiny_pipeline, embeds):
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)
    counter = CallCounter(tiny_pipeline.transformer)
    try:
        out = rollout(tiny_pipeline, tiny_pipeline.transformer, *embeds, sigmas, RES,
                      torch.Generator().manual_seed(0), use_sa_solver=True, noise_level=0.7)
    finally:
        counter.remove()
    assert len(counter.timesteps) == 4  # exactly num_steps model calls
    grid = sa_solver_time_grid(sigmas)  # [0.999, 0.857692, 0.602151, 0.301075, 0]
    called = torch.stack([ts[0] for ts in counter.timesteps])
    torch.testing.assert_close(called, torch.tensor([999.0, 857.692, 602.151, 301.075]), rtol=0, atol=2e-3)
    torch.testing.assert_close(called, torch.tensor(grid[:-1], dtype=torch.float32) * 1000, rtol=1e-6, atol=1e-4)
    assert len(out.latents) == 5
    assert all(lat.shape == (2, 4, 16, 16) for lat in out.latents)
    assert out.images.shape == (2, 3, 32, 32) and out.images.dtype == torch.float32
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    assert out.images.std() > 0
    assert torch.equal(out.log_probs, torch.zeros(2, 4))
    assert out.sigmas is sigmas


def test_sa_solver_rollout_is_the_solver_over_d_equals_x_minus_t_v(tiny_pipeline, embeds):
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)
    out = rollout(tiny_pipeline, tiny_pipeline.transformer, *embeds, sigmas, RES,
                  torch.Generator().manual_seed(11), use_sa_solver=True, noise_level=0.7)
    g = torch.Generator().manual_seed(11)
    x = torch.randn((2, 4, 16, 16), generator=g)
    transformer = tiny_pipeline.transformer

    def denoise(x, t):
        with torch.no_grad():
            v = transformer(hidden_states=x, timestep=torch.full((2,), t * 1000, dtype=torch.float32),
                            encoder_hidden_states=embeds[0], pooled_projections=embeds[1], return_dict=False)[0]
        return x - t * v

    expected = sa_solver_sample(denoise, x, sa_solver_time_grid(sigmas), 0.7, g)
    for got, want in zip(out.latents, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sa_solver_rollout_reproducible(tiny_pipeline, embeds):
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)

    def run(seed, noise_level=0.7):
        return rollout(tiny_pipeline, tiny_pipeline.transformer, *embeds, sigmas, RES,
                       torch.Generator().manual_seed(seed), use_sa_solver=True, noise_level=noise_level)

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(u, v) for u, v in zip(a.latents, b.latents))
    assert not torch.equal(a.latents[0], c.latents[0])
    assert (a.images - c.images).abs().max() > 1e-4
    # the solver noise matters too (same start, different noise level -> different end)
    d = run(3, noise_level=0.0)
    assert torch.equal(a.latents[0], d.latents[0])
    assert (a.latents[-1] - d.latents[-1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------
# SDE / ODE rollout
def test_sde_rollout_log_probs_at_stochastic_steps(tiny_pipeline, embeds):
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)
    counter = CallCounter(tiny_pipeline.transformer)
    try:
        out = rollout(tiny_pipeline, tiny_pipeline.transformer, *embeds, sigmas, RES,
                      torch.Generator().manual_seed(0), use_sa_solver=False, noise_level=0.7, sde_frac=0.5)
    finally:
        counter.remove()
    assert len(counter.timesteps) == 4
    torch.testing.assert_close(torch.stack([ts[0] for ts in counter.timesteps]),
                               sigmas[:-1].float() * 1000, rtol=1e-6, atol=1e-4)
    assert out.log_probs.shape == (2, 4)
    # 4 * 0.5 = 2: steps 0 and 1 stochastic, 2 and 3 deterministic
    assert (out.log_probs[:, :2] != 0).all()
    assert torch.isfinite(out.log_probs).all()
    assert torch.equal(out.log_probs[:, 2:], torch.zeros(2, 2))
    assert len(out.latents) == 5 and out.images.shape == (2, 3, 32, 32)


def test_deterministic_rollout_is_hand_euler(tiny_pipeline, embeds):
    sigmas = flow_sigmas(tiny_pipeline.scheduler, 4)
    out = rollout(tiny_pipeline, tiny_pipeline.transformer, *embeds, sigmas, RES,
                  torch.Generator().manual_seed(21), use_sa_solver=True, noise_level=0.7, deterministic=True)
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(21))
    expected = [x]
    with torch.no_grad():
        for i in range(4):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            v = tiny_pipeline.transformer(
                hidden_states=x, timestep=torch.full((2,), sigma * 1000, dtype=torch.float32),
                encoder_hidden_states=embeds[0], pooled_projections=embeds[1], return_dict=False,
            )[0]
            x = x + (sigma_next - sigma) * v
            expected.append(x)
    assert len(out.latents) == 5
    for got, want in zip(out.latents, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.log_probs, torch.zeros(2, 4))
    torch.testing.assert_close(out.images, decode(tiny_pipeline, expected[-1]), rtol=1e-5, atol=1e-5)


def test_decode_matches_vae(tiny_pipeline):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    images = decode(tiny_pipeline, latents)
    vae = tiny_pipeline.vae
    assert vae.config.scaling_factor == 1.5305 and vae.config.shift_factor == 0.0609
    with torch.no_grad():
        raw = vae.decode(latents / 1.5305 + 0.0609).sample
    expected = (raw / 2 + 0.5).clamp(0, 1)  # postprocess: [-1, 1] -> [0, 1]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=1e-6, atol=1e-6)
    # and not the decode of the unscaled latents
    assert (images - (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)).abs().max() > 1e-3


# ---------------------------------------------------------------------------
def test_tiny_sd3_cli_is_deterministic(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "advantage_weighted_matching.tiny_sd3", str(out), "--seed", "3"],
                         cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for out in outs
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        assert b"seed 3" in stdout
    files_a = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.safetensors"))
    files_b = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.safetensors"))
    assert len(files_a) == 5  # transformer, vae, three text encoders
    assert files_a == files_b
    for rel in files_a:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert (outs[0] / "model_index.json").read_text() == (outs[1] / "model_index.json").read_text()
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(outs[0]))
    assert pipeline.transformer.config.in_channels == 4
    assert pipeline.scheduler.config.shift == 3.0
    assert not list(tmp_path.glob(".tiny_sd3_*"))  # no temp dirs left behind


def test_tiny_seed_changes_weights(tiny_sd3_dir, tmp_path):
    from safetensors.torch import load_file

    from advantage_weighted_matching.tiny_sd3 import build_tiny_sd3

    other = Path(build_tiny_sd3(tmp_path / "seed1", seed=1))
    a = load_file(str(tiny_sd3_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(other / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
