"""Model families behind one small interface: Stable Diffusion 3 and FLUX.

Everything outside this module (solvers, objective, trainer) works on flow-matching
latents ``x`` of shape [B, C, h, w] at flow time ``t`` in [0, 1] (``t = 1`` is noise)
and on prompt conditioning ``(embeds [B, L, D], pooled [B, P])``. A backbone knows the
rest:

* ``load_pipeline(model, revision, dtype, device)``: the diffusers pipeline, frozen;
* ``encode_prompts(pipeline, prompts, device, max_sequence_length)`` -> (embeds, pooled);
* ``sigmas(pipeline, num_steps, resolution)``: the flow grid (num_steps + 1 values, last 0);
* ``initial_noise(pipeline, batch, resolution, device, generator)`` -> x [B, C, h, w];
* ``velocity(transformer, x, t, embeds, pooled, ...)`` -> v [B, C, h, w] (float32):
  the model call with the family's timestep convention, latent packing and guidance;
* ``uses_cfg(guidance_scale)``: whether sampling needs the empty-prompt embedding;
* ``decode(pipeline, latents)`` -> images [B, 3, H, W] in [0, 1];
* ``lora_targets(lora_type)`` and ``pipeline_class()`` (LoRA save / load);
* ``repeated_blocks``: the transformer's repeated block classes (regional compilation, ``speed.py``).

SD3 (``StableDiffusion3Pipeline``): the transformer takes [B, C, h, w] and
``timestep = 1000 t``; guidance is classifier-free (two halves in one call).
FLUX.1-dev (``FluxPipeline``): latents are packed into 2x2 tokens
[B, (h/2)(w/2), 4C] with 3-axis position ids, the transformer takes ``timestep = t``
and a guidance value (it scales both by 1000 itself); the model is guidance-distilled,
so sampling is CFG-free with ``guidance_scale`` as an input. Its flow grid is shifted by
``mu`` from the image token count (``use_dynamic_shifting``).
"""

import copy

import numpy as np
import torch

SD3_ATTN_TARGETS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]
SD3_FFN_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def _timestep(x, t, scale):
    """[B] float32 timesteps from a float or a [B] tensor (a fill, not a host-to-device copy:
    that copy would synchronise the GPU on every step)."""
    batch = x.shape[0]
    if isinstance(t, torch.Tensor):
        return t.to(x.device, torch.float32).reshape(-1).expand(batch) * scale
    return torch.full((batch,), t * scale, device=x.device, dtype=torch.float32)


class SD3:
    """Stable Diffusion 3 / 3.5 (MMDiT, three text encoders, CFG)."""

    name = "sd3"
    modules = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")  # all frozen
    repeated_blocks = ("JointTransformerBlock",)

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @classmethod
    def load_pipeline(cls, model, revision, dtype, device):
        """`from_pretrained` with every module frozen, moved to `device`; the VAE stays in
        float32 (decoding in fp16 leaves artefacts the rewards would see)."""
        pipeline = cls.pipeline_class().from_pretrained(model, revision=revision, torch_dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        for name in cls.modules:
            getattr(pipeline, name).requires_grad_(False)
        pipeline.to(device)
        pipeline.vae.to(torch.float32)
        return pipeline

    @staticmethod
    def lora_targets(lora_type):
        return {"attn": SD3_ATTN_TARGETS, "ffn": SD3_FFN_TARGETS}[lora_type]

    @staticmethod
    @torch.no_grad()
    def encode_prompts(pipeline, prompts, device, max_sequence_length=128):
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    @staticmethod
    def sigmas(pipeline, num_steps, resolution=None):
        """The pipeline scheduler's grid for `num_steps` (on a copy: the pipeline's state is untouched)."""
        del resolution  # SD3's shift is fixed (3.0 for SD3.5)
        scheduler = copy.deepcopy(pipeline.scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float64)

    @staticmethod
    def initial_noise(pipeline, batch_size, resolution, device, generator):
        channels = pipeline.transformer.config.in_channels
        return pipeline.prepare_latents(batch_size, channels, resolution, resolution, torch.float32, device, generator)

    @staticmethod
    def uses_cfg(guidance_scale):
        return guidance_scale > 1.0

    @staticmethod
    def velocity(transformer, x, t, embeds, pooled, negative=None, guidance_scale=1.0, dtype=None,
                 detach_uncond=False):
        """v [B, C, h, w] float32. With guidance_scale > 1 and `negative` (empty-prompt embeds, pooled):
        ``v_u + s (v_c - v_u)`` from one call on both halves; `detach_uncond`: ``v_u.detach() + s (v_c - v_u)``
        (Flow-GRPO's training CFG: same value, gradient ``s (dv_c - dv_u)``)."""
        timestep = _timestep(x, t, 1000.0)
        dtype = dtype or transformer.dtype
        if guidance_scale > 1.0 and negative is not None:
            batch = x.shape[0]
            neg_embeds, neg_pooled = negative
            out = transformer(
                hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([neg_embeds.expand(batch, -1, -1), embeds]),
                pooled_projections=torch.cat([neg_pooled.expand(batch, -1), pooled]), return_dict=False,
            )[0].float()
            uncond, cond = out.chunk(2)
            return (uncond.detach() if detach_uncond else uncond) + guidance_scale * (cond - uncond)
        out = transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds,
                          pooled_projections=pooled, return_dict=False)[0]
        return out.float()

    @staticmethod
    @torch.no_grad()
    def decode(pipeline, latents):
        vae = pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type="pt").float()

    @staticmethod
    def ensure_tiny(path, seed):
        from advantage_weighted_matching.tiny_sd3 import ensure_tiny_sd3

        return ensure_tiny_sd3(path, seed)


def pack_latents(x):
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: FLUX's 2x2 patch tokens, row-major."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, h, w):
    """Inverse of `pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels // 4, h, w)


def image_ids(h, w, device):
    """[(h/2)(w/2), 3] position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def flux_shift_mu(image_seq_len, scheduler_config):
    """Linear in the token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class Flux(SD3):
    """FLUX.1 (double- and single-stream blocks, CLIP pooled + T5 tokens, packed latents, guidance embedding)."""

    name = "flux"
    modules = ("vae", "text_encoder", "text_encoder_2", "transformer")
    repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    @staticmethod
    def pipeline_class():
        from diffusers import FluxPipeline

        return FluxPipeline

    @staticmethod
    def lora_targets(lora_type):
        # the double-stream attention names are SD3's; single-stream blocks share attn.to_{q,k,v}
        return {"attn": SD3_ATTN_TARGETS, "ffn": SD3_FFN_TARGETS + ["proj_mlp"]}[lora_type]

    @staticmethod
    @torch.no_grad()
    def encode_prompts(pipeline, prompts, device, max_sequence_length=512):
        embeds, pooled, _text_ids = pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length)
        return embeds, pooled

    @staticmethod
    def latent_size(pipeline, resolution):
        return 2 * (resolution // (pipeline.vae_scale_factor * 2))

    @classmethod
    def sigmas(cls, pipeline, num_steps, resolution=None):
        """FluxPipeline's grid: ``linspace(1, 1/N, N)`` shifted by ``mu`` of the packed image token count
        ``(latent_size / 2)^2`` (FLUX.1 at 512 px: 32^2 = 1024 tokens)."""
        if resolution is None:
            raise ValueError("FLUX's flow grid depends on the resolution (its shift grows with the token count)")
        scheduler = copy.deepcopy(pipeline.scheduler)
        tokens = (cls.latent_size(pipeline, resolution) // 2) ** 2
        mu = flux_shift_mu(tokens, scheduler.config) if scheduler.config.use_dynamic_shifting else None
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.to(torch.float64)

    @classmethod
    def initial_noise(cls, pipeline, batch_size, resolution, device, generator):
        channels = pipeline.transformer.config.in_channels // 4
        packed, _ids = pipeline.prepare_latents(batch_size, channels, resolution, resolution, torch.float32, device,
                                                generator)
        size = cls.latent_size(pipeline, resolution)
        return unpack_latents(packed, size, size)

    @staticmethod
    def uses_cfg(guidance_scale):
        return False  # guidance-distilled: the guidance value is an input, no unconditional pass

    @staticmethod
    def velocity(transformer, x, t, embeds, pooled, negative=None, guidance_scale=3.5, dtype=None,
                 detach_uncond=False):
        """v [B, C, h, w] float32 from packed tokens; `negative` / `detach_uncond` do not apply (no CFG)."""
        del negative, detach_uncond
        b, _, h, w = x.shape
        dtype = dtype or transformer.dtype
        config = getattr(transformer, "config", None) or transformer.module.config  # bare or DDP-wrapped
        guidance = torch.full((b,), guidance_scale, device=x.device, dtype=torch.float32) \
            if config.guidance_embeds else None
        out = transformer(
            hidden_states=pack_latents(x).to(dtype), timestep=_timestep(x, t, 1.0), guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids(h, w, x.device).to(dtype), return_dict=False,
        )[0]
        return unpack_latents(out.float(), h, w)

    @staticmethod
    def ensure_tiny(path, seed):
        from advantage_weighted_matching.tiny_flux import ensure_tiny_flux

        return ensure_tiny_flux(path, seed)


BACKBONES = {"sd3": SD3, "flux": Flux}


def ensure_local_pipeline(pretrained):
    """Build the CPU pipeline a preset names at ``pretrained.model`` if it is missing: a tiny random
    one of the preset's backbone (``pretrained.tiny_seed >= 0``) or a pretrained toy SD3
    (``pretrained.toy_recipe``, `toy.pretrain.RECIPES`). Other configs (hub models) are left alone."""
    if pretrained.tiny_seed >= 0:
        get_backbone(pretrained.backbone).ensure_tiny(pretrained.model, pretrained.tiny_seed)
    elif pretrained.toy_recipe:
        from advantage_weighted_matching.toy.pretrain import ensure_toy_pipeline

        ensure_toy_pipeline(pretrained.model, pretrained.toy_recipe)


def get_backbone(name):
    if name not in BACKBONES:
        raise ValueError(f"pretrained.backbone={name!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[name]
