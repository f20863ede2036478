"""Shared fixtures. Keep cheap: the tiny SD3 is built once per session."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pytest` without `python -m` / without an install
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """Directory of a tiny random StableDiffusion3Pipeline (seed 0), built once."""
    from advantage_weighted_matching.tiny_sd3 import build_tiny_sd3

    return Path(build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipeline", seed=0))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """Directory of a tiny random FLUX.1-dev-shaped FluxPipeline (seed 0), built once."""
    from advantage_weighted_matching.tiny_flux import build_tiny_flux

    return Path(build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipeline", seed=0))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_sd3_dir):
    """The tiny pipeline loaded through the ordinary `from_pretrained` path (float32, CPU)."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def shared_datasets():
    """The real prompt files (`../shared/datasets` beside the repo); skipped where absent."""
    path = REPO_ROOT.parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared prompt datasets not found at {path}")
    return path
