"""Reward weights that are single files rather than transformers checkpoints.

* ``url_or_path_file(spec)``: a local file path, or an http(s) URL downloaded
  once into ``{cache_dir()}/reward_weights/`` (``AWM_CACHE_DIR`` overrides the
  cache root), written to a temporary name and renamed when complete;
* ``hub_or_dir_file(repo_or_dir, filename)``: ``filename`` inside a local
  directory, or inside a Hugging Face hub repository (``hf_hub_download``, so
  the HF cache and ``HF_HUB_OFFLINE`` apply).

A file that cannot be found or fetched raises RuntimeError naming it and the
prefetch step.
"""

import os
import urllib.parse
import urllib.request

DOWNLOAD_TIMEOUT_S = 120.0


def _hint():
    from . import PREFETCH_HINT

    return PREFETCH_HINT


def weights_cache_dir():
    from advantage_weighted_matching.paths import cache_dir

    return os.path.join(cache_dir(), "reward_weights")


def cached_path_for_url(url):
    """Where ``url_or_path_file`` keeps the download of ``url``."""
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path)) or "download"
    return os.path.join(weights_cache_dir(), name)


def url_or_path_file(spec, what):
    """Local path of the file ``spec`` (path or http(s) URL); ``what`` names it in errors."""
    if not spec:
        raise RuntimeError(f"{what}: no file configured")
    if not spec.startswith(("http://", "https://")):
        if not os.path.isfile(spec):
            raise RuntimeError(f"{what}: file {spec!r} does not exist")
        return spec
    target = cached_path_for_url(spec)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(spec, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(partial, target)
    except OSError as error:
        if os.path.exists(partial):
            os.remove(partial)
        raise RuntimeError(
            f"{what}: cannot download {spec} ({error!r}). Download it first with `{_hint()}` on a machine with "
            f"internet (it lands in {target}), or set the config key to a local file"
        ) from error
    return target


def hub_or_dir_file(repo_or_dir, filename, what):
    """Local path of ``filename`` in the directory or hub repository ``repo_or_dir``."""
    if os.path.isdir(repo_or_dir):
        path = os.path.join(repo_or_dir, filename)
        if not os.path.isfile(path):
            raise RuntimeError(f"{what}: {filename} is missing from {repo_or_dir}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_or_dir, filename)
    except Exception as error:  # noqa: BLE001 - offline, gated, wrong id: one message
        raise RuntimeError(
            f"{what}: cannot load {filename} from {repo_or_dir!r}: not in the local Hugging Face cache and the hub is "
            f"unreachable or the id is wrong. Download it first with `{_hint()}`. Original error: {error!r}"
        ) from error
