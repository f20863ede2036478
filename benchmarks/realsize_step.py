"""Time and memory of the real-size AWM code paths on one GPU (random weights).

    python benchmarks/realsize_step.py --size sd35m --out realsize.json   # on a GPU
    python benchmarks/realsize_step.py --size tiny                        # CPU smoke test

Builds an SD3.5-Medium-shaped transformer (24 MMDiT layers, 13 dual-attention,
RMS qk-norm, width 1536) and the SD3 VAE with random weights (no download is
possible here; speed and memory do not depend on the values), the rank-32
attention LoRA with its `ema` adapter, and measures, with the preset's sizes
(512 px, 14 SA-Solver steps, 6 images per rollout batch, micro-batch 3 x 6
timesteps, fp16 autocast):

* one rollout batch (our SA-Solver + VAE decode) and, at the same number of
  transformer calls, `StableDiffusion3Pipeline.__call__` (Euler, same
  embeddings): their ratio is the rollout's overhead;
* one training micro-batch: policy forward/backward, base-model (KL) and
  `ema`-adapter (KL-EMA) forwards, through `objective.awm_loss`;
* peak GPU memory, and the epoch time of `geneval_sd3_no_cfg_1node`
  (36 rollout batches + 72 micro-batches per GPU) these imply.

Text encoders are left out (random prompt embeddings of the real shapes):
they run once per rollout batch and do not enter the training step.
"""

import argparse

import torch

SIZES = {
    "sd35m": dict(
        transformer=dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        resolution=512, text_tokens=77 + 128, text_dim=4096, pooled_dim=2048, lora_rank=32, lora_alpha=64,
    ),
    "tiny": dict(
        transformer=dict(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        resolution=32, text_tokens=77 + 8, text_dim=32, pooled_dim=32, lora_rank=4, lora_alpha=8,
    ),
}


def main():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from advantage_weighted_matching.lora import AdapterSwitch, adapter_parameters, add_lora, lora_config
    from advantage_weighted_matching.objective import awm_loss
    from advantage_weighted_matching.rollout import flow_sigmas, rollout, velocity
    from advantage_weighted_matching.timesteps import sample_train_times
    from overhead import interleaved_medians, wall_time, write_report  # benchmarks/, beside this script

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="sd35m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of both rollouts")
    args = parser.parse_args()
    spec = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True

    with torch.device(device):
        transformer = SD3Transformer2DModel(**spec["transformer"]).to(dtype)
        vae = AutoencoderKL(**spec["vae"])  # fp32: decode precision for the rewards, as in the trainer
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    lora_cfg = lora_config(spec["lora_rank"], spec["lora_alpha"], "gaussian", "attn")
    model = add_lora(transformer, lora_cfg, with_ema_adapter=True)
    for adapter in ("default", "ema"):
        for param in adapter_parameters(model, adapter):
            param.data = param.data.float()
    policy_params = adapter_parameters(model, "default")
    switch = AdapterSwitch(model)  # as the trainer switches adapters
    with torch.no_grad():  # a non-zero LoRA so policy, base and ema differ
        for param in policy_params:
            param.add_(torch.randn_like(param) * 1e-3)
    optimizer = torch.optim.AdamW(policy_params, lr=3e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    images_per_batch, micro, timesteps, num_steps = 6, 3, 6, 14
    embeds = torch.randn(images_per_batch, spec["text_tokens"], spec["text_dim"], device=device, dtype=dtype)
    pooled = torch.randn(images_per_batch, spec["pooled_dim"], device=device, dtype=dtype)
    sigmas = flow_sigmas(scheduler, num_steps)
    report = {"size": args.size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "trainable_lora_params": sum(p.numel() for p in policy_params),
              "transformer_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}

    def our_rollout():
        generator = torch.Generator(device).manual_seed(0)
        with autocast:
            return rollout(pipeline, model.get_base_model(), embeds, pooled, sigmas, spec["resolution"], generator,
                           use_sa_solver=True, noise_level=0.4)

    def diffusers_call():
        generator = torch.Generator(device).manual_seed(0)
        with autocast:
            return pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=num_steps,
                            guidance_scale=1.0, height=spec["resolution"], width=spec["resolution"],
                            generator=generator, output_type="pt").images

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report["rollout_batch_s"], report["diffusers_call_s"] = interleaved_medians(
        our_rollout, diffusers_call, args.repeats)
    report["rollout_overhead_ratio"] = report["rollout_batch_s"] / report["diffusers_call_s"]
    if device.type == "cuda":
        report["rollout_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    clean = our_rollout().latents[-1][:micro]
    rows = timesteps * micro
    row_embeds, row_pooled = embeds[:micro].repeat(timesteps, 1, 1), pooled[:micro].repeat(timesteps, 1)
    advantages = torch.randn(micro, device=device)
    generator = torch.Generator().manual_seed(0)

    def train_micro_batch():
        t = sample_train_times("discrete_wo_init", timesteps, micro, sigmas, 0.9, 3.0, generator)
        t = t.reshape(-1).to(device, torch.float32)
        noise = torch.randn(rows, *clean.shape[1:], device=device)
        clean_rows = clean.repeat(timesteps, 1, 1, 1)

        def v_policy(x, t):
            with autocast:
                return velocity(model, x, t, row_embeds, row_pooled, dtype=dtype)

        def v_ref(x, t):
            with switch.disabled(), autocast:
                return velocity(model.get_base_model(), x, t, row_embeds, row_pooled, dtype=dtype)

        def v_ema(x, t):
            with switch.use("ema"), autocast:
                return velocity(model.get_base_model(), x, t, row_embeds, row_pooled, dtype=dtype)

        loss, metrics = awm_loss(v_policy, clean_rows, noise, t, advantages, timesteps, weighting="ghuber",
                                 loss_type="exp_first", clip_range=1.0, beta=0.001, ref_velocity_fn=v_ref,
                                 ema_beta=1.0, ema_velocity_fn=v_ema)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(policy_params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(metrics["loss"]), metrics
        return metrics

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, fn in (("our_rollout", our_rollout), ("diffusers_call", diffusers_call)):
            with profile(activities=activities) as prof:
                fn()
            # GPU kernel time, then host time (synchronisations and launches show up there)
            sorts = ["cuda_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["cpu_time_total"]
            for sort in sorts:
                print(f"==== {name} by {sort}\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=50))

    train_micro_batch()  # warm-up
    report["train_micro_batch_s"] = sorted(wall_time(train_micro_batch) for _ in range(args.repeats))[args.repeats // 2]
    if device.type == "cuda":
        report["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # geneval_sd3_no_cfg_1node, per GPU: 36 rollout batches of 6, 72 micro-batches of 3 x 6 rows.
    report["estimated_epoch_s_geneval_1node"] = 36 * report["rollout_batch_s"] + 72 * report["train_micro_batch_s"]
    write_report(report, args.out)


if __name__ == "__main__":
    main()
