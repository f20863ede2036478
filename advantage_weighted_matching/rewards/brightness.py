"""Mean brightness reward: a prompt-independent image statistic for toy runs.

``reward = mean over C, H, W of the image in [0, 1]``, one vectorised
reduction per batch. Not in the paper: it gives the tiny CPU model a reward
with enough spread to show learning (the learning test), where the JPEG size of
32x32 noise barely varies.
"""

import numpy as np
import torch


def make_brightness_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    del device, reward_config

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        images = torch.as_tensor(images).detach().float()
        scores = images.clamp(0, 1).mean(dim=tuple(range(1, images.ndim))).cpu().numpy().astype(np.float64)
        return scores, {"num_failures": 0}

    return score
