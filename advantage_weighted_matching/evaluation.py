"""Deterministic evaluation on the test split (SPEC section 3b, last paragraph).

Euler-ODE sampling with ``eval_num_steps``, a fixed seed per batch (the same
start noise every evaluation, so epochs compare), every test prompt once across
ranks. Used by the training loop and by ``python -m advantage_weighted_matching.evaluate``.
"""

import contextlib

import numpy as np
import torch

from advantage_weighted_matching.prompts import eval_indices
from advantage_weighted_matching.backbones import SD3
from advantage_weighted_matching.rollout import rollout

# Per-image fields that use -10 for "not this image's tag" (ignored in means).
NOT_APPLICABLE = -10.0


def summarize(rewards):
    """{key: mean over images}, skipping GenEval's -10 'other tag' entries."""
    summary = {}
    for key, values in rewards.items():
        values = np.asarray(values, dtype=np.float64)
        valid = values[values != NOT_APPLICABLE] if key.endswith("accuracy") else values
        if valid.size:
            summary[key] = float(valid.mean())
    return summary


@torch.no_grad()
def evaluate(
    pipeline, transformer, prompts, metadata, reward_fn, *, sigmas, resolution, batch_size, rank, num_processes,
    gather, seed, device, max_sequence_length=128, limit=0, autocast=None, progress=None, negative=None,
    guidance_scale=1.0, backbone=SD3,
):
    """Sample and score the test prompts. `gather(tensor)` concatenates over ranks.
    With guidance_scale > 1 and `negative` (empty-prompt embeddings), sampling uses CFG.

    Returns (rewards: dict key -> np.ndarray over all ranks' images, in rank
    order, padding removed; local images [n, 3, H, W] on CPU; local prompts;
    images whose reward scoring failed, over all ranks).
    """
    batches = eval_indices(len(prompts), num_processes, batch_size, rank, limit)
    local_rewards, local_valid, images_out, prompts_out, num_failures = {}, [], [], [], 0
    for batch_index, indices in enumerate(batches):
        valid = [i >= 0 for i in indices]
        real = [i if i >= 0 else 0 for i in indices]  # pad with prompt 0, dropped after gather
        batch_prompts = [prompts[i] for i in real]
        batch_metadata = [metadata[i] for i in real]
        embeds, pooled = backbone.encode_prompts(pipeline, batch_prompts, device, max_sequence_length)
        generator = torch.Generator(device).manual_seed(seed + 1_000_003 * batch_index + rank)
        with autocast() if autocast else contextlib.nullcontext():
            result = rollout(
                pipeline, transformer, embeds, pooled, sigmas, resolution, generator, use_sa_solver=False,
                deterministic=True, negative=negative, guidance_scale=guidance_scale, backbone=backbone,
            )
        scores, info = reward_fn(result.images, batch_prompts, batch_metadata, False)
        num_failures += int(info.get("num_failures", 0))
        for key, values in scores.items():
            local_rewards.setdefault(key, []).append(np.asarray(values, dtype=np.float64))
        local_valid.extend(valid)
        keep = torch.tensor(valid)
        images_out.append(result.images[keep].cpu())
        prompts_out.extend(p for p, ok in zip(batch_prompts, valid) if ok)
        if progress is not None:
            progress()
    mask = gather(torch.tensor(local_valid, device=device)).cpu().numpy().astype(bool)
    rewards = {}
    for key, chunks in sorted(local_rewards.items()):
        values = torch.as_tensor(np.concatenate(chunks), device=device, dtype=torch.float64)
        rewards[key] = gather(values).cpu().numpy()[mask]
    images = torch.cat(images_out) if images_out else torch.empty(0)
    num_failures = int(gather(torch.tensor([num_failures], device=device)).sum())
    return rewards, images, prompts_out, num_failures
