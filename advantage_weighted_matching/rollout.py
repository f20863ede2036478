"""Rollouts of an SD3 pipeline: SA-Solver (SPEC 3a), SDE / ODE (SPEC 3b).

Reuses the diffusers pipeline's pieces (``encode_prompt``, ``prepare_latents``,
the scheduler's sigma grid, the VAE and its image processor); only the solver
loop is ours. Shapes: prompt embeddings [B, L, D], pooled [B, P], latents
[B, C, H/f, W/f] (C = 16, f = 8 for SD3.5), images [B, 3, H, W] in [0, 1].
"""

import copy
from dataclasses import dataclass

import torch

from advantage_weighted_matching.sa_solver import sa_solver_sample, sa_solver_time_grid
from advantage_weighted_matching.sde import sde_sample


@dataclass
class Rollout:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], float32
    latents: list  # num_steps + 1 tensors [B, C, h, w]; latents[-1] is the clean sample x0
    log_probs: torch.Tensor  # [B, num_steps] per-step SDE log-probs (zeros for ODE / SA-Solver)
    sigmas: torch.Tensor  # [num_steps + 1] the SD3 flow grid used (ends in 0)


def load_pipeline(model, revision, dtype, device):
    """`StableDiffusion3Pipeline.from_pretrained` with every module frozen, moved to `device`.

    The VAE stays in float32: decoding in fp16 leaves artefacts the rewards would see.
    """
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(model, revision=revision, torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3,
                   pipeline.transformer):
        module.requires_grad_(False)
    pipeline.to(device)
    pipeline.vae.to(torch.float32)
    return pipeline


def flow_sigmas(scheduler, num_steps):
    """The SD3 FlowMatchEulerDiscreteScheduler grid for `num_steps` (num_steps + 1 entries, last 0).

    Works on a copy so the pipeline's own scheduler state is untouched.
    """
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.to(torch.float64)


@torch.no_grad()
def encode_prompts(pipeline, prompts, device, max_sequence_length=128):
    """(prompt_embeds [B, L, D], pooled_prompt_embeds [B, P]) from the three encoders."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=device, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


def velocity(transformer, x, t, prompt_embeds, pooled, negative=None, guidance_scale=1.0, dtype=None,
             detach_uncond=False):
    """v(x, t) [B, C, h, w] at flow time t in [0, 1] (float or [B] tensor), float32.

    With guidance_scale > 1 and `negative` = (embeds, pooled) of the empty prompt,
    classifier-free guidance on the velocity, ``v_u + s (v_c - v_u)``, both halves in one
    call. `detach_uncond`: ``v_u.detach() + s (v_c - v_u)``, Flow-GRPO's training CFG (same
    value; gradient ``s (dv_c - dv_u)`` instead of ``s dv_c + (1 - s) dv_u``). `dtype`: the
    model input dtype (default: the transformer's; pass it for wrapped models, e.g. DDP).
    """
    batch = x.shape[0]
    if isinstance(t, torch.Tensor):
        timestep = t.to(x.device, torch.float32).reshape(-1).expand(batch) * 1000
    else:  # a fill, not a host-to-device copy: that copy would synchronise the GPU on every step
        timestep = torch.full((batch,), t, device=x.device, dtype=torch.float32) * 1000
    dtype = dtype or transformer.dtype
    if guidance_scale > 1.0 and negative is not None:
        neg_embeds, neg_pooled = negative
        out = transformer(
            hidden_states=torch.cat([x, x]).to(dtype),
            timestep=torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([neg_embeds.expand(batch, -1, -1), prompt_embeds]),
            pooled_projections=torch.cat([neg_pooled.expand(batch, -1), pooled]),
            return_dict=False,
        )[0].float()
        uncond, cond = out.chunk(2)
        return (uncond.detach() if detach_uncond else uncond) + guidance_scale * (cond - uncond)
    out = transformer(
        hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled, return_dict=False,
    )[0]
    return out.float()


@torch.no_grad()
def decode(pipeline, latents):
    """Clean latents -> images [B, 3, H, W] in [0, 1] (float32)."""
    vae = pipeline.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(images, output_type="pt").float()


def initial_noise(pipeline, batch_size, resolution, device, generator):
    """Gaussian latents [B, C, res/f, res/f] in float32 via the pipeline's prepare_latents."""
    channels = pipeline.transformer.config.in_channels
    return pipeline.prepare_latents(batch_size, channels, resolution, resolution, torch.float32, device, generator)


@torch.no_grad()
def rollout(
    pipeline, transformer, prompt_embeds, pooled, sigmas, resolution, generator, use_sa_solver=True,
    noise_level=0.0, sde_frac=0.0, deterministic=False, negative=None, guidance_scale=1.0, progress=None,
):
    """Sample a batch. `sigmas` from `flow_sigmas`; `generator` drives the start
    noise and every solver draw (a fixed seed reproduces the rollout exactly).

    SA-Solver: exactly num_steps transformer calls. SDE/ODE: num_steps calls.
    """
    device = prompt_embeds.device
    x = initial_noise(pipeline, prompt_embeds.shape[0], resolution, device, generator)
    dtype = transformer.dtype  # once: diffusers' `dtype` walks every submodule on each access

    def v(x, t):
        return velocity(transformer, x, t, prompt_embeds, pooled, negative, guidance_scale, dtype=dtype)

    if use_sa_solver and not deterministic:
        grid = sa_solver_time_grid(sigmas)
        latents = sa_solver_sample(lambda x, t: x - t * v(x, t), x, grid, noise_level, generator, progress)
        log_probs = x.new_zeros(x.shape[0], len(grid) - 1)
    else:
        latents, log_probs = sde_sample(v, x, sigmas, noise_level, sde_frac, generator, deterministic, progress)
    return Rollout(images=decode(pipeline, latents[-1]), latents=latents, log_probs=log_probs, sigmas=sigmas)
