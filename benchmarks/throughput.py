"""Eager baseline and the optimised path side by side, in one process (issue I.4, and I.3 with --rewards).

    python benchmarks/throughput.py --size sd35m --rewards --out benchmarks/results/throughput_sd35m_h100.json
    python benchmarks/throughput.py --size flux --out benchmarks/results/throughput_flux_h100.json
    python benchmarks/throughput.py --size tiny --rewards          # CPU smoke test: the wiring, in well under a minute

Builds the transformer and VAE at the size's real shapes with random weights (SD3.5-Medium:
`realsize_step.SIZES`; FLUX.1-dev: `FLUX_SIZES`, bf16, gradient checkpointing as its presets),
the rank-32 attention LoRA with its ``ema`` adapter (both moved off their init so that policy,
base model and ``ema`` differ), and measures on the same weights, first the **eager** path,
then the **optimised** one (`speed.Settings` as ``"auto"`` resolves on CUDA: regional
compilation, fused AdamW; plus ``--batched-reference`` and larger ``--chunks``):

* rollouts: SA-Solver batches of the presets' 6 images (14 steps, VAE decode), through
  `rollout.ChunkedRollout` at each chunk size, seconds per image;
* the transformer forward at 6 images (the rollout forward) and its MFU;
* the AWM training micro-batch (policy forward and backward, base and KL-EMA forwards, as the
  trainer builds it) at each preset's rows, with and without gradient checkpointing: seconds,
  MFU and peak memory;
* one optimizer step (once per epoch in the presets);
* parity: the same seeds through both paths, max abs difference of the rollout latents (every
  step) and of the micro-batch losses, and the relative difference of the LoRA gradients.

The **implied epoch time per GPU** of each 1node preset is ``seconds per image x images per GPU
+ micro-batch seconds x micro-batches per GPU + one optimizer step``: text encoding is left out
(random prompt embeddings of the real shapes; the encoders run once per rollout batch) and the
rewards are assumed hidden behind sampling, which ``--rewards`` checks: it builds GenEval
(Mask2Former Swin-S + CLIP ViT-L/14) and PickScore (CLIP-H/14) at real shapes with random
weights (OCR: RapidOCR's own models, when installed), times each on a preset batch, and samples
a few rollout batches with the reward scored on a worker thread, as the trainer does.

FLOPs are counted once, eagerly, per image of the forward and per row of the micro-batch without
checkpointing (model FLOPs: MFU = FLOPs / seconds / ``--peak-tflops``); FLOPs are linear in the
rows. JSON goes to ``--out`` after every stage (a run cut short keeps what it measured).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from overhead import wall_time  # noqa: E402
from realsize_step import SIZES as SD3_SIZES  # noqa: E402

SD3_PRESETS = ("geneval_sd3_no_cfg_1node", "ocr_sd3_no_cfg_1node", "pickscore_sd3_no_cfg_1node")
FLUX_PRESETS = ("geneval_flux_1node", "ocr_flux_1node", "pickscore_flux_1node")
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SIZES = {
    "flux": dict(  # FLUX.1-dev: 19 double-stream and 38 single-stream blocks, width 3072, 11.9 B parameters
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=FLUX_VAE, resolution=512, text_tokens=512, text_dim=4096, pooled_dim=768, lora_rank=32, lora_alpha=64,
    ),
    "tiny_flux": dict(
        transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                         guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        vae={**FLUX_VAE, "latent_channels": 4, "block_out_channels": (8, 16), "down_block_types": (
            "DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1,
            "norm_num_groups": 4, "sample_size": 32},
        resolution=32, text_tokens=32, text_dim=32, pooled_dim=16, lora_rank=4, lora_alpha=8,
    ),
}
SIZE_NAMES = ("tiny", "sd35m", "tiny_flux", "flux")
OVERLAP_BATCHES = 4  # rollout batches sampled with a reward on the worker thread


# ---------------------------------------------------------------------------- setup
class Bench:
    """The model, the inputs and the presets' shapes, shared by both paths."""

    def __init__(self, args):
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                               SD3Transformer2DModel, StableDiffusion3Pipeline)

        from advantage_weighted_matching.backbones import SD3, Flux
        from advantage_weighted_matching.config import dgx_awm
        from advantage_weighted_matching.lora import AdapterSwitch, adapter_parameters, add_lora, lora_config

        self.args, self.flux = args, "flux" in args.size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        spec = (FLUX_SIZES if self.flux else SD3_SIZES)[args.size]
        self.spec, self.backbone = spec, Flux if self.flux else SD3
        presets = [getattr(dgx_awm, name)() for name in (FLUX_PRESETS if self.flux else SD3_PRESETS)]
        self.presets = {config.run_name: config for config in presets}
        first = presets[0]
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[first.mixed_precision] if self.cuda \
            else torch.float32
        self.batch, self.num_steps = first.sample.train_batch_size, first.sample.num_steps
        self.resolution = spec["resolution"]
        self.checkpointing = (True,) if self.flux else (False, True)  # FLUX.1-dev needs it (its presets use it)
        torch.manual_seed(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        build_dtype = torch.get_default_dtype()
        with torch.device(self.device):
            torch.set_default_dtype(self.dtype)  # FLUX.1-dev in fp32 would not fit beside its bf16 copy
            try:
                transformer = (FluxTransformer2DModel if self.flux else SD3Transformer2DModel)(**spec["transformer"])
            finally:
                torch.set_default_dtype(build_dtype)
            transformer.to(self.dtype)  # buffers built in float32 on purpose
            vae = AutoencoderKL(**spec["vae"])  # fp32: decode precision for the rewards, as in the trainer
        transformer.requires_grad_(False)
        vae.requires_grad_(False)
        if self.flux:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
            self.pipeline = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                                         tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        else:
            self.pipeline = StableDiffusion3Pipeline(
                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                tokenizer_3=None)
        self.pipeline.set_progress_bar_config(disable=True)
        self.model = add_lora(transformer, lora_config(spec["lora_rank"], spec["lora_alpha"], "gaussian", "attn",
                                                       self.backbone), with_ema_adapter=True)
        for adapter, scale in (("default", 1e-3), ("ema", 5e-4)):
            for param in adapter_parameters(self.model, adapter):
                param.data = param.data.float()  # fp32 master weights, as the trainer keeps them
                param.data.add_(torch.randn_like(param) * scale)  # policy, base and ema differ
        self.policy_params = adapter_parameters(self.model, "default")
        self.initial_params = [p.detach().clone() for p in self.policy_params]
        self.transformer, self.adapters = self.model.get_base_model(), AdapterSwitch(self.model)
        self.sigmas = self.backbone.sigmas(self.pipeline, self.num_steps, self.resolution)
        self.guidance = first.sample.guidance_scale
        generator = torch.Generator().manual_seed(1)
        self.prompts = [  # per rollout batch: (embeds [B, L, D], pooled [B, P]) of the real shapes
            (torch.randn(self.batch, spec["text_tokens"], spec["text_dim"], generator=generator).to(self.device,
                                                                                                    self.dtype),
             torch.randn(self.batch, spec["pooled_dim"], generator=generator).to(self.device, self.dtype))
            for _ in range(max(1, max(args.chunks) // self.batch))]
        # preset shapes: {(samples per micro-batch, timesteps): [preset names]}
        self.train_shapes = {}
        for name, config in self.presets.items():
            self.train_shapes.setdefault((config.train.batch_size, config.train.train_timesteps), []).append(name)
        if args.train_shapes == "first":
            self.train_shapes = dict(list(self.train_shapes.items())[:1])
        self.clean = self.backbone.initial_noise(self.pipeline, max(m for m, _ in self.train_shapes), self.resolution,
                                                 self.device, torch.Generator(self.device).manual_seed(2))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.cuda)

    def velocity(self, model, x, t, embeds, pooled):
        return self.backbone.velocity(model, x, t, embeds, pooled, guidance_scale=self.guidance, dtype=self.dtype)


class Path:
    """One side of the comparison: its switches, optimizer and gradient scaler."""

    def __init__(self, bench, name, compile_=False, batched=False, fused=False, chunks=(6,)):
        from advantage_weighted_matching.optim import build_optimizer

        self.bench, self.name, self.compile, self.batched, self.chunks = bench, name, compile_, batched, chunks
        self.fused = fused
        self.optimizer = build_optimizer(bench.policy_params, 3e-4, (0.9, 0.999), 1e-4, 1e-8, fused=fused)
        self.scaler = torch.amp.GradScaler(bench.device.type, enabled=bench.dtype == torch.float16)

    def settings(self):
        return {"compile": self.compile, "compile_mode": self.bench.args.compile_mode if self.compile else None,
                "batched_reference": self.batched, "fused_adam": self.fused, "rollout_chunks": list(self.chunks)}

    def rollout(self, chunk, batches=None, on_batch=None):
        """`batches` rollout batches (default: one per prompt batch; prompts cycle) through
        ChunkedRollout(chunk): the Rollout of each, in order, each also given to `on_batch` as soon
        as it is complete (the trainer's reward submission). Batch i's noise comes from seed 100 + i."""
        from advantage_weighted_matching.rollout import ChunkedRollout

        bench = self.bench
        batches = batches or len(bench.prompts)
        sampler = ChunkedRollout(bench.pipeline, bench.transformer, chunk, bench.sigmas, bench.resolution,
                                 use_sa_solver=True, noise_level=0.4, guidance_scale=bench.guidance,
                                 backbone=bench.backbone)
        results = []
        with bench.autocast(), torch.no_grad():
            for i in range(batches):
                embeds, pooled = bench.prompts[i % len(bench.prompts)]
                done = sampler.push(embeds, pooled, torch.Generator(bench.device).manual_seed(100 + i),
                                    last=i + 1 == batches)
                for result, _ in done:
                    if on_batch is not None:
                        on_batch(result)
                results += [result for result, _ in done]
        return results

    def micro_batch(self, samples, timesteps, seed):
        """One AWM micro-batch (loss and backward, gradients accumulate), as the trainer builds it."""
        from advantage_weighted_matching import speed
        from advantage_weighted_matching.objective import awm_loss
        from advantage_weighted_matching.timesteps import sample_train_times

        bench = self.bench
        config = bench.presets[next(iter(bench.presets))]
        embeds, pooled = bench.prompts[0]
        embeds, pooled = embeds[:samples].repeat(timesteps, 1, 1), pooled[:samples].repeat(timesteps, 1)
        clean = bench.clean[:samples].repeat(timesteps, 1, 1, 1)
        generator = torch.Generator().manual_seed(seed)
        t = sample_train_times(config.time_type, timesteps, samples, bench.sigmas, config.train.timestep_fraction,
                               config.time_shift, generator).reshape(-1).to(bench.device, torch.float32)
        noise = torch.randn(clean.shape, generator=generator).to(bench.device)
        advantages = torch.linspace(-1, 1, samples, device=bench.device)

        def policy_v(x, t):
            with bench.autocast():
                return bench.velocity(bench.model, x, t, embeds, pooled)

        def ref_v(x, t):
            with bench.adapters.disabled(), bench.autocast():
                return bench.velocity(bench.transformer, x, t, embeds, pooled)

        def ema_v(x, t):
            with bench.adapters.use("ema"), bench.autocast():
                return bench.velocity(bench.transformer, x, t, embeds, pooled)

        def both(x, t):
            with bench.autocast():
                return speed.reference_and_ema_velocity(bench.backbone, bench.transformer, bench.adapters, x, t,
                                                        embeds, pooled, guidance_scale=bench.guidance,
                                                        dtype=bench.dtype)

        ref_fn, ema_fn = speed.paired_reference(both) if self.batched else (ref_v, ema_v)
        loss, metrics = awm_loss(
            policy_v, clean, noise, t, advantages, timesteps, weighting=config.train.weighting,
            ghuber_power=config.train.ghuber_power, loss_type=config.train.loss_type,
            clip_range=config.train.clip_range, beta=config.train.beta, ref_velocity_fn=ref_fn,
            ema_beta=config.train.ema_beta, ema_velocity_fn=ema_fn)
        self.scaler.scale(loss).backward()
        return metrics

    def optimizer_step(self):
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.bench.policy_params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=False)


def set_checkpointing(bench, on):
    if on:
        bench.pipeline.transformer.enable_gradient_checkpointing()
    else:
        bench.pipeline.transformer.disable_gradient_checkpointing()


def sync(bench):
    if bench.cuda:
        torch.cuda.synchronize()


def zero_grads(bench):
    for param in bench.policy_params:
        param.grad = None


def peak_gib(bench):
    return torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else None


def reset_peak(bench):
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()


def median_time(fn, repeats):
    times = sorted(wall_time(fn) for _ in range(repeats))
    return times[len(times) // 2]


# ---------------------------------------------------------------------------- measurements
def count_model_flops(bench):
    """FLOPs of the transformer forward per image and of the AWM micro-batch per row (eager, no
    checkpointing, one image / one row: FLOPs are linear in the rows)."""
    from advantage_weighted_matching.throughput import count_flops

    embeds, pooled = bench.prompts[0]
    x = bench.clean[:1]
    with torch.no_grad(), bench.autocast():
        _, forward = count_flops(lambda: bench.velocity(bench.transformer, x, 0.5, embeds[:1], pooled[:1]))
    path = Path(bench, "count")
    _, train = count_flops(lambda: path.micro_batch(1, 1, seed=0))
    zero_grads(bench)
    return {"forward_per_image": forward, "train_per_row": train}


def measure_path(bench, path, flops, report, out):
    """Everything for one path; the report is written after each stage."""
    from advantage_weighted_matching import speed

    args, result = bench.args, {"settings": path.settings()}
    report["paths"][path.name] = result
    compile_before = speed.compile_seconds() or 0.0
    if path.compile:
        speed.compile_repeated_blocks(bench.transformer, bench.backbone.repeated_blocks, args.compile_mode,
                                      args.compile_backend)
    # parity first (the optimised path's first calls compile): the first preset's micro-batch, same seed
    samples, timesteps = next(iter(bench.train_shapes))
    warmed = {(samples, timesteps, bench.checkpointing[0])}  # the parity call is that shape's warm-up
    set_checkpointing(bench, bench.checkpointing[0])
    zero_grads(bench)
    start = time.perf_counter()
    metrics = path.micro_batch(samples, timesteps, seed=7)
    sync(bench)
    result["first_micro_batch_s"] = time.perf_counter() - start
    result["parity_micro_batch"] = {key: float(value) for key, value in metrics.items()}
    result["parity_grads"] = [p.grad.detach().float().clone() for p in bench.policy_params]
    zero_grads(bench)

    result["rollout"] = {}
    for chunk in path.chunks:
        start = time.perf_counter()
        latents = path.rollout(chunk)
        sync(bench)
        first = time.perf_counter() - start
        reset_peak(bench)
        seconds = median_time(lambda: path.rollout(chunk), args.repeats)
        images = len(bench.prompts) * bench.batch
        result["rollout"][str(chunk)] = {"first_call_s": first, "s_per_image": seconds / images,
                                         "batch_of_6_s": seconds / images * bench.batch, "peak_gib": peak_gib(bench)}
        result.setdefault("rollout_latents", {})[str(chunk)] = [[x.float().cpu() for x in r.latents] for r in latents]
        write(report, out)

    embeds, pooled = bench.prompts[0]
    x = torch.randn(bench.batch, *bench.clean.shape[1:], device=bench.device)

    def forward():
        with torch.no_grad(), bench.autocast():
            bench.velocity(bench.transformer, x, 0.5, embeds, pooled)

    forward()
    seconds = median_time(forward, max(args.repeats, 5))
    result["forward_6_images"] = {"s": seconds, "mfu": flops["forward_per_image"] * bench.batch / seconds / args.peak}
    write(report, out)

    result["micro_batch"] = {}
    for (samples, timesteps), names in bench.train_shapes.items():
        for checkpointing in bench.checkpointing:
            set_checkpointing(bench, checkpointing)
            key = f"{samples}x{timesteps}" + ("_checkpointed" if checkpointing else "")
            if (samples, timesteps, checkpointing) in warmed:
                first = result["first_micro_batch_s"]
            else:
                start = time.perf_counter()
                path.micro_batch(samples, timesteps, seed=1)  # warm-up (and compile)
                sync(bench)
                first = time.perf_counter() - start
            reset_peak(bench)
            seconds = median_time(lambda: path.micro_batch(samples, timesteps, seed=1), args.repeats)
            rows = samples * timesteps
            result["micro_batch"][key] = {
                "presets": names, "rows": rows, "first_call_s": first, "s": seconds, "peak_gib": peak_gib(bench),
                "mfu": flops["train_per_row"] * rows / seconds / args.peak,
            }
            zero_grads(bench)
            write(report, out)
    set_checkpointing(bench, False)

    for p in bench.policy_params:  # an optimizer step on accumulated gradients, once per epoch in the presets
        p.grad = torch.randn_like(p) * 1e-3
    path.optimizer_step()
    for p in bench.policy_params:
        p.grad = torch.randn_like(p) * 1e-3
    result["optimizer_step_s"] = wall_time(path.optimizer_step)
    with torch.no_grad():  # back to the shared weights for the next path
        for p, initial in zip(bench.policy_params, bench.initial_params):
            p.copy_(initial)
    zero_grads(bench)
    result["compile_s"] = (speed.compile_seconds() or 0.0) - compile_before if path.compile else 0.0
    write(report, out)
    return result


def implied_epochs(bench, paths):
    """Seconds per GPU per epoch of each preset, per path (rewards hidden, text encoders left out)."""
    epochs = {}
    for name, config in bench.presets.items():
        images = config.sample.train_batch_size * config.sample.num_batches_per_epoch
        micro_batches = config.sample.train_batch_size // config.train.batch_size * config.sample.num_batches_per_epoch
        shape = (config.train.batch_size, config.train.train_timesteps)
        row = {"images_per_gpu": images, "micro_batches_per_gpu": micro_batches}
        for path_name, result in paths.items():
            per_image = min(r["s_per_image"] for chunk, r in result["rollout"].items()
                            if images % int(chunk) == 0)
            for checkpointing in bench.checkpointing:
                key = "_checkpointed" if checkpointing else ""
                entry = result["micro_batch"].get(f"{shape[0]}x{shape[1]}{key}")
                estimated = entry is None  # --train-shapes first: scale the measured shape by its rows
                if estimated:
                    entry = next(v for k, v in result["micro_batch"].items()
                                 if k.endswith("_checkpointed") == checkpointing)
                micro_s = entry["s"] * (shape[0] * shape[1] / entry["rows"] if estimated else 1.0)
                label = path_name + key
                row[label] = per_image * images + micro_s * micro_batches + result["optimizer_step_s"]
                if estimated:
                    row[label + "_estimated"] = True
        base = "eager" + ("_checkpointed" if bench.checkpointing == (True,) else "")
        fast = "optimised" + ("_checkpointed" if bench.checkpointing == (True,) else "")
        if base in row and fast in row:
            row["ratio"] = row[fast] / row[base]
        epochs[name] = row
    return epochs


def parity(bench, eager, optimised):
    """Max abs differences between the paths on the same seeds."""
    out = {"rollout_latents_max_abs": {}}
    reference = eager["rollout_latents"][str(bench.batch)]
    for chunk, batches in optimised["rollout_latents"].items():
        out["rollout_latents_max_abs"][chunk] = max(
            float((x - y).abs().max()) for got, want in zip(batches, reference) for x, y in zip(got, want))
    out["rollout_latents_scale"] = max(float(x.abs().max()) for x in reference[0])
    a, b = eager["parity_micro_batch"], optimised["parity_micro_batch"]
    out["loss_abs"] = abs(a["loss"] - b["loss"])
    out["losses"] = {key: [a[key], b[key]] for key in a}
    out["grad_rel"] = max(float((g - h).abs().max() / g.abs().max().clamp_min(1e-30))
                          for g, h in zip(eager["parity_grads"], optimised["parity_grads"]))
    return out


# ---------------------------------------------------------------------------- rewards (issue I.3)
def build_rewards(bench):
    """{name: fn(images [B, 3, H, W] in [0, 1]) -> scores}, the rewards' own scoring code on models
    built in memory with random weights (their __init__ only loads weights, which cannot be
    downloaded here), at real shapes (tiny ones for the CPU sizes)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerConfig,
                              Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig)

    from advantage_weighted_matching.rewards.geneval import GenevalScorer, load_object_names
    from advantage_weighted_matching.rewards.pickscore import PickScoreScorer
    from advantage_weighted_matching.tiny_sd3 import _clip_tokenizer

    real = bench.args.size in ("sd35m", "flux")
    device, tokenizer = bench.device, _clip_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77)

    def clip(text, vision, projection, image_size):
        config = CLIPConfig(text_config=dict(vocab_size=49408 if real else len(tokenizer), **text, **ids),
                            vision_config=dict(image_size=image_size, **vision), projection_dim=projection)
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer)
        with torch.device(device):
            return CLIPModel(config).eval().requires_grad_(False), processor

    if real:
        vit_l = clip(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=14), 768, 224)  # openai/clip-vit-large-patch14
        vit_h = clip(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                     dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                          patch_size=14), 1024, 224)  # CLIP-H/14 (PickScore_v1)
        swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=["stage1", "stage2", "stage3", "stage4"])  # Swin-S
        detector_config = dict(backbone_config=swin)  # Mask2Former defaults: 100 queries, 6 + 10 layers, width 256
        detector_processor = Mask2FormerImageProcessor()  # shortest edge 800, longest 1333 (COCO test size)
    else:
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        vit_l = clip(small, {**small, "patch_size": 8}, 16, 64)
        vit_h = clip(small, {**small, "patch_size": 8}, 16, 64)
        swin = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
        detector_config = dict(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=4)
        detector_processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    id2label = {i: f"class{i}" for i in range(80)}
    id2label[16] = "dog"
    with torch.device(device):
        detector = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
            id2label=id2label, label2id={v: k for k, v in id2label.items()}, **detector_config)).eval()
    detector.requires_grad_(False)

    geneval = GenevalScorer.__new__(GenevalScorer)
    geneval.device, geneval.batch_size, geneval.detector_dtype = device, 16, torch.float32
    geneval.detector_processor, geneval.detector = detector_processor, detector
    geneval.class_names = load_object_names("", id2label)
    geneval.clip_model, geneval.clip_processor = vit_l
    geneval.clip_dtype, geneval._colour_text_embeddings = torch.float32, {}
    pickscore = PickScoreScorer.__new__(PickScoreScorer)
    pickscore.device, pickscore.batch_size, pickscore.model_dtype = device, 16, torch.float32
    pickscore.model, pickscore.processor = vit_h
    metadata = {"tag": "colors", "prompt": "a red dog", "include": [{"class": "dog", "count": 1, "color": "red"}]}

    def geneval_fn(images):
        scores, _ = geneval.score_batch(images, [metadata] * len(images))
        # a random detector finds no objects, so the colour classifier would not run: classify two
        # crops per image (GenEval prompts name 1-4 objects), as a trained detector's finds would
        side = images.shape[-1] // 4
        crops = [(image.permute(1, 2, 0)[:side, :side] * 255).byte().cpu().numpy() for image in images
                 for _ in range(2)]
        geneval.classify_crops("dog", crops)
        return scores

    rewards = {"geneval": geneval_fn,
               "pickscore": lambda images: pickscore.score_batch(images, ["a photo of a cat"] * len(images))[0]}
    if not real:  # RapidOCR ships its real models only: nothing tiny to wire
        rewards["ocr_unavailable"] = "RapidOCR has real-size models only; timed at the real sizes"
        return rewards
    try:
        from advantage_weighted_matching.rewards.ocr import OcrScorer

        ocr = OcrScorer()
        rewards["ocr"] = lambda images: ocr.score_batch(images, ['a sign that says "open"'] * len(images))[0]
    except ImportError as error:  # RapidOCR is an optional dependency (pip install '.[ocr]')
        rewards["ocr_unavailable"] = f"RapidOCR not installed: {error}"
    return rewards


def measure_rewards(bench, path, report, out):
    """Each reward alone on a preset batch, then sampling with the reward on a worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    rewards = build_rewards(bench)
    result = {"unavailable": {k: v for k, v in rewards.items() if isinstance(v, str)}}
    report["rewards"] = result
    images = torch.rand(bench.batch, 3, bench.resolution, bench.resolution, generator=torch.Generator().manual_seed(3))
    images = images.to(bench.device)
    rollout_s = path_rollout_batch_s(report, path)
    for name, fn in rewards.items():
        if isinstance(fn, str):
            continue
        fn(images)  # warm-up
        seconds = median_time(lambda: fn(images), bench.args.repeats)
        entry = {"batch_s": seconds, "images_per_s": bench.batch / seconds, "rollout_batch_s": rollout_s,
                 "hidden": seconds <= rollout_s}
        # the trainer's overlap: reward of batch i on a worker thread while batch i + 1 samples
        with ThreadPoolExecutor(max_workers=1) as pool:
            start = time.perf_counter()
            futures = []
            path.rollout(bench.batch, OVERLAP_BATCHES, on_batch=lambda r: futures.append(pool.submit(fn, r.images)))
            sync(bench)
            sampled = time.perf_counter() - start
            for future in futures:
                future.result()
            entry["overlap"] = {"batches": len(futures), "sample_s": sampled,
                                "reward_tail_s": time.perf_counter() - start - sampled}
        alone = median_time(lambda: path.rollout(bench.batch, OVERLAP_BATCHES), 1)
        entry["overlap"]["sample_alone_s"] = alone
        entry["overlap"]["sampling_slowdown"] = sampled / alone
        result[name] = entry
        write(report, out)
    return result


def path_rollout_batch_s(report, path):
    return report["paths"][path.name]["rollout"][str(path.bench.batch)]["batch_of_6_s"]


# ---------------------------------------------------------------------------- report
def write(report, out):
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(_jsonable(report), f, indent=1)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k not in ("rollout_latents", "parity_grads")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def targets(bench, report):
    """Issue I's targets, each with its measured value (None where this size does not measure it)."""
    eager, fast = report["paths"]["eager"], report["paths"]["optimised"]
    ratios = [row.get("ratio") for row in report["implied_epoch_s"].values()]
    checkpointed = [v["peak_gib"] for k, v in fast["micro_batch"].items() if k.endswith("_checkpointed")]
    plain = {k: v for k, v in fast["micro_batch"].items() if not k.endswith("_checkpointed")}
    slowdown = [fast["micro_batch"][k + "_checkpointed"]["s"] / v["s"] for k, v in plain.items()
                if k + "_checkpointed" in fast["micro_batch"]]
    tol = bench.args.parity_tolerance
    out = {
        "epoch_time_ratio_max": [max(ratios) if all(r is not None for r in ratios) else None, 0.45],
        "train_mfu_min": [min(v["mfu"] for v in fast["micro_batch"].values()), 0.45],
        "rollout_forward_mfu": [fast["forward_6_images"]["mfu"], 0.35],
        "compile_s": [fast["compile_s"], 60.0],
        # the 12 GiB bound is SD3.5-Medium's (a 24 GB card); FLUX.1-dev's bf16 weights alone are 22 GiB
        "checkpointed_peak_gib_max": [max(checkpointed) if checkpointed and bench.cuda and not bench.flux else None,
                                      12.0],
        "checkpointing_slowdown_max": [max(slowdown) if slowdown else None, 1.20],
        "parity_latents_max_abs": [max(report["parity"]["rollout_latents_max_abs"].values()), tol["latents"]],
        "parity_loss_abs": [report["parity"]["loss_abs"], tol["loss"]],
    }
    del eager
    met = {}
    for key, (value, bound) in out.items():
        larger_is_better = key.endswith("mfu") or key == "train_mfu_min"
        met[key] = {"value": value, "target": bound,
                    "met": None if value is None else (value >= bound if larger_is_better else value <= bound)}
    return met


def print_table(report):
    lines = [f"throughput, {report['size']} on {report['device']} ({report['dtype']})", ""]
    lines.append("| preset | eager s/epoch/GPU | optimised s/epoch/GPU | ratio |")
    lines.append("|---|---|---|---|")
    for name, row in report.get("implied_epoch_s", {}).items():
        eager = row.get("eager", row.get("eager_checkpointed"))
        fast = row.get("optimised", row.get("optimised_checkpointed"))
        lines.append(f"| {name} | {eager:.1f} | {fast:.1f} | {row.get('ratio', float('nan')):.2f} |")
    lines += ["", "| path | rollout s/image (chunk) | forward 6 img s (MFU) | micro-batch s (MFU, peak GiB) "
                  "| compile s |", "|---|---|---|---|---|"]
    for name, path in report["paths"].items():
        rollout = ", ".join(f"{v['s_per_image']:.4f} ({k})" for k, v in path.get("rollout", {}).items())
        forward = path.get("forward_6_images", {})
        micro = "; ".join(f"{k}: {v['s']:.3f} ({v['mfu']:.0%}, {v['peak_gib'] or 0:.1f})"
                          for k, v in path.get("micro_batch", {}).items())
        lines.append(f"| {name} | {rollout} | {forward.get('s', 0):.4f} ({forward.get('mfu', 0):.0%}) | {micro} | "
                     f"{path.get('compile_s', 0):.1f} |")
    if "parity" in report:
        p = report["parity"]
        lines += ["", f"parity: rollout latents max abs {p['rollout_latents_max_abs']} (latent scale "
                      f"{p['rollout_latents_scale']:.2f}), loss abs {p['loss_abs']:.3g}, grad rel {p['grad_rel']:.3g}"]
    for name, entry in report.get("rewards", {}).items():
        if name != "unavailable":
            lines.append(f"reward {name}: {entry['images_per_s']:.1f} images/s, {entry['batch_s']:.3f} s per batch vs "
                         f"rollout {entry['rollout_batch_s']:.3f} s: hidden={entry['hidden']}, sampling slowdown "
                         f"{entry['overlap']['sampling_slowdown']:.2f}")
    for key, value in report.get("targets", {}).items():
        lines.append(f"target {key}: {value}")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZE_NAMES, default="sd35m")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median), after a warm-up")
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="optimised rollout chunk sizes (default: 6 12; FLUX 6)")
    parser.add_argument("--batched-reference", choices=("on", "off"), default="on")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--train-shapes", choices=("all", "first"), default=None,
                        help="micro-batch shapes to measure (default: all; FLUX first, the others scaled by rows)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak (H100 SXM 989)")
    parser.add_argument("--rewards", action="store_true", help="also time the rewards at real shapes (issue I.3)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    flux = "flux" in args.size
    args.chunks = tuple(args.chunks or ((6,) if flux else (6, 12)))
    args.train_shapes = args.train_shapes or ("first" if args.size == "flux" else "all")
    cuda = torch.cuda.is_available()
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    args.peak = args.peak_tflops * 1e12
    # parity tolerances: fp16 / bf16 rounding of two differently fused computations (CPU: float32)
    args.parity_tolerance = {"latents": 0.05 if cuda else 1e-4, "loss": 1e-3 if cuda else 1e-6}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    threads = torch.get_num_threads()
    if not cuda:  # tiny CPU sizes: one thread runs tiny ops far faster than two contending for shared cores
        torch.set_num_threads(1)
    try:
        return run(args, argv, cuda)
    finally:
        torch.set_num_threads(threads)


def run(args, argv, cuda):
    started = time.perf_counter()
    bench = Bench(args)
    report = {
        "size": args.size, "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(bench.dtype), "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(["python benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "batch": bench.batch, "num_steps": bench.num_steps, "resolution": bench.resolution,
        "compile_backend": args.compile_backend, "parity_tolerance": args.parity_tolerance, "paths": {},
    }
    report["flops"] = count_model_flops(bench)
    write(report, args.out)
    eager = measure_path(bench, Path(bench, "eager", chunks=(bench.batch,)), report["flops"], report, args.out)
    fast_path = Path(bench, "optimised", compile_=True, batched=args.batched_reference == "on", fused=cuda,
                     chunks=args.chunks)
    fast = measure_path(bench, fast_path, report["flops"], report, args.out)
    report["parity"] = parity(bench, eager, fast)
    report["implied_epoch_s"] = implied_epochs(bench, report["paths"])
    report["targets"] = targets(bench, report)
    write(report, args.out)
    if args.rewards:
        measure_rewards(bench, fast_path, report, args.out)
    report["wall_s"] = time.perf_counter() - started
    write(report, args.out)
    print_table(report)
    return _jsonable(report)


if __name__ == "__main__":
    main()
