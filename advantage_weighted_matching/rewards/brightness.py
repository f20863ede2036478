"""Mean brightness reward: a prompt-independent image statistic for toy runs.

``reward = mean over C, H, W of the image in [0, 1]``, one vectorised
reduction per batch. Not in the paper: it gives the tiny CPU model a reward
with enough spread to show learning (the learning test), where the JPEG size of
32x32 noise barely varies. An image with non-finite pixels is a failure: it
scores 0 and counts in ``num_failures``.
"""

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def make_brightness_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    del device, reward_config

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        images = torch.as_tensor(images).detach().float()
        scores = images.clamp(0, 1).mean(dim=tuple(range(1, images.ndim))).cpu().numpy().astype(np.float64)
        bad = ~np.isfinite(scores)
        if bad.any():
            logger.warning("brightness reward: non-finite pixels in images %s (scored 0)", np.flatnonzero(bad).tolist())
            scores[bad] = 0.0
        return scores, {"num_failures": int(bad.sum())}

    return score
