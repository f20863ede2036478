#!/usr/bin/env python
"""Download the reward models (SPEC section 6) into the Hugging Face cache.

Run once on a machine with internet that shares ``HF_HOME`` (or the cache
directory) with the training nodes; training then loads them offline.

    python setup/prefetch_reward_weights.py                      # ocr,pickscore,geneval
    python setup/prefetch_reward_weights.py --rewards pickscore
    python setup/prefetch_reward_weights.py --dry-run            # print the plan only
    python setup/prefetch_reward_weights.py --check              # offline: what is cached?

Per reward:
* ``ocr``: nothing to download (RapidOCR carries its ONNX models in the wheel);
  checks that ``rapidocr_onnxruntime`` and ``Levenshtein`` import.
* ``pickscore``: the PickScore model (config + weights) and the CLIP-H
  processor (tokenizer and preprocessing files only, no weights).
* ``geneval``: the Mask2Former detector and the CLIP ViT-L/14 colour classifier.
* ``jpeg_compressibility``: nothing.

Weights: ``*.safetensors`` when the repository has them, else ``*.bin``;
TF/Flax/ONNX/open_clip files are never fetched.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advantage_weighted_matching.rewards import reward_config_defaults, validate_reward_names  # noqa: E402

DEFAULT_REWARDS = "ocr,pickscore,geneval"
CONFIG_FILE_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, tokenizer, preprocessor
NEVER_FETCH = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "open_clip_*", "*.pt", "*.ckpt"]


def downloads_for(reward_names, ids):
    """[(repo_id, with_weights, why)] for the selected rewards."""
    plan = []
    if "pickscore" in reward_names:
        plan.append((ids["pickscore_model"], True, "pickscore model"))
        plan.append((ids["pickscore_processor"], False, "pickscore processor (CLIP-H tokenizer + preprocessing)"))
    if "geneval" in reward_names:
        plan.append((ids["geneval_detector"], True, "geneval detector (Mask2Former)"))
        plan.append((ids["geneval_clip"], True, "geneval colour classifier (CLIP)"))
    return plan


def allow_patterns(repo_id, with_weights):
    """Files to fetch: configs always; one weight format when ``with_weights``."""
    if not with_weights:
        return list(CONFIG_FILE_PATTERNS)
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_id)
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return CONFIG_FILE_PATTERNS + (["*.safetensors"] if has_safetensors else ["*.bin"])


def check_ocr():
    try:
        import Levenshtein  # noqa: F401
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError as error:
        return f"ocr: missing package ({error}); install with `pip install -e .[ocr]`"
    return None


def parse_args(argv):
    defaults = reward_config_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rewards", default=DEFAULT_REWARDS, help=f"comma-separated reward names (default {DEFAULT_REWARDS})"
    )
    for key in ("pickscore_model", "pickscore_processor", "geneval_detector", "geneval_clip"):
        flag = f"--{key.replace('_', '-')}"
        parser.add_argument(flag, dest=key, default=defaults[key], help=f"default {defaults[key]}")
    parser.add_argument("--cache-dir", default=None, help="HF cache directory (default: the HF_HOME cache)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and exit")
    parser.add_argument("--check", action="store_true", help="offline: report which models are already cached")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    reward_names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    try:
        validate_reward_names(reward_names)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problems = []
    if "ocr" in reward_names:
        problem = check_ocr()
        if problem:
            problems.append(problem)
        else:
            print("ocr: RapidOCR models ship inside rapidocr-onnxruntime; nothing to download")
    plan = downloads_for(reward_names, vars(args))
    if not plan:
        print("no model weights needed for", ", ".join(reward_names))
    from huggingface_hub import snapshot_download

    for repo_id, with_weights, why in plan:
        what = "config + weights" if with_weights else "config/tokenizer files only"
        if args.dry_run:
            print(f"would download {repo_id} ({why}; {what})")
            continue
        try:
            if args.check:
                path = snapshot_download(repo_id, cache_dir=args.cache_dir, local_files_only=True)
                print(f"cached    {repo_id} ({why}) at {path}")
                continue
            path = snapshot_download(
                repo_id,
                cache_dir=args.cache_dir,
                allow_patterns=allow_patterns(repo_id, with_weights),
                ignore_patterns=NEVER_FETCH,
            )
            print(f"downloaded {repo_id} ({why}; {what}) -> {path}")
        except Exception as error:  # noqa: BLE001 - report every model, then fail
            if args.check:
                problems.append(f"missing   {repo_id} ({why}): not in the local HF cache")
            else:
                problems.append(
                    f"could not download {repo_id} ({why}): {type(error).__name__}: {error}. "
                    "Check the internet connection, HF_ENDPOINT / proxy settings, HF_TOKEN for gated "
                    "models, and that HF_HUB_OFFLINE is not set."
                )
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
