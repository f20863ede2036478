"""Atomic, rotating checkpoint directories and their resume bookkeeping.

Layout of ``{save_dir}/checkpoints/checkpoint-{epoch:06d}/``::

    lora/                 policy adapter (diffusers LoRA, `load_lora_weights`-able)
    ema_lora/             weight-EMA of the policy adapter (if train.ema)
    kl_ema_lora/          the KL-EMA adapter (if present)
    training_state.pt     optimizer, LR schedule, grad scaler, weight-EMA, counters
    rng_state_{rank}.json every process's python / numpy / torch RNG states
    config.json           snapshot of the run's config
    COMPLETE              written last; a directory without it is never loaded

A checkpoint is written into ``.tmp-checkpoint-*`` next to the others, every
file fsynced, then renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest loadable one. Everything is read back with
safetensors, JSON, or ``torch.load(weights_only=True)``: nothing is unpickled.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
# Keys whose change would alter the batch plan or the model's shapes: a resume
# with different values is refused.
RESUME_LOCKED_KEYS = (
    "pretrained.model", "resolution", "sample.train_batch_size", "sample.num_image_per_prompt",
    "sample.num_batches_per_epoch", "sample.num_steps", "train.batch_size", "train.gradient_accumulation_steps",
    "train.train_timesteps", "train.lora_rank", "train.lora_alpha", "lora_type", "train.ema",
    "train.algorithm", "num_processes",
)


def checkpoint_name(epoch):
    return f"checkpoint-{epoch:06d}"


def list_checkpoints(root):
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.exists(os.path.join(root, name, COMPLETE_MARKER)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve_resume_path(path):
    """A checkpoint dir, or a run dir / checkpoints dir -> its latest complete checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from={path!r} does not exist")
    if os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(f"resume_from={path!r}: no complete checkpoint in it or in its checkpoints/ folder")


def temp_dir_for(root, epoch):
    return os.path.join(root, f".tmp-{checkpoint_name(epoch)}")


def _fsync_tree(path):
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finalize(temp_dir, root, epoch, limit):
    """Mark `temp_dir` complete, fsync, rename to its final name, drop old checkpoints."""
    with open(os.path.join(temp_dir, COMPLETE_MARKER), "w") as f:
        f.write("ok\n")
    _fsync_tree(temp_dir)
    final = os.path.join(root, checkpoint_name(epoch))
    displaced = None
    if os.path.exists(final):  # re-saving the same epoch (e.g. SIGTERM right after a save):
        displaced = os.path.join(root, f".tmp-old-{checkpoint_name(epoch)}")  # keep it until the new one is in
        shutil.rmtree(displaced, ignore_errors=True)
        os.replace(final, displaced)
    try:
        os.replace(temp_dir, final)
    except BaseException:
        if displaced:
            os.replace(displaced, final)
        raise
    if displaced:
        shutil.rmtree(displaced, ignore_errors=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in list_checkpoints(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state():
    state = {
        "python": repr(random.getstate()),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(save_dir):
    """The run's per-epoch `metrics.jsonl` records in epoch order; after a resume the
    last record of an epoch wins (the killed run may have logged it already)."""
    records = {}
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def load_training_state(path, map_location="cpu"):
    return torch.load(os.path.join(path, "training_state.pt"), map_location=map_location, weights_only=True)


def config_differences(saved, current, keys=RESUME_LOCKED_KEYS):
    """[(key, saved, current)] for locked keys that differ between two flat dicts."""
    return [(key, saved.get(key), current.get(key)) for key in keys if saved.get(key) != current.get(key)]


# Keys renamed since a checkpoint may have been written: old flat name -> current flat name.
RENAMED_KEYS = {"train.time_type": "time_type", "train.time_shift": "time_shift", "train.lora_type": "lora_type"}


def saved_flat_config(config_dict):
    """A checkpoint's config.json as a flat dict under today's key names.

    Checkpoints written before the reference's names were adopted hold ``train.time_type``,
    ``train.time_shift`` and ``train.lora_type`` and no ``train.num_batches_per_epoch``
    (it then equalled the micro-batches per epoch, like today's derived value)."""
    flat = {RENAMED_KEYS.get(key, key): value for key, value in flatten_config(config_dict).items()}
    if "train.num_batches_per_epoch" not in flat and "sample.train_batch_size" in flat:
        flat["train.num_batches_per_epoch"] = (
            flat["sample.train_batch_size"] // flat["train.batch_size"] * flat["sample.num_batches_per_epoch"])
    return flat


def flatten_config(config_dict, prefix=""):
    """Nested dict -> {'a.b': value}."""
    flat = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def training_state(stateful, epoch, global_step, sampler_counter):
    """{name: obj.state_dict()} of the stateful objects that exist, plus the counters."""
    state = {name: obj.state_dict() for name, obj in stateful.items() if obj is not None}
    state.update(epoch=epoch, global_step=global_step, sampler_counter=sampler_counter)
    return state


def restore_training_state(state, stateful):
    """Load each existing object's saved state; returns (epoch, global_step) to continue from."""
    for name, obj in stateful.items():
        if obj is not None and state.get(name):
            obj.load_state_dict(state[name])
    return state["epoch"], state["global_step"]
