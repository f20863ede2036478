"""Rollouts of a diffusers text-to-image pipeline: SA-Solver (SPEC 3a), SDE / ODE (SPEC 3b).

The model family's pieces (prompt encoding, start noise, the velocity call, the flow
grid, decoding) come from a backbone (``backbones.py``: SD3 or FLUX); only the solver
loop is ours. Shapes: prompt embeddings [B, L, D], pooled [B, P], latents
[B, C, h, w] (SD3.5: C = 16, h = H / 8), images [B, 3, H, W] in [0, 1].

The SD3 backbone's functions are also exported here under their historical names
(``load_pipeline``, ``flow_sigmas`` (from a scheduler), ``encode_prompts``, ``velocity``,
``decode``, ``initial_noise``) for SD3-only callers (the toy task, benchmarks).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from advantage_weighted_matching.backbones import SD3
from advantage_weighted_matching.sa_solver import sa_solver_sample, sa_solver_time_grid
from advantage_weighted_matching.sde import sde_sample

load_pipeline = SD3.load_pipeline
encode_prompts = SD3.encode_prompts
velocity = SD3.velocity
decode = SD3.decode
initial_noise = SD3.initial_noise


def flow_sigmas(scheduler, num_steps):
    """SD3's flow grid for `num_steps` (num_steps + 1 entries, last 0), float64, from its scheduler."""
    return SD3.sigmas(SimpleNamespace(scheduler=scheduler), num_steps)


@dataclass
class Rollout:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], float32
    latents: list  # num_steps + 1 tensors [B, C, h, w]; latents[-1] is the clean sample x0
    log_probs: torch.Tensor  # [B, num_steps] per-step SDE log-probs (zeros for ODE / SA-Solver)
    sigmas: torch.Tensor  # [num_steps + 1] the flow grid used (ends in 0)


@torch.no_grad()
def rollout(
    pipeline, transformer, prompt_embeds, pooled, sigmas, resolution, generator, use_sa_solver=True,
    noise_level=0.0, sde_frac=0.0, deterministic=False, negative=None, guidance_scale=1.0, progress=None,
    backbone=SD3,
):
    """Sample a batch. `sigmas` from `backbone.sigmas`; `generator` drives the start
    noise and every solver draw (a fixed seed reproduces the rollout exactly).

    SA-Solver: exactly num_steps transformer calls. SDE/ODE: num_steps calls.
    """
    device = prompt_embeds.device
    x = backbone.initial_noise(pipeline, prompt_embeds.shape[0], resolution, device, generator)
    dtype = transformer.dtype  # once: diffusers' `dtype` walks every submodule on each access

    def v(x, t):
        return backbone.velocity(transformer, x, t, prompt_embeds, pooled, negative, guidance_scale, dtype=dtype)

    if use_sa_solver and not deterministic:
        grid = sa_solver_time_grid(sigmas)
        latents = sa_solver_sample(lambda x, t: x - t * v(x, t), x, grid, noise_level, generator, progress)
        log_probs = x.new_zeros(x.shape[0], len(grid) - 1)
    else:
        latents, log_probs = sde_sample(v, x, sigmas, noise_level, sde_frac, generator, deterministic, progress)
    return Rollout(images=backbone.decode(pipeline, latents[-1]), latents=latents, log_probs=log_probs, sigmas=sigmas)
