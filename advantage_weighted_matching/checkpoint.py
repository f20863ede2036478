"""Atomic, rotating checkpoint directories and their resume bookkeeping.

Layout of ``{save_dir}/checkpoints/checkpoint-{epoch:06d}/``::

    lora/                 policy adapter (diffusers LoRA, `load_lora_weights`-able)
    ema_lora/             weight-EMA of the policy adapter (if train.ema)
    kl_ema_lora/          the KL-EMA adapter (if present)
    training_state.pt     optimizer, LR schedule, grad scaler, weight-EMA, counters
    rng_state_{rank}.json every process's python / numpy / torch RNG states
    config.json           snapshot of the run's config
    checksums.json        size and sha256 of every file above
    COMPLETE              written last; a directory without it is never loaded

A checkpoint is written into ``.tmp-checkpoint-*`` next to the others, every
file fsynced, then renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest loadable one. Everything is read back with
safetensors, JSON, or ``torch.load(weights_only=True)``: nothing is unpickled.

Before a resume trusts a checkpoint, `verify_checkpoint` re-hashes every file
against ``checksums.json`` (a truncated file, a flipped bit in tensor data, a
missing adapter dir each fail with the file named). `select_resume_checkpoint`
takes a run dir's newest checkpoint that verifies, naming the ones it skipped.
`check_resume_config` refuses a resume whose config changed (see its docstring).
"""

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np

from advantage_weighted_matching.config.validate import ConfigError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
MANIFEST = "checksums.json"
# Keys whose change would alter the batch plan or the model's shapes: a resume
# with different values is refused.
RESUME_LOCKED_KEYS = (
    "pretrained.model", "resolution", "sample.train_batch_size", "sample.num_image_per_prompt",
    "sample.num_batches_per_epoch", "sample.num_steps", "train.batch_size", "train.gradient_accumulation_steps",
    "train.train_timesteps", "train.lora_rank", "train.lora_alpha", "lora_type", "train.ema",
    "train.algorithm", "pretrained.backbone", "num_processes",
)
# Keys that only say where, how often and how much the run writes or evaluates: they
# may change on resume. Any other change (reward, seed, dataset, learning rate, ...)
# needs resume_allow_changes=True.
RESUME_FREE_KEYS = (
    "num_epochs", "save_freq", "eval_freq", "log_image_freq", "num_checkpoint_limit", "resume_from",
    "resume_allow_changes", "save_dir", "logdir", "run_name", "wandb_project", "dump_rank_state",
    "max_nonfinite_steps", "sample.eval_num_steps", "sample.test_batch_size", "sample.num_eval_images",
    "rewards.device", "rewards.batch_size", "rewards.max_failure_fraction", "rewards.max_failed_epochs",
    "rewards.remote_geneval_url", "rewards.remote_geneval_timeout_s", "rewards.remote_geneval_retries",
    "rewards.deqa_url", "rewards.unifiedreward_url", "rewards.remote_timeout_s", "rewards.remote_retries",
    "train.gradient_checkpointing",  # memory for time, same mathematics
    # execution switches (issue I, speed.py): how fast, not what is computed
    "train.compile", "train.compile_mode", "train.compile_backend", "train.fused_adam", "train.batched_reference",
    "sample.rollout_chunk", "peak_tflops",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted, or a resume_from that names none; the message names the file."""


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


def is_checkpoint_dir(path):
    return bool(CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))) or any(
        os.path.exists(os.path.join(path, name)) for name in (COMPLETE_MARKER, MANIFEST, "training_state.pt"))


def run_dir_of(resume_from):
    """The run dir a resume continues in: a checkpoint's grandparent, a checkpoints/ dir's parent."""
    path = os.path.abspath(resume_from)
    if is_checkpoint_dir(path):
        return os.path.dirname(os.path.dirname(path))
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def resume_candidates(resume_from):
    """Checkpoints `resume_from` may resume from, newest first: the checkpoint dir itself, or a
    run / checkpoints dir's complete checkpoints. CheckpointError if it names none."""
    if not os.path.exists(resume_from):
        raise CheckpointError(f"resume_from={resume_from!r} does not exist")
    if not os.path.isdir(resume_from):
        raise CheckpointError(f"resume_from={resume_from!r} is a file; give a run directory or a checkpoint "
                              f"directory (checkpoints/checkpoint-NNNNNN)")
    if is_checkpoint_dir(resume_from):
        if not os.path.exists(os.path.join(resume_from, COMPLETE_MARKER)):
            raise CheckpointError(f"resume_from={resume_from!r} is an incomplete checkpoint (no {COMPLETE_MARKER} "
                                  f"marker: its save was interrupted); use an earlier one or the run directory")
        return [resume_from]
    for root in (os.path.join(resume_from, "checkpoints"), resume_from):
        found = list_checkpoints(root)
        if found:
            return found[::-1]
    raise CheckpointError(f"resume_from={resume_from!r} holds no complete checkpoint (neither in it nor in its "
                          f"checkpoints/ folder)")


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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory):
    """`MANIFEST` := {relative path: {bytes, sha256}} of every file under `directory`
    (sorted keys, no timestamps: identical checkpoints give identical manifests)."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, directory)
            if relative not in (MANIFEST, COMPLETE_MARKER):
                files[relative] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    write_json(os.path.join(directory, MANIFEST), {"algorithm": "sha256", "files": files})


def verify_checkpoint(path, required=()):
    """Check checkpoint dir `path` before trusting it: complete, every file of its
    manifest present with its size and sha256, and every `required` file (relative
    paths) present. Raises CheckpointError naming the first bad file.

    A checkpoint written before manifests existed is parsed instead (JSON, safetensors
    headers, training_state.pt): corrupt files still fail by name, bit flips in tensor
    data go unnoticed."""
    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    for relative in required:
        if not os.path.isfile(os.path.join(path, relative)):
            raise CheckpointError(f"{os.path.join(path, relative)}: missing")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return _parse_legacy_checkpoint(path)
    try:
        files = read_json(manifest_path)["files"]
        entries = sorted((str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable checksum manifest ({error})") from None
    for relative, size, sha256 in entries:
        file_path = os.path.join(path, relative)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path}: missing (listed in {MANIFEST})")
        if os.path.getsize(file_path) != size:
            raise CheckpointError(f"{file_path}: {os.path.getsize(file_path)} bytes, {size} when saved (truncated "
                                  f"or overwritten)")
        if file_sha256(file_path) != sha256:
            raise CheckpointError(f"{file_path}: sha256 differs from the one saved (corrupt)")
    return path


def _parse_legacy_checkpoint(path):
    from safetensors import safe_open

    for folder, _, names in os.walk(path):
        for name in sorted(names):
            file_path = os.path.join(folder, name)
            try:
                if name.endswith(".json"):
                    read_json(file_path)
                elif name.endswith(".safetensors"):
                    with safe_open(file_path, "pt") as f:
                        f.keys()
                elif name == "training_state.pt":
                    load_training_state(path)
            except Exception as error:  # noqa: BLE001 - any parse failure: this file is corrupt
                raise CheckpointError(f"{file_path}: unreadable ({type(error).__name__}: {error})") from None
    return path


def required_files(num_processes):
    """Files every checkpoint of a `num_processes` run has (plus whatever its manifest lists)."""
    from advantage_weighted_matching.paths import LORA_WEIGHT_NAME

    return ["training_state.pt", "config.json", f"lora/{LORA_WEIGHT_NAME}",
            *(f"rng_state_{rank}.json" for rank in range(num_processes))]


def select_resume_checkpoint(resume_from, num_processes, warn=print):
    """The checkpoint to resume from: `resume_from` itself when it is a checkpoint dir
    (CheckpointError naming the bad file if it does not verify), else the newest
    checkpoint of the run dir that verifies; each one skipped is reported to `warn`."""
    required = required_files(num_processes)
    candidates = resume_candidates(resume_from)
    if is_checkpoint_dir(resume_from):
        return verify_checkpoint(resume_from, required)
    reasons = []
    for path in candidates:
        try:
            verify_checkpoint(path, required)
        except CheckpointError as error:
            reasons.append(str(error))
            warn(f"resume: skipping checkpoint {os.path.basename(path)}: {error}")
            continue
        return path
    raise CheckpointError(f"resume_from={resume_from!r}: no checkpoint verifies:\n  " + "\n  ".join(reasons))


def finalize(temp_dir, root, epoch, limit):
    """Checksum, mark `temp_dir` complete, fsync, rename to its final name, drop old checkpoints."""
    write_manifest(temp_dir)
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
    import torch

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

    import torch

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
    import torch

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


def check_resume_config(saved, current, allow_changes, path):
    """Compare the checkpoint's flat config with the current one before any model loads.

    * locked keys (batch plan, model shapes) and a KL-EMA adapter the checkpoint lacks:
      always refused (ConfigError);
    * any other key (reward, seed, dataset, learning rate, ...) outside RESUME_FREE_KEYS:
      refused unless `allow_changes`;
    * keys only one side has (added or removed by a code change) are not compared.
    Returns the lines describing the accepted differences, for the log."""
    refused = [f"{key}: checkpoint {old!r} != now {new!r}" for key, old, new in config_differences(saved, current)]
    if _has_kl_ema(current) and not _has_kl_ema(saved):
        refused.append(f"the checkpoint has no KL-EMA adapter (train.ema_beta={saved.get('train.ema_beta')!r}, "
                       f"train.off_policy={saved.get('train.off_policy')!r}); this run needs one "
                       f"(train.ema_beta={current.get('train.ema_beta')!r}, "
                       f"train.off_policy={current.get('train.off_policy')!r})")
    if refused:
        raise ConfigError(f"cannot resume from {path}: the batch plan or model shapes differ:\n  " + "\n  ".join(refused))
    changed = [key for key in sorted(set(saved) & set(current) - set(RESUME_LOCKED_KEYS)) if saved[key] != current[key]]
    guarded = [key for key in changed if key not in RESUME_FREE_KEYS]
    if guarded and not allow_changes:
        raise ConfigError(f"cannot resume from {path}: the config differs from the checkpoint's (pass "
                          f"--config.resume_allow_changes=true to continue with the new values):\n  "
                          + "\n  ".join(f"{key}: checkpoint {saved[key]!r} != now {current[key]!r}" for key in guarded))
    return [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed]


def _has_kl_ema(flat):
    return (flat.get("train.ema_beta") or 0) > 0 or bool(flat.get("train.off_policy"))


def write_run_config(save_dir, config_dict):
    """{save_dir}/config.json := `config_dict`. One that differs (a resume with changes)
    is kept beside it as config.previous-N.json; returns that path or None."""
    path = os.path.join(save_dir, "config.json")
    kept = None
    if os.path.exists(path):
        try:
            same = read_json(path) == json.loads(json.dumps(config_dict))
        except ValueError:
            same = False
        if not same:
            number = 1
            while os.path.exists(os.path.join(save_dir, f"config.previous-{number}.json")):
                number += 1
            kept = os.path.join(save_dir, f"config.previous-{number}.json")
            os.replace(path, kept)
    write_json(path, config_dict)
    return kept


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
