"""Trainer and rollout overhead, measured on CPU (issue F.4).

    python benchmarks/overhead.py [--model DIR] [--epochs 4] [--out benchmarks/results/overhead_cpu.json]

1. Trainer overhead = epoch wall time / time inside model calls (transformer,
   VAE decoder, the three text encoders), from the real training script run
   in-process on the tiny (or a given) SD3 pipeline. Model time is the wall
   time inside the outermost forward calls of those modules (forward hooks,
   synchronised on GPU) plus the whole `accelerator.backward` call, whose cost
   is the transformer's backward pass (the loss's own backward is a handful of
   elementwise ops). Module backward hooks cannot time that pass: the noisy
   latents fed to the transformer do not require grad, so torch fires the
   "full" backward hook as soon as the output gradient arrives, before the
   transformer's backward has run.
2. Rollout overhead = our SA-Solver rollout / `StableDiffusion3Pipeline.__call__`
   at the same number of transformer calls and the same prompt embeddings.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class ModelTimer:
    """Accumulates wall time inside the outermost calls of the hooked modules."""

    def __init__(self):
        self.total, self.depth, self.started, self.calls = 0.0, 0, 0.0, 0

    def pre(self, module, args):
        if self.depth == 0:
            if torch.cuda.is_available():  # GPU work is asynchronous: time it to completion
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        self.depth += 1

    def post(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.total += time.perf_counter() - self.started
            self.calls += 1

    def attach(self, modules):
        for module in modules:
            module.register_forward_pre_hook(self.pre)
            module.register_forward_hook(self.post)

    def wrap(self, fn):
        """`fn` timed as one model call (used for the backward pass)."""
        def timed(*args, **kwargs):
            self.pre(None, None)
            try:
                return fn(*args, **kwargs)
            finally:
                self.post(None, None, None)
        return timed


def wall_time(fn):
    """Wall seconds of fn(), the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(first, second, repeats):
    """Median wall times of first() and second(), run in alternation after one
    warm-up each, so both see the same clocks, caches and allocator state."""
    first(), second()
    pairs = [(wall_time(first), wall_time(second)) for _ in range(repeats)]
    return sorted(p[0] for p in pairs)[repeats // 2], sorted(p[1] for p in pairs)[repeats // 2]


def write_report(report, out):
    """Print the report and, when `out` is given, write it there as JSON."""
    print(json.dumps(report, indent=1))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def trainer_overhead(model_dir, epochs, preset, overrides=()):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline
    from test_train_e2e import run_training

    timer = ModelTimer()
    original = StableDiffusion3Pipeline.from_pretrained.__func__

    def timed_from_pretrained(cls, *args, **kwargs):
        pipeline = original(cls, *args, **kwargs)
        timer.attach([pipeline.transformer, pipeline.vae.decoder, pipeline.text_encoder, pipeline.text_encoder_2,
                      pipeline.text_encoder_3])
        return pipeline

    StableDiffusion3Pipeline.from_pretrained = classmethod(timed_from_pretrained)
    original_backward = Accelerator.backward
    Accelerator.backward = timer.wrap(original_backward)
    try:
        with tempfile.TemporaryDirectory() as save_dir:
            metrics = run_training(save_dir, model_dir, f"--config.num_epochs={epochs}", "--config.eval_freq=0",
                                   "--config.save_freq=0", "--config.log_image_freq=0", *overrides, preset=preset)
    finally:
        StableDiffusion3Pipeline.from_pretrained = classmethod(original)
        Accelerator.backward = original_backward
    epoch_wall = sum(m["timing/sample"] + m["timing/reward_wait"] + m["timing/train"] for m in metrics)
    return {"epochs": epochs, "epoch_wall_s": epoch_wall, "model_s": timer.total, "model_calls": timer.calls,
            "trainer_overhead": epoch_wall / timer.total}


def rollout_overhead(model_dir, num_steps, batch, resolution, repeats=11):
    from diffusers import StableDiffusion3Pipeline

    from advantage_weighted_matching.lora import add_lora, lora_config
    from advantage_weighted_matching.rollout import encode_prompts, flow_sigmas, rollout

    pipeline = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    model = add_lora(pipeline.transformer, lora_config(4, 8, "gaussian", "attn"), with_ema_adapter=True)
    embeds, pooled = encode_prompts(pipeline, ["a red cup on a table"] * batch, "cpu")
    sigmas = flow_sigmas(pipeline.scheduler, num_steps)

    def ours():
        rollout(pipeline, model.get_base_model(), embeds, pooled, sigmas, resolution,
                torch.Generator().manual_seed(0), use_sa_solver=True, noise_level=0.4)

    def diffusers_call():
        pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=num_steps, guidance_scale=1.0,
                 height=resolution, width=resolution, generator=torch.Generator().manual_seed(0), output_type="pt")

    ours_s, diffusers_s = interleaved_medians(ours, diffusers_call, repeats)
    return {"num_steps": num_steps, "batch": batch, "ours_s": ours_s, "diffusers_call_s": diffusers_s,
            "rollout_overhead": ours_s / diffusers_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="SD3 pipeline dir (default: build the tiny one in a temp dir)")
    parser.add_argument("--preset", default="tiny_cpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "overhead_cpu.json"))
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from advantage_weighted_matching.tiny_sd3 import build_tiny_sd3

            model_dir = build_tiny_sd3(os.path.join(tmp, "tiny"), seed=0)
        report = {
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
            "model": args.model or "tiny SD3 (advantage_weighted_matching.tiny_sd3, seed 0)",
            # rollout first: the in-process training run leaves global state (threads, autocast caches)
            # that slowed the later rollout timing by half in one measurement
            "rollout": rollout_overhead(model_dir, num_steps=14, batch=6, resolution=32),
            "trainer": trainer_overhead(model_dir, args.epochs, args.preset),
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
