"""A tiny, random-weight FLUX.1-dev-shaped pipeline for CPU runs and tests.

    python -m advantage_weighted_matching.tiny_flux OUT_DIR [--seed N]

writes a complete diffusers ``FluxPipeline`` directory with FLUX.1-dev's
structure in miniature: a ``FluxTransformer2DModel`` with double-stream and
single-stream blocks, 3-axis RoPE and the guidance embedding (FLUX.1-dev is
guidance-distilled), a CLIP text encoder for the pooled vector, a T5 encoder for
the token sequence, a VAE with 16x packing-ready latents, and the flow-matching
scheduler with the resolution-dependent shift (``use_dynamic_shifting``). It
loads back with ``FluxPipeline.from_pretrained(OUT_DIR)``: the code path used for
``black-forest-labs/FLUX.1-dev``. Same seed, same bytes of weights.
"""

import argparse
import os

import torch

from advantage_weighted_matching.tiny_sd3 import (
    CLIP_DIM, MAX_LENGTH_CLIP, T5_DIM, _clip_tokenizer, _t5_tokenizer, save_pipeline_atomic,
)

LATENT_CHANNELS = 4  # packed 2x2: the transformer sees 16 channels per token


def build_tiny_flux(out_dir, seed=0):
    """Build the tiny FLUX pipeline with weights drawn from `seed` and save it to `out_dir`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_LENGTH_CLIP, bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, hidden_act="gelu",
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    # FLUX.1-dev's scheduler config: shift 3.0 with dynamic (resolution-dependent) shifting
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
    )
    return save_pipeline_atomic(pipeline, out_dir)


def ensure_tiny_flux(out_dir, seed=0):
    """Build the tiny FLUX pipeline at `out_dir` unless a complete one is already there."""
    if not os.path.exists(os.path.join(out_dir, "model_index.json")):
        build_tiny_flux(out_dir, seed)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_flux(args.out_dir, args.seed)
    print(f"tiny FluxPipeline (seed {args.seed}) written to {path}")


if __name__ == "__main__":
    main()
