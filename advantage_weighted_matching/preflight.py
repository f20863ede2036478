"""Checks that run before the trainer creates or loads anything, and the launchers' plan check.

`check_paths(config)` raises one ConfigError listing every problem with
* ``pretrained.model``: a local path (absolute, ``./``, ``~``, or existing) must
  be a diffusers pipeline dir (``model_index.json``) unless
  ``pretrained.tiny_seed >= 0`` or ``pretrained.toy_recipe`` builds it; a hub id must be in the local cache
  when ``HF_HUB_OFFLINE`` is set;
* ``resume_from``: must exist, be a directory and hold a complete checkpoint;
* the run dir (``save_dir``, else under ``logdir``): its nearest existing
  ancestor must be a writable directory.

`on_main(fn, ...)` runs a step on the main process only and raises its error on
every rank, so one message comes out and no rank waits forever.

    python -m advantage_weighted_matching.preflight --config FILE:PRESET --num_processes N \\
        [--dry_run] [--config.key=value ...]

validates the config for N processes and prints the batch plan once; without
``--dry_run`` it runs `check_paths` too. The launchers call it before starting
any rank: an error is one line on stderr and exit status 2.
"""

import os
import sys

from advantage_weighted_matching.checkpoint import CheckpointError, list_checkpoints, resume_candidates, run_dir_of
from advantage_weighted_matching.config import ConfigError
from advantage_weighted_matching.runlock import RunDirBusy, RunDirLock

USER_ERRORS = (ConfigError, CheckpointError, RunDirBusy)


def _looks_local(name):
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") != 1


def model_problem(model, revision, will_build):
    """Why `pretrained.model` cannot load, or None."""
    path = os.path.expanduser(model)
    if _looks_local(model):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
            return None
        if will_build and not os.path.exists(path):
            return None
        what = "is not a diffusers pipeline directory (no model_index.json)" if os.path.exists(path) \
            else "does not exist"
        return f"pretrained.model={model!r} {what}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json", revision=revision), str):
            return (f"pretrained.model={model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    f"download it first or point pretrained.model at a local pipeline directory")
    return None


def dir_problem(path, key):
    """Why directory `path` cannot be created and written, or None."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{key}={path!r} cannot be created: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={path!r} is not writable ({probe}: permission denied)"
    return None


def check_paths(config):
    """Filesystem checks of the config, read-only; ConfigError listing every problem."""
    will_build = config.pretrained.tiny_seed >= 0 or bool(config.pretrained.toy_recipe)  # built on first use
    problems = [model_problem(config.pretrained.model, config.pretrained.revision, will_build)]
    if config.resume_from:
        try:
            resume_candidates(config.resume_from)
        except CheckpointError as error:
            problems.append(str(error))
    if config.save_dir:
        problems.append(dir_problem(config.save_dir, "save_dir"))
    elif config.resume_from and os.path.isdir(config.resume_from):
        problems.append(dir_problem(run_dir_of(config.resume_from), "resume_from's run dir"))
    else:
        problems.append(dir_problem(config.logdir, "logdir"))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def claim_run_dir(save_dir, resume_from=""):
    """Create the run dir and take its lock (main process only). ConfigError if it cannot be
    created, or if it holds checkpoints of a run this one does not resume (its checkpoints
    would mix with, and be pruned among, the new ones); RunDirBusy if another run owns it."""
    import logging

    try:
        os.makedirs(save_dir, exist_ok=True)
        lock = RunDirLock.acquire(save_dir)
    except OSError as error:
        raise ConfigError(f"run dir {save_dir!r} cannot be created or written: {error}") from None
    existing = list_checkpoints(os.path.join(save_dir, "checkpoints"))
    resumes_here = resume_from and os.path.realpath(run_dir_of(resume_from)) == os.path.realpath(save_dir)
    if existing and not resumes_here:
        lock.release()
        raise ConfigError(f"run dir {save_dir} already holds checkpoints of a run ({os.path.basename(existing[-1])}, "
                          f"...): resume it with --config.resume_from={save_dir}, or choose another save_dir")
    if lock.previous:
        logging.getLogger(__name__).warning(
            "run dir %s: taking over from pid %s on %s, which ended without releasing it", save_dir,
            lock.previous.get("pid"), lock.previous.get("host"))
    return lock


def on_main(fn, is_main, share_result=False):
    """`fn()` on the main process only. A USER_ERRORS exception there is raised on every
    rank; with `share_result` every rank returns the main process's result."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if is_main:
        try:
            result = fn()
        except USER_ERRORS as raised:
            error = raised
    shared, error = broadcast_object_list([result if share_result else None, error])
    if error is not None:
        raise error
    return shared if share_result else result


def cli(argv):
    """Entry of ``python -m advantage_weighted_matching.preflight`` (flags defined in __main__)."""
    import json

    from absl import flags

    from advantage_weighted_matching.config import format_batch_plan, validate

    del argv
    config = flags.FLAGS.config
    num_processes = flags.FLAGS.num_processes or int(os.environ.get("WORLD_SIZE", 1))
    try:
        plan = validate(config, num_processes)
        if not flags.FLAGS.dry_run:
            check_paths(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_batch_plan(plan))
    if flags.FLAGS.dry_run:
        print(json.dumps(plan, sort_keys=True))


def parse_flags_or_exit(argv, program):
    """absl parsing for the CLIs: a bad flag or --config override is one line, exit 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = f"{error}; pass --help for usage"
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # config_flags: unknown key, bad type
        message = override_message(error, argv)
    print(f"{program}: {message}", file=sys.stderr)
    sys.exit(2)


def override_message(error, argv):
    """config_flags' error for a bad override (a repr of a KeyError inside an AttributeError
    for an unknown key) -> one readable line naming the argument."""
    import ast

    text = str(error)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = lines[0].strip("'\"") if lines else ""
    culprit = next((arg for arg in argv if arg.startswith("--config.") and key and key in arg.split("=")[0]), "")
    if isinstance(error, (AttributeError, KeyError)) and culprit:
        hint = " ".join(lines[1:])
        return f"invalid override {culprit}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
    return f"invalid --config override{' ' + culprit if culprit else ''}: {'; '.join(lines)}"


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file and preset: path/to/file.py:PRESET.",
                                    lock_config=True)
    flags.DEFINE_bool("dry_run", False, "Only validate and print the batch plan.")
    flags.DEFINE_integer("num_processes", None, "Process count (default: WORLD_SIZE or 1).")
    flags.mark_flags_as_required(["config"])
    app.run(cli, flags_parser=lambda argv: parse_flags_or_exit(argv, "preflight"))
