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
* ``aesthetic``: CLIP ViT-L/14 and the LAION head file (``rewards.aesthetic_head``,
  a URL, downloaded into ``$AWM_CACHE_DIR/reward_weights/``).
* ``imagereward``: ``ImageReward.pt`` and ``med_config.json`` of THUDM/ImageReward
  and the bert-base-uncased tokenizer files.
* ``qwenvl``: the Qwen2.5-VL judge (config, tokenizer, processor, weights).
* ``jpeg_compressibility``, ``jpeg_incompressibility``, ``deqa``,
  ``unifiedreward`` (HTTP services) and rewards from your own module: nothing.

Weights: ``*.safetensors`` when the repository has them, else ``*.bin``;
TF/Flax/ONNX/open_clip files are never fetched.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advantage_weighted_matching.rewards import reward_config_defaults, validate_reward_names  # noqa: E402

DEFAULT_REWARDS = "ocr,pickscore,geneval"
CONFIG_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja"]  # configs, tokenizer, preprocessor, template
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
    if "aesthetic" in reward_names:
        plan.append((ids["aesthetic_clip"], True, "aesthetic image encoder (CLIP ViT-L/14)"))
    if "imagereward" in reward_names:
        plan.append((ids["imagereward_tokenizer"], False, "imagereward tokenizer (BERT uncased)"))
    if "qwenvl" in reward_names:
        plan.append((ids["qwenvl_model"], True, "qwenvl judge (Qwen2.5-VL)"))
    return plan


def single_files_for(reward_names, ids):
    """[(source, filename, why)]: hub files (source a repo id) and URLs (filename None)."""
    files = []
    if "aesthetic" in reward_names and ids["aesthetic_head"].startswith(("http://", "https://")):
        files.append((ids["aesthetic_head"], None, "aesthetic head (LAION MLP)"))
    if "imagereward" in reward_names and not os.path.isdir(ids["imagereward_model"]):
        for filename in ("ImageReward.pt", "med_config.json"):
            files.append((ids["imagereward_model"], filename, "imagereward weights"))
    return files


def fetch_single_file(source, filename, cache_dir, check):
    """Download (or with ``check`` only look up) one hub file or URL; returns its local path."""
    if filename is None:
        from advantage_weighted_matching.rewards.weight_files import cached_path_for_url, url_or_path_file

        target = cached_path_for_url(source)
        if check and not os.path.isfile(target):
            raise FileNotFoundError(f"{target} is absent")
        return url_or_path_file(source, "download")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, filename, cache_dir=cache_dir, local_files_only=check)


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
    for key in ("pickscore_model", "pickscore_processor", "geneval_detector", "geneval_clip", "aesthetic_clip",
                "aesthetic_head", "imagereward_model", "imagereward_tokenizer", "qwenvl_model"):
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
    files = single_files_for(reward_names, vars(args))
    if not plan and not files:
        print("no model weights needed for", ", ".join(reward_names))
    for source, filename, why in files:
        name = source if filename is None else f"{source}/{filename}"
        if args.dry_run:
            print(f"would download {name} ({why})")
            continue
        try:
            path = fetch_single_file(source, filename, args.cache_dir, args.check)
            print(f"{'cached    ' if args.check else 'downloaded'} {name} ({why}) -> {path}")
        except Exception as error:  # noqa: BLE001 - report every file, then fail
            problems.append(f"{'missing' if args.check else 'could not download'} {name} ({why}): {error}")
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
