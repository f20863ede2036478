"""Filesystem anchors: dataset paths resolve against the repository root, not
the working directory, so presets work from any cwd."""

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name, in every saved LoRA dir
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "advantage_weighted_matching"
)


def dataset_dir(name):
    """`dataset/{name}` under the repo root."""
    return os.path.join(REPO_ROOT, "dataset", name)


def cache_dir():
    """Where generated artefacts (the tiny SD3) live; `AWM_CACHE_DIR` overrides."""
    return os.environ.get("AWM_CACHE_DIR", DEFAULT_CACHE_DIR)
