r"""Evaluate a trained LoRA (or the base model) on a prompt split, offline.

    python -m advantage_weighted_matching.evaluate --checkpoint DIR \
        --config advantage_weighted_matching/config/dgx_awm.py:PRESET [--split test] [--output OUT_DIR] \
        [--lora lora|ema_lora] [--config.key=value ...]

`--checkpoint` is a checkpoint dir (holding `lora/` and maybe `ema_lora/`), a
LoRA dir (`pytorch_lora_weights.safetensors`), a run dir (its latest complete
checkpoint), or `none` for the base model. The split's prompts are sampled
exactly as the training loop's evaluation does (Euler ODE, `eval_num_steps`,
fixed seeds: the same checkpoint always gives the same images) and scored with
the preset's rewards (GenEval: correctness, not only strict). Writes to OUT_DIR
(default `{checkpoint}/eval_{split}`, `eval_ema_lora_{split}` for --lora
ema_lora): `summary.json`, `scores.jsonl` (one line per image) and `grid.png`.

Precision: on CUDA the preset's mixed_precision (fp16/bf16) is used for the
transformer and text encoders under torch.autocast (VAE in fp32); on CPU
everything runs in float32 whatever the preset says.

Config, checkpoint and prompts are checked before any model is loaded.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# light imports only: bad input fails before torch or any model loads
from advantage_weighted_matching.config import ConfigError, validate
from advantage_weighted_matching.paths import LORA_WEIGHT_NAME

FLAGS = flags.FLAGS


def define_flags():
    """Registered at run time, not import time: the training script defines its own --config."""
    config_flags.DEFINE_config_file("config", None, "Config file and preset: path/to/file.py:PRESET.", lock_config=True)
    flags.DEFINE_string(
        "checkpoint", None,
        "Checkpoint dir (with lora/, maybe ema_lora/), LoRA dir, run dir (latest checkpoint), or 'none' (base model).",
    )
    flags.DEFINE_enum("split", "test", ["test", "train"], "Prompt split to evaluate.")
    flags.DEFINE_string(
        "output", None,
        "Output dir (default {checkpoint}/eval_{split}; base model: {logdir}/eval_base_{run_name}_{split}).",
    )
    flags.DEFINE_enum("lora", "lora", ["lora", "ema_lora"], "Adapter of a checkpoint dir: the policy or its weight-EMA.")
    flags.DEFINE_integer(
        "num_processes", None,
        "Process count the config is validated for (the training batch plan only; evaluation runs in one process). "
        "Default: the checkpoint's config.json, else the preset's PRESET_NUM_PROCESSES, else 1.",
    )
    flags.mark_flags_as_required(["config", "checkpoint"])


class EvaluateError(ValueError):
    """Bad command-line input (checkpoint, output); the message says what and where."""


def resolve_checkpoint(path, lora="lora"):
    """-> (checkpoint_dir, lora_dir): both None for 'none'. No model is touched."""
    if path.lower() == "none":
        return None, None
    if not os.path.exists(path):
        raise EvaluateError(f"--checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise EvaluateError(f"--checkpoint {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):  # a LoRA dir itself
        if lora != "lora":
            raise EvaluateError(f"--checkpoint {path!r} is a LoRA dir; --lora={lora} needs a checkpoint dir")
        return path, path
    if not os.path.isdir(os.path.join(path, "lora")):  # a run dir or its checkpoints/ folder
        from advantage_weighted_matching.checkpoint import resolve_resume_path

        try:
            path = resolve_resume_path(path)
        except FileNotFoundError as error:
            raise EvaluateError(
                f"--checkpoint {path!r} is neither a checkpoint dir (lora/), a LoRA dir ({LORA_WEIGHT_NAME}) "
                f"nor a run dir with a complete checkpoint ({error})"
            ) from error
    lora_dir = os.path.join(path, lora)
    if not os.path.isfile(os.path.join(lora_dir, LORA_WEIGHT_NAME)):
        raise EvaluateError(f"--checkpoint {path!r}: no {LORA_WEIGHT_NAME} in {lora_dir}")
    return path, lora_dir


def _checkpoint_config(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "config.json") if checkpoint_dir else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _preset_num_processes(config_spec):
    """PRESET_NUM_PROCESSES[preset] of the config module, if it defines one."""
    import importlib.util

    file_name, _, preset = config_spec.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_awm_eval_config", file_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return int(getattr(module, "PRESET_NUM_PROCESSES", {}).get(preset, 1))
    except Exception:  # noqa: BLE001 - only a default; config_flags already loaded the file
        return 1


def _load_lora(pipeline, lora_dir):
    """`load_lora_weights` (diffusers format), then check every saved tensor found its layer."""
    from safetensors import safe_open

    with safe_open(os.path.join(lora_dir, LORA_WEIGHT_NAME), "pt") as f:
        saved = [key for key in f.keys() if "lora_A" in key or "lora_B" in key]
    pipeline.load_lora_weights(lora_dir, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
    loaded = [name for name, _ in pipeline.transformer.named_parameters() if "lora_A" in name or "lora_B" in name]
    if not saved or len(loaded) != len(saved):
        raise ValueError(
            f"LoRA at {lora_dir} does not fit this transformer: {len(saved)} LoRA tensors saved, "
            f"{len(loaded)} loaded (check pretrained.model)"
        )


def main(_):
    config = FLAGS.config
    config_spec = config_flags.get_config_filename(FLAGS["config"])
    split = FLAGS.split
    try:
        checkpoint_dir, lora_dir = resolve_checkpoint(FLAGS.checkpoint, FLAGS.lora)  # fails fast: before torch
        saved_config = _checkpoint_config(checkpoint_dir)
        num_processes = (FLAGS.num_processes or saved_config.get("num_processes")
                         or _preset_num_processes(config_spec))
        validate(config, num_processes)  # before any model is loaded
        from advantage_weighted_matching.prompts import load_prompts

        prompts, metadata = load_prompts(config.dataset, config.prompt_fn, split, "ocr" in config.reward_fn)
    except (EvaluateError, ConfigError, ValueError) as error:  # PromptFileError is a ValueError
        sys.exit(f"evaluate: {error}")
    if FLAGS.output:
        out_dir = FLAGS.output
    elif checkpoint_dir:
        out_dir = os.path.join(checkpoint_dir, f"eval_{split}" if FLAGS.lora == "lora" else f"eval_ema_lora_{split}")
    else:
        out_dir = os.path.join(config.logdir, f"eval_base_{config.run_name or 'awm'}_{split}")
    saved_model = saved_config.get("pretrained", {}).get("model")
    if saved_model and saved_model != config.pretrained.model:
        print(f"evaluate: warning: the checkpoint was trained on {saved_model!r}, evaluating on "
              f"{config.pretrained.model!r}", file=sys.stderr)

    import torch
    from tqdm.auto import tqdm

    from advantage_weighted_matching.evaluation import evaluate, summarize
    from advantage_weighted_matching.prompts import eval_indices
    from advantage_weighted_matching.backbones import ensure_local_pipeline, get_backbone
    from advantage_weighted_matching.visualize import caption, image_grid

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    inference_dtype = mixed if (mixed is not None and device.type == "cuda") else torch.float32
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---------------------------------------------------------------- models
    backbone = get_backbone(config.pretrained.backbone)
    ensure_local_pipeline(config.pretrained)  # the tiny / toy CPU pipelines, built on first use
    pipeline = backbone.load_pipeline(config.pretrained.model, config.pretrained.revision, inference_dtype, device)
    if lora_dir:
        _load_lora(pipeline, lora_dir)
    pipeline.transformer.eval()

    from advantage_weighted_matching.rewards import multi_score

    reward_fn = multi_score(config.rewards.device or device, dict(config.reward_fn), config.rewards)
    eval_sigmas = backbone.sigmas(pipeline, config.sample.eval_num_steps, config.resolution)
    negative = backbone.encode_prompts(pipeline, [""], device, config.max_sequence_length) \
        if backbone.uses_cfg(config.sample.guidance_scale) else None
    autocast = (lambda: torch.autocast("cuda", dtype=inference_dtype)) if inference_dtype != torch.float32 else None
    load_seconds = time.perf_counter() - start

    # ---------------------------------------------------------------- sample + score
    batch_size, limit = config.sample.test_batch_size, config.sample.num_eval_images
    num_batches = len(eval_indices(len(prompts), 1, batch_size, 0, limit))
    start = time.perf_counter()
    with tqdm(total=num_batches, desc=f"eval {split}", unit="batch") as bar:
        rewards, images, image_prompts, num_failures = evaluate(
            pipeline, pipeline.transformer, prompts, metadata, reward_fn, sigmas=eval_sigmas,
            resolution=config.resolution, batch_size=batch_size, rank=0, num_processes=1, gather=lambda x: x,
            seed=config.seed, device=device, max_sequence_length=config.max_sequence_length, limit=limit,
            autocast=autocast, progress=bar.update, negative=negative, guidance_scale=config.sample.guidance_scale,
            backbone=backbone,
        )
    sample_seconds = time.perf_counter() - start

    # ---------------------------------------------------------------- write
    num_images = len(image_prompts)
    preset = config_spec.partition(":")[2]
    summary = {
        "checkpoint": os.path.abspath(checkpoint_dir) if checkpoint_dir else "none",
        "lora": os.path.abspath(lora_dir) if lora_dir else None,
        "config": config_spec,
        "preset": preset,
        "run_name": config.run_name,
        "pretrained_model": config.pretrained.model,
        "split": split,
        "num_images": num_images,
        "num_reward_failures": num_failures,
        "eval_num_steps": config.sample.eval_num_steps,
        "resolution": config.resolution,
        "seed": config.seed,
        "device": str(device),
        "dtype": str(inference_dtype).removeprefix("torch."),
        "reward_fn": dict(config.reward_fn),
        "rewards": summarize(rewards),
        "seconds": {"load": round(load_seconds, 2), "sample_and_score": round(sample_seconds, 2)},
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "scores.jsonl"), "w") as f:
        for index, prompt in enumerate(image_prompts):
            record = {"index": index, "prompt": prompt}
            if "tag" in metadata[index]:  # one process, in order: image i is prompt i
                record["tag"] = metadata[index]["tag"]
            record.update({key: float(values[index]) for key, values in rewards.items()})
            f.write(json.dumps(record) + "\n")
    if num_images:
        grid = image_grid(images[:16], [caption(p, r) for p, r in zip(image_prompts, rewards["avg"])])
        grid.save(os.path.join(out_dir, "grid.png"))
    print(json.dumps(summary, indent=1, sort_keys=True))
    print(f"wrote {out_dir}/summary.json, scores.jsonl, grid.png")


def _parse_flags(argv):
    """absl parsing; a bad config override exits with one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"evaluate: {error}\nPass --help for usage.")
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # config_flags: unknown key, bad type
        sys.exit(f"evaluate: invalid --config override: {error}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse_flags)
