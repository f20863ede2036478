"""Pretrain a small SD3-architecture pipeline on a toy task ("scenes" or "shapes").

    python -m advantage_weighted_matching.toy.pretrain --out DIR [--recipe scenes] [--seed 0]

Builds the components the way `tiny_sd3.build_tiny_sd3` does (same tokenizers,
random frozen CLIP/CLIP/T5 encoders, SD3 MMDiT with dual attention and RMS
qk-norm, AutoencoderKL with 2x downsampling to 4 latent channels, flow-match
Euler scheduler with shift 3), a little wider (`ToySizes`), then trains a fixed
number of steps:

a. the VAE on reconstruction of toy images in [-1, 1] (MSE + a small KL),
   then sets its ``shift_factor`` / ``scaling_factor`` to the latent mean and
   1 / std (as SD3 did for its VAE);
b. the transformer with the project's flow-matching loss: ``x_t =
   objective.noisy_latents(x0, eps, t)``, target ``eps - x0``
   (``-objective.flow_matching_log_prob``), t logit-normal shifted by 3
   (``timesteps.continuous_times``), conditioned on
   ``rollout.encode_prompts`` of the frozen random encoders; the saved
   transformer is an EMA of the trained weights.

`RECIPES` name the step counts: ``scenes`` (the benchmark model, about 3.5
minutes on one core) and ``scenes_quick`` (the quick-start model, about 40 s).
A run is a pure function of (recipe, seed) on one CPU thread (the default):
the same bytes every time. ``--max_minutes`` adds a wall-clock cap (a run that
hits it is no longer reproducible; ``toy_info.json`` says so).

The whole ``StableDiffusion3Pipeline`` is saved (temp dir + rename) so the
trainer loads it with ``from_pretrained`` like SD3.5, plus ``toy_info.json``
(recipe, sizes, steps, losses, timings). Prompts are short: every toy word is
one token (`toy_words`), the CLIP tokenizers pad to 16 tokens and the T5 length
is ``TOY_MAX_SEQUENCE_LENGTH`` = 16; an RL config on this pipeline must set
``config.max_sequence_length = 16`` (the transformer never saw other T5 padding
lengths) and ``config.resolution = 32``.

After saving, ``main`` loads the pipeline back, samples the task's balanced
test prompts with the Euler ODE (``rollout.rollout(..., deterministic=True)``),
reports the task's reward next to that of the untrained pipeline, and writes
``samples.png`` (captioned with the rewards) into the pipeline directory.
"""

import argparse
import copy
import dataclasses
import importlib
import json
import logging
import os
import time

import numpy as np
import torch

from advantage_weighted_matching.tiny_sd3 import save_pipeline_atomic

logger = logging.getLogger(__name__)

TOY_MAX_SEQUENCE_LENGTH = 16  # T5 tokens; also the CLIP tokenizers' padded length (prompts: <= 10)
TOY_RESOLUTION = 32
MAX_MINUTES = 10.0
TASKS = ("shapes", "scenes")  # toy.<task> generator, rewards.<task> reward (same name in REWARDS)
# Step counts of the cached pipelines (`ensure_toy_pipeline`); timings on one core of a 2-core machine.
RECIPES = {
    # the benchmark model, about 3.5 minutes: all 416 scenes prompts; eval reward about 0.4 (<= 0.5)
    "scenes": {"task": "scenes", "vae_steps": 300, "transformer_steps": 600, "num_images": 4096},
    # the quick start's model, about 40 s: only its 4 prompts (toy.scenes.QUICKSTART_PROMPTS)
    "scenes_quick": {"task": "scenes", "vae_steps": 80, "transformer_steps": 200, "num_images": 1024,
                     "batch_size": 16, "prompts": "quickstart"},
}


def task_module(task):
    """The generator module `toy.<task>` (make_dataset, balanced_prompts, write_prompt_files)."""
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; expected one of {TASKS}")
    return importlib.import_module(f"advantage_weighted_matching.toy.{task}")


@dataclasses.dataclass
class ToySizes:
    """Component sizes of the toy pipeline (the tiny test pipeline is 8/16 VAE channels,
    2 transformer layers of 2 heads x 8)."""

    vae_channels: tuple = (16, 32)
    vae_layers_per_block: int = 1
    vae_mid_attention: bool = False
    latent_channels: int = 4
    transformer_layers: int = 4
    heads: int = 4
    head_dim: int = 16
    clip_dim: int = 16
    t5_dim: int = 32
    text_length: int = TOY_MAX_SEQUENCE_LENGTH


def toy_words():
    """Every word of every toy prompt (both tasks), sorted: each is one token of the toy tokenizers."""
    words = set()
    for task in TASKS:
        module = task_module(task)
        specs = module.all_specs() if task == "shapes" else [s for k in module.KINDS for s in module.all_specs(k)]
        words.update(word for spec in specs for word in module.prompt_for(spec).split())
    return sorted(words | {"one"})


def build_toy_pipeline(seed=0, sizes=None):
    """An untrained toy StableDiffusion3Pipeline (in memory), weights drawn from `seed`.

    The tokenizers are the tiny SD3's character-level ones with every toy word
    (`toy_words`) as one extra token, so a prompt is at most 10 tokens."""
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from advantage_weighted_matching.tiny_sd3 import MAX_LENGTH_CLIP, _clip_tokenizer, _t5_tokenizer

    sizes = sizes or ToySizes()
    torch.manual_seed(seed)
    clip_tokenizer = _clip_tokenizer(toy_words())
    clip_tokenizer.model_max_length = sizes.text_length  # SD3 pads CLIP prompts to this length
    t5_tokenizer = _t5_tokenizer(toy_words())

    def clip_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=sizes.clip_dim, intermediate_size=2 * sizes.clip_dim,
                num_hidden_layers=2, num_attention_heads=2, projection_dim=sizes.clip_dim,
                max_position_embeddings=MAX_LENGTH_CLIP, bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, hidden_act="gelu",
            )
        )

    text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=sizes.t5_dim, d_kv=8, d_ff=2 * sizes.t5_dim, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    latent_size = TOY_RESOLUTION // 2 ** (len(sizes.vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels, num_layers=sizes.transformer_layers, attention_head_dim=sizes.head_dim,
        num_attention_heads=sizes.heads, joint_attention_dim=sizes.t5_dim,
        caption_projection_dim=sizes.heads * sizes.head_dim, pooled_projection_dim=2 * sizes.clip_dim,
        pos_embed_max_size=latent_size, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels), block_out_channels=tuple(sizes.vae_channels),
        layers_per_block=sizes.vae_layers_per_block, latent_channels=sizes.latent_channels,
        norm_num_groups=min(8, sizes.vae_channels[0]), sample_size=TOY_RESOLUTION, scaling_factor=1.0,
        shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=sizes.vae_mid_attention,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _to_model_range(images_uint8):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def _progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=5.0, leave=False)


def train_vae(vae, images, deadline, max_steps=None, batch_size=32, lr=2e-3, kl_weight=1e-4, generator=None):
    """Train `vae` on images [N, 3, H, W] in [-1, 1] until `deadline` (time.monotonic) or `max_steps`.

    loss = mean squared reconstruction error + kl_weight * KL / (latent elements). Returns
    (steps, recent mean reconstruction MSE).
    """
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    steps, recent = 0, []
    bar = _progress(max_steps, "vae")
    while (max_steps is None or steps < max_steps) and (time.monotonic() < deadline or steps == 0):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        recent = (recent + [mse.item()])[-20:]
        bar.update()
        bar.set_postfix(mse=f"{np.mean(recent):.4f}", kl=f"{kl.item():.2f}", refresh=False)
    bar.close()
    vae.eval()
    return steps, float(np.mean(recent))


@torch.no_grad()
def encode_dataset(vae, images, batch_size=256):
    """Posterior mean and std [N, C, h, w] of images [N, 3, H, W] in [-1, 1]."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_transformer(
    transformer, latents_mean, latents_std, prompt_index, embeds, pooled, deadline, max_steps=None, batch_size=32,
    lr=2e-3, warmup=50, ema_decay=0.99, time_shift=3.0, generator=None,
):
    """Flow-matching training of `transformer` on scaled latents until `deadline` / `max_steps`.

    latents_mean/std [N, C, h, w] are already shifted and scaled; prompt_index [N]
    points into embeds [P, L, D] / pooled [P, D']. Returns (EMA copy of the
    transformer, steps, recent mean loss).
    """
    from advantage_weighted_matching.objective import flow_matching_log_prob, noisy_latents
    from advantage_weighted_matching.rollout import velocity
    from advantage_weighted_matching.timesteps import continuous_times

    transformer.train()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    steps, recent = 0, []
    bar = _progress(max_steps, "transformer")
    while (max_steps is None or steps < max_steps) and (time.monotonic() < deadline or steps == 0):
        rows = torch.randint(len(latents_mean), (batch_size,), generator=generator)
        clean = latents_mean[rows] + latents_std[rows] * torch.randn(latents_mean[rows].shape, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        t = continuous_times("logit_normal", 1, batch_size, time_shift, generator)[0].float()
        x_t = noisy_latents(clean, noise, t)
        v = velocity(transformer, x_t, t, embeds[prompt_index[rows]], pooled[prompt_index[rows]])
        loss = -flow_matching_log_prob(v, noise, clean).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        steps += 1
        decay = min(ema_decay, (1 + steps) / (10 + steps))  # short warm-up of the EMA
        with torch.no_grad():
            for target, source in zip(ema.parameters(), transformer.parameters()):
                target.lerp_(source, 1 - decay)
        recent = (recent + [loss.item()])[-20:]
        bar.update()
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", refresh=False)
    bar.close()
    transformer.eval()
    return ema.eval(), steps, float(np.mean(recent))


def pretrain(
    out_dir, seed=0, task="scenes", vae_steps=300, transformer_steps=600, num_images=4096, sizes=None,
    max_minutes=None, recipe="", kinds=None, prompts=None, batch_size=32,
):
    """Build, train and save the toy pipeline to `out_dir`; returns the info dict (also
    saved as `toy_info.json`).

    `vae_steps` / `transformer_steps` optimizer steps of `batch_size` images, drawn from
    `num_images` images of `task` generated from `seed` (scenes: of prompt `kinds`, default all,
    or only `prompts`, "quickstart" for `toy.scenes.QUICKSTART_PROMPTS`). `max_minutes` (at most
    MAX_MINUTES; None: no cap) stops each phase early at its share of a wall-clock budget (the
    VAE a quarter), which makes the run depend on the machine's speed (``info["hit_time_cap"]``).
    """
    from advantage_weighted_matching.rollout import encode_prompts

    if max_minutes is not None and not 0 < max_minutes <= MAX_MINUTES:
        raise ValueError(f"max_minutes must be in (0, {MAX_MINUTES}], got {max_minutes}")
    start = time.monotonic()
    end = start + 60.0 * max_minutes if max_minutes else float("inf")
    sizes = ToySizes(**sizes) if isinstance(sizes, dict) else (sizes or ToySizes())
    generator = torch.Generator().manual_seed(seed)
    pipeline = build_toy_pipeline(seed, sizes)
    if prompts == "quickstart":
        from advantage_weighted_matching.toy.scenes import QUICKSTART_PROMPTS as prompts
    subset = {key: value for key, value in (("kinds", kinds), ("prompts", prompts)) if value}
    images_uint8, prompts, _ = task_module(task).make_dataset(num_images, seed, **subset)
    images = _to_model_range(images_uint8)
    timings = {"build_and_data_s": time.monotonic() - start}

    phase_start = time.monotonic()
    vae_deadline = phase_start + 0.25 * (end - phase_start)
    vae_done, vae_mse = train_vae(pipeline.vae, images, vae_deadline, vae_steps, batch_size, generator=generator)
    pipeline.vae.requires_grad_(False)
    mean, std = encode_dataset(pipeline.vae, images)
    shift_factor = float(mean.mean())
    scaling_factor = float(1.0 / (mean - shift_factor).std())
    pipeline.vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    latents_mean, latents_std = (mean - shift_factor) * scaling_factor, std * scaling_factor
    timings["vae_s"] = time.monotonic() - phase_start

    phase_start = time.monotonic()
    unique_prompts = sorted(set(prompts))
    position = {prompt: index for index, prompt in enumerate(unique_prompts)}
    embeds, pooled = encode_prompts(pipeline, unique_prompts, "cpu", sizes.text_length)
    prompt_index = torch.tensor([position[prompt] for prompt in prompts])
    ema, transformer_done, flow_loss = train_transformer(
        pipeline.transformer, latents_mean, latents_std, prompt_index, embeds, pooled, end, transformer_steps,
        batch_size, generator=generator,
    )
    pipeline.register_modules(transformer=ema)
    timings["transformer_s"] = time.monotonic() - phase_start
    timings["total_train_s"] = time.monotonic() - start

    info = {
        "recipe": recipe, "task": task, **{key: list(value) for key, value in subset.items()}, "seed": seed,
        "num_images": num_images,
        "batch_size": batch_size, "max_minutes": max_minutes,
        "hit_time_cap": vae_done < vae_steps or transformer_done < transformer_steps,
        "torch_threads": torch.get_num_threads(), "sizes": dataclasses.asdict(sizes), "resolution": TOY_RESOLUTION,
        "max_sequence_length": sizes.text_length, "vae_steps": vae_done, "vae_reconstruction_mse": vae_mse,
        "vae_shift_factor": shift_factor, "vae_scaling_factor": scaling_factor,
        "transformer_steps": transformer_done, "flow_matching_loss": flow_loss, "timings": timings,
    }
    save_pipeline_atomic(pipeline, out_dir, {"toy_info.json": json.dumps(info, indent=2) + "\n"})
    logger.info("toy pipeline saved to %s: %s", out_dir, json.dumps(info))
    return info


def ensure_toy_pipeline(out_dir, recipe="scenes", seed=0, threads=1):
    """Pretrain `RECIPES[recipe]` into `out_dir` unless it already holds a pipeline (model_index.json).

    Trains on `threads` torch CPU threads (restored afterwards): one thread makes the
    run reproducible, and on a shared 2-core machine it ran ~10x faster than two
    competing with other processes.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown toy recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    if not os.path.exists(os.path.join(out_dir, "model_index.json")):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            logger.info("pretraining the toy pipeline %r into %s (first use; cached afterwards)", recipe, out_dir)
            pretrain(out_dir, seed=seed, recipe=recipe, **RECIPES[recipe])
        finally:
            torch.set_num_threads(previous)
    return out_dir


@torch.no_grad()
def sample_and_score(
    pipeline, prompts, num_steps=16, seed=0, max_sequence_length=TOY_MAX_SEQUENCE_LENGTH, batch_size=32,
    task="scenes",
):
    """Euler-ODE samples of `prompts` and their `task` rewards.

    Returns (images [N, 3, 32, 32] in [0, 1], scores float64 [N], info dict of [N] arrays).
    """
    from advantage_weighted_matching.rewards import REWARDS
    from advantage_weighted_matching.rollout import encode_prompts, flow_sigmas, rollout

    scorer = REWARDS[task]("cpu", None)
    sigmas = flow_sigmas(pipeline.scheduler, num_steps)
    generator = torch.Generator().manual_seed(seed)
    images, scores, infos = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        embeds, pooled = encode_prompts(pipeline, batch, "cpu", max_sequence_length)
        result = rollout(
            pipeline, pipeline.transformer, embeds, pooled, sigmas, TOY_RESOLUTION, generator, deterministic=True,
        )
        batch_scores, info = scorer(result.images, batch, [{} for _ in batch])
        images.append(result.images)
        scores.append(batch_scores)
        infos.append(info)
    info = {key: np.concatenate([i[key] for i in infos]) for key in infos[0] if key != "num_failures"}
    return torch.cat(images), np.concatenate(scores), info


def _describe(info):
    """'count 0.61, colour 0.93, ...' from a scorer's info dict (accuracies averaged where they apply)."""
    parts = []
    for key, value in info.items():
        if key.endswith("accuracy"):
            valid = value[value != -10.0]
            parts.append(f"{key.replace('_accuracy', '')} {valid.mean():.3f}" if valid.size else "")
    return ", ".join(p for p in parts if p)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="pipeline directory to write")
    parser.add_argument("--recipe", default="scenes", choices=sorted(RECIPES), help="task and default step counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=None, help="VAE optimizer steps (default: the recipe's)")
    parser.add_argument("--transformer_steps", type=int, default=None, help="transformer steps (ditto)")
    parser.add_argument("--num_images", type=int, default=None, help="training images generated (ditto)")
    parser.add_argument("--max_minutes", type=float, default=None, help=f"wall-clock cap (max {MAX_MINUTES})")
    parser.add_argument("--eval_prompts", type=int, default=64, help="balanced test prompts to sample (0: no check)")
    parser.add_argument("--eval_steps", type=int, default=16, help="Euler steps of the check")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, and fastest on "
                        "a busy 2-core box)")
    args = parser.parse_args(argv)
    if args.max_minutes is not None and not 0 < args.max_minutes <= MAX_MINUTES:
        parser.error(f"--max_minutes must be in (0, {MAX_MINUTES}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.recipe])
    recipe.update({key: getattr(args, key) for key in ("vae_steps", "transformer_steps", "num_images")
                   if getattr(args, key) is not None})
    info = pretrain(args.out, args.seed, max_minutes=args.max_minutes, recipe=args.recipe, **recipe)
    print(
        f"pretrained in {info['timings']['total_train_s']:.0f} s: VAE {info['vae_steps']} steps "
        f"(reconstruction MSE {info['vae_reconstruction_mse']:.4f}), transformer {info['transformer_steps']} steps "
        f"(flow-matching loss {info['flow_matching_loss']:.4f}); saved to {args.out}"
    )
    if args.eval_prompts:
        from diffusers import StableDiffusion3Pipeline

        from advantage_weighted_matching.visualize import caption, image_grid

        task = recipe["task"]
        prompts = task_module(task).balanced_prompts(args.eval_prompts, args.seed)
        started = time.monotonic()
        pipeline = StableDiffusion3Pipeline.from_pretrained(args.out)
        images, scores, extra = sample_and_score(pipeline, prompts, args.eval_steps, args.seed, task=task)
        sample_s = time.monotonic() - started
        untrained = build_toy_pipeline(args.seed)
        _, random_scores, random_extra = sample_and_score(untrained, prompts, args.eval_steps, args.seed, task=task)
        grid_path = os.path.join(args.out, "samples.png")
        image_grid(images, [caption(p, s) for p, s in zip(prompts, scores)], columns=8, tile=128).save(grid_path)
        for name, values, more in (("pretrained", scores, extra), ("random", random_scores, random_extra)):
            print(f"{name:>10}: {task} reward {values.mean():.3f} ({_describe(more)}) over {len(prompts)} test "
                  f"prompts, {args.eval_steps} Euler steps")
        print(f"sampling + scoring {len(prompts)} prompts: {sample_s:.1f} s; grid: {grid_path}")


if __name__ == "__main__":
    main()
