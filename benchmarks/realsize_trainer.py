"""Trainer overhead at SD3.5-Medium scale on one GPU (random weights).

    python benchmarks/realsize_trainer.py --out realsize_trainer.json

Writes a pipeline directory with the SD3.5-Medium transformer and SD3 VAE shapes
(random weights; the text encoders keep the real output widths but one layer
each: they run once per rollout batch), then runs the real training script on
it for a few epochs with a one-GPU batch plan at the presets' per-GPU sizes
(512 px, 14 SA-Solver steps, 6 images per rollout batch, micro-batch 3 x 6
timesteps, rank-32 LoRA, fp16) and reports epoch wall time / time inside model
calls (`benchmarks/overhead.py`).
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


ENCODER_WIDTHS = {"sd35m": (768, 1280, 4096), "tiny": (16, 16, 32)}  # CLIP-L, CLIP-G, T5 output widths


def build_pipeline_dir(out_dir, size):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from advantage_weighted_matching.tiny_sd3 import _clip_tokenizer, _t5_tokenizer
    from realsize_step import SIZES

    spec, (clip_l, clip_g, t5_width) = SIZES[size], ENCODER_WIDTHS[size]
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        def clip(width):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=8, projection_dim=width, max_position_embeddings=77,
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id))

        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**spec["transformer"]), vae=AutoencoderKL(**spec["vae"]),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=clip(clip_l), tokenizer=clip_tokenizer,
            text_encoder_2=clip(clip_g), tokenizer_2=clip_tokenizer,
            text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=t5_width, d_kv=8, d_ff=256,
                                                   num_layers=1, num_heads=8, pad_token_id=0, eos_token_id=1)),
            tokenizer_3=t5_tokenizer,
        )
    pipeline.to(torch.float16 if torch.cuda.is_available() else torch.float32).save_pretrained(out_dir)


def main():
    from overhead import trainer_overhead, write_report

    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/sd35m_random")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", choices=sorted(ENCODER_WIDTHS), default="sd35m")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if not os.path.exists(os.path.join(args.dir, "model_index.json")):
        build_pipeline_dir(args.dir, args.size)
    cuda = torch.cuda.is_available()
    overrides = [
        "--config.pretrained.tiny_seed=-1", f"--config.mixed_precision={'fp16' if cuda else 'no'}",
        f"--config.resolution={512 if args.size == 'sd35m' else 32}",
        "--config.max_sequence_length=128", "--config.sample.num_steps=14", "--config.sample.train_batch_size=6",
        "--config.sample.num_image_per_prompt=6", "--config.sample.num_batches_per_epoch=2",
        "--config.train.batch_size=3", "--config.train.gradient_accumulation_steps=4",
        "--config.train.train_timesteps=6", "--config.train.timestep_fraction=0.9", "--config.train.lora_rank=32",
        "--config.train.lora_alpha=64",
    ]
    report = trainer_overhead(args.dir, args.epochs, "tiny_cpu", overrides)
    report.update(device=torch.cuda.get_device_name() if cuda else "cpu", size=args.size, plan="1 GPU: 2 rollout batches x 6 images, 4 micro-batches x 3 x 6")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
