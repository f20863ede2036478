#!/usr/bin/env python
"""Download the published prompt sets used by the AWM presets.

The prompt sets are the ones published with Flow-GRPO (GitHub
yifan123/flow_grpo, folder `dataset/`). They land in `<repo>/dataset/<name>/`,
where the presets look for them:

    dataset/geneval/{train,test}_metadata.jsonl   (prompt_fn "geneval")
    dataset/ocr/{train,test}.txt                  (prompt_fn "general_ocr")
    dataset/pickscore/{train,test}.txt            (prompt_fn "general_ocr")

Every file is written atomically (temporary file, then rename) and checked
against a pinned sha256. Files whose checksum we could not pin are accepted
with a warning that prints their sha256. A file that is already present and
matches is not downloaded again, so rerunning is a no-op.

Usage:
    python setup/download_datasets.py                      # everything
    python setup/download_datasets.py --only geneval,ocr   # some sets
    python setup/download_datasets.py --splits test        # evaluation prompts only
    python setup/download_datasets.py --force              # fetch again
    python setup/download_datasets.py --base_url URL       # a mirror (same layout)
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / "dataset"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset"

# dataset -> split -> (file name, sha256 or None when not pinned).
# The pinned values were computed from copies of the published files; the
# files marked None could not be checked here and are accepted unverified.
DATASETS = {
    "geneval": {
        "train": ("train_metadata.jsonl", None),
        "test": ("test_metadata.jsonl", "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28"),
    },
    "ocr": {
        "train": ("train.txt", None),
        "test": ("test.txt", "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc"),
    },
    "pickscore": {
        "train": ("train.txt", "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f"),
        "test": ("test.txt", "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"),
    },
}
SPLITS = ("train", "test")
CHUNK = 1 << 16


class DownloadError(Exception):
    """A file could not be fetched or failed verification."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_content(path, file_name):
    """Cheap format check, mainly to catch an HTML error page saved as data."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{file_name} is not UTF-8 text ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DownloadError(f"{file_name} is empty")
    if lines[0].lstrip().lower().startswith(("<!doctype", "<html")):
        raise DownloadError(f"{file_name} looks like an HTML page, not a prompt file")
    if file_name.endswith(".jsonl"):
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DownloadError(f"{file_name} line {number} is not JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DownloadError(f"{file_name} line {number} has no string 'prompt' field")


def fetch(url, target, timeout, retries):
    """Stream `url` into the open binary file `target`; retry transient errors."""
    for attempt in range(retries + 1):
        try:
            target.seek(0)
            target.truncate()
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    target.write(chunk)
            target.flush()
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                raise DownloadError(f"HTTP {exc.code} ({exc.reason}) for {url}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == retries:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(f"cannot download {url}: {reason}") from None
        time.sleep(1.0 * (attempt + 1))


def download_file(base_url, dest_dir, dataset, split, force, timeout, retries):
    """Make `dest_dir/dataset/<file>` present and verified. Returns a status word."""
    file_name, expected = DATASETS[dataset][split]
    label = f"{dataset}/{file_name}"
    path = dest_dir / dataset / file_name

    if path.exists() and not force:
        if expected is None:
            print(f"{label}: present (checksum not pinned; use --force to fetch again)")
            return "kept"
        actual = sha256_of(path)
        if actual == expected:
            print(f"{label}: up to date")
            return "kept"
        print(f"{label}: checksum mismatch on the local copy ({actual}); downloading again")

    url = f"{base_url.rstrip('/')}/{dataset}/{file_name}"
    print(f"{label}: downloading {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            fetch(url, tmp, timeout, retries)
        actual = sha256_of(tmp_name)
        if expected is not None and actual != expected:
            raise DownloadError(f"{label}: checksum mismatch: expected sha256 {expected}, got {actual}")
        check_content(tmp_name, label)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if expected is None:
        warn(f"{label}: checksum UNVERIFIED (no pinned sha256); downloaded file has sha256 {actual}")
    print(f"{label}: saved to {path}")
    return "downloaded"


def parse_names(value, allowed, what):
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}"
        )
    return names


def build_parser():
    parser = argparse.ArgumentParser(
        description="Download the Flow-GRPO prompt sets (geneval, ocr, pickscore) into dataset/.",
    )
    parser.add_argument(
        "--only",
        type=lambda v: parse_names(v, list(DATASETS), "dataset"),
        default=list(DATASETS),
        help=f"comma-separated datasets to fetch (default: all of {','.join(DATASETS)})",
    )
    parser.add_argument(
        "--splits",
        type=lambda v: parse_names(v, list(SPLITS), "split"),
        default=list(SPLITS),
        help="comma-separated splits to fetch (default: train,test)",
    )
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"destination root (default: {DEFAULT_DEST})")
    parser.add_argument("--force", action="store_true", help="download again even when a verified copy exists")
    parser.add_argument(
        "--base_url", default=DEFAULT_BASE_URL, help=f"URL of the folder holding the datasets (default: {DEFAULT_BASE_URL})"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout per request, seconds")
    parser.add_argument("--retries", type=int, default=2, help="retries after a network or 5xx error")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    dest = args.dest.expanduser().resolve()
    failures = []
    counts = {"downloaded": 0, "kept": 0}
    for dataset in args.only:
        for split in args.splits:
            try:
                status = download_file(args.base_url, dest, dataset, split, args.force, args.timeout, args.retries)
                counts[status] += 1
            except DownloadError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failures.append(f"{dataset}/{split}")
    print(f"done: {counts['downloaded']} downloaded, {counts['kept']} already present, {len(failures)} failed")
    if failures:
        print(f"error: failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
