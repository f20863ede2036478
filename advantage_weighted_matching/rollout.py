"""Rollouts of a diffusers text-to-image pipeline: SA-Solver (SPEC 3a), SDE / ODE (SPEC 3b).

The model family's pieces (prompt encoding, start noise, the velocity call, the flow
grid, decoding) come from a backbone (``backbones.py``: SD3 or FLUX); only the solver
loop is ours. Shapes: prompt embeddings [B, L, D], pooled [B, P], latents
[B, C, h, w] (SD3.5: C = 16, h = H / 8), images [B, 3, H, W] in [0, 1].

A rollout's randomness is a pure function of its batch's generator: `ChunkedRollout`
runs queued rollout batches `chunk` images per transformer call (more or fewer than a
batch) and draws every batch's noise from that batch's own generator in the order an
unchunked rollout draws it, so each image's start noise, solver draws and result do not
depend on the chunking (only the transformer's batch size does).

The SD3 backbone's functions are also exported here under their historical names
(``load_pipeline``, ``flow_sigmas`` (from a scheduler), ``encode_prompts``, ``velocity``,
``decode``, ``initial_noise``) for SD3-only callers (the toy task, benchmarks).
"""

import contextlib
from collections import deque
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
    backbone=SD3, noise=None,
):
    """Sample a batch. `sigmas` from `backbone.sigmas`; `generator` drives the start
    noise and every solver draw (a fixed seed reproduces the rollout exactly), unless
    `noise` (a `ChunkNoise`) gives them.

    SA-Solver: exactly num_steps transformer calls. SDE/ODE: num_steps calls.
    """
    device = prompt_embeds.device
    if noise is None:
        x = backbone.initial_noise(pipeline, prompt_embeds.shape[0], resolution, device, generator)
    else:
        x = noise.start()
    draw_noise = noise.draw if noise is not None else None
    dtype = transformer.dtype  # once: diffusers' `dtype` walks every submodule on each access

    def v(x, t):
        return backbone.velocity(transformer, x, t, prompt_embeds, pooled, negative, guidance_scale, dtype=dtype)

    if use_sa_solver and not deterministic:
        grid = sa_solver_time_grid(sigmas)
        latents = sa_solver_sample(lambda x, t: x - t * v(x, t), x, grid, noise_level, generator, progress,
                                   draw_noise)
        log_probs = x.new_zeros(x.shape[0], len(grid) - 1)
    else:
        latents, log_probs = sde_sample(v, x, sigmas, noise_level, sde_frac, generator, deterministic, progress,
                                        draw_noise)
    return Rollout(images=backbone.decode(pipeline, latents[-1]), latents=latents, log_probs=log_probs, sigmas=sigmas)


class BatchNoise:
    """One rollout batch's randomness, drawn from its own generator in the order `rollout`
    draws it unchunked: the start latents [B, C, h, w] first, then one [B, C, h, w]
    standard-normal tensor per stochastic solver step. Draws are made on first demand and
    kept, so chunks that take different rows of the batch see the same values."""

    def __init__(self, start, generator):
        self.start, self.generator, self.draws = start, generator, []

    def draw(self, index):
        while len(self.draws) <= index:
            self.draws.append(torch.randn(self.start.shape, generator=self.generator, device=self.start.device,
                                          dtype=self.start.dtype))
        return self.draws[index]


class ChunkNoise:
    """The noise of one chunk: rows of one or more `BatchNoise`s, concatenated in order."""

    def __init__(self, pieces):
        self.pieces, self.count = pieces, 0  # [(BatchNoise, slice of its rows)]

    def start(self):
        return torch.cat([batch.start[rows] for batch, rows in self.pieces])

    def draw(self):
        self.count += 1
        return torch.cat([batch.draw(self.count - 1)[rows] for batch, rows in self.pieces])


class _Queued:
    def __init__(self, embeds, pooled, noise, tag):
        self.embeds, self.pooled, self.noise, self.tag = embeds, pooled, noise, tag
        self.size, self.assigned, self.parts = embeds.shape[0], 0, []  # parts: Rollouts of its rows, in order

    @property
    def done(self):
        return sum(part.images.shape[0] for part in self.parts) == self.size


def _concat_rollouts(parts):
    if len(parts) == 1:
        return parts[0]
    return Rollout(images=torch.cat([p.images for p in parts]),
                   latents=[torch.cat(step) for step in zip(*(p.latents for p in parts))],
                   log_probs=torch.cat([p.log_probs for p in parts]), sigmas=parts[0].sigmas)


class ChunkedRollout:
    """Rollouts of queued batches, `chunk` images per solver pass (an execution detail).

    ``push(embeds, pooled, generator, tag)`` queues one rollout batch (its generator as the
    unchunked `rollout` would get it), runs every full chunk of the queued rows (all of them
    with ``last=True``) and returns the batches completed by then, in order, as
    ``(Rollout, tag)``. A chunk may take rows of several batches (chunk > batch) or part
    of one (chunk < batch); with chunk = batch size it is exactly one `rollout` call per
    batch. Each chunk's rows are decoded together. `region(rows)`: an optional context
    manager around each chunk (timing, FLOP counting). `rollout_kwargs` go to `rollout`.
    """

    def __init__(self, pipeline, transformer, chunk, sigmas, resolution, region=None, **rollout_kwargs):
        if chunk < 1:
            raise ValueError(f"rollout chunk must be >= 1 images, got {chunk}")
        self.pipeline, self.transformer, self.chunk = pipeline, transformer, chunk
        self.sigmas, self.resolution, self.region, self.kwargs = sigmas, resolution, region, rollout_kwargs
        self.backbone = rollout_kwargs.get("backbone", SD3)
        self.queue = deque()

    def push(self, embeds, pooled, generator, tag=None, last=False):
        start = self.backbone.initial_noise(self.pipeline, embeds.shape[0], self.resolution, embeds.device, generator)
        self.queue.append(_Queued(embeds, pooled, BatchNoise(start, generator), tag))
        while self._pending() >= self.chunk or (last and self._pending()):
            self._run_chunk(min(self.chunk, self._pending()))
        finished = []
        while self.queue and self.queue[0].done:
            batch = self.queue.popleft()
            finished.append((_concat_rollouts(batch.parts), batch.tag))
        return finished

    def _pending(self):
        return sum(batch.size - batch.assigned for batch in self.queue)

    def _run_chunk(self, rows):
        pieces, remaining = [], rows  # (batch, slice of its rows), oldest rows first
        for batch in self.queue:
            take = min(batch.size - batch.assigned, remaining)
            if take:
                pieces.append((batch, slice(batch.assigned, batch.assigned + take)))
                batch.assigned, remaining = batch.assigned + take, remaining - take
            if not remaining:
                break
        embeds = torch.cat([batch.embeds[s] for batch, s in pieces])
        pooled = torch.cat([batch.pooled[s] for batch, s in pieces])
        noise = ChunkNoise([(batch.noise, s) for batch, s in pieces])
        region = self.region(rows) if self.region is not None else contextlib.nullcontext()
        with region:
            result = rollout(self.pipeline, self.transformer, embeds, pooled, self.sigmas, self.resolution, None,
                             noise=noise, **self.kwargs)
        offset = 0
        for batch, s in pieces:
            n = s.stop - s.start
            batch.parts.append(Rollout(images=result.images[offset:offset + n],
                                       latents=[x[offset:offset + n] for x in result.latents],
                                       log_probs=result.log_probs[offset:offset + n], sigmas=result.sigmas))
            offset += n
