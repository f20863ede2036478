"""Group-relative advantages (SPEC section 4).

With per-prompt tracking, rewards are grouped by prompt text::

    A = (r - mean_group(r)) / (std + 1e-4)

where ``std`` is the std of all gathered rewards (``global_std``) or of the
group. Without tracking: ``A = (r - mean(r)) / (std(r) + 1e-4)``. Stds are
population stds (ddof = 0). Then ``A = clamp(A, -adv_clip_max, adv_clip_max)``
and, if ``advantage_max > 0``, ``A = A / adv_clip_max * advantage_max``.
Inputs are one epoch's rewards gathered over all ranks, [N]; outputs [N]
(float64). Computing over exactly one epoch is the reference's per-prompt
tracker cleared every epoch.
"""

from collections import defaultdict

import numpy as np

STD_EPS = 1e-4


def group_advantages(prompts, rewards, per_prompt=True, global_std=False):
    """Advantages [N] and group statistics for prompts (list of N) and rewards [N]."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if len(prompts) != len(rewards):
        raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"non-finite rewards: {rewards[~np.isfinite(rewards)][:8]}")
    if not per_prompt:
        advantages = (rewards - rewards.mean()) / (rewards.std() + STD_EPS)
        return advantages, {}

    groups = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[prompt].append(index)
    global_std_value = rewards.std()
    advantages = np.empty_like(rewards)
    group_stds, sizes, all_one, all_zero = [], [], 0, 0
    for indices in groups.values():
        group = rewards[indices]
        std = group.std()
        advantages[indices] = (group - group.mean()) / ((global_std_value if global_std else std) + STD_EPS)
        group_stds.append(std)
        sizes.append(len(indices))
        all_one += bool(np.all(group == 1.0))
        all_zero += bool(np.all(group == 0.0))
    group_stds = np.asarray(group_stds)
    stats = {
        "mean_group_size": float(np.mean(sizes)),
        "prompts_seen": len(groups),
        "zero_std_fraction": float(np.mean(group_stds == 0.0)),
        "all_one_fraction": all_one / len(groups),
        "all_zero_fraction": all_zero / len(groups),
        "mean_group_std": float(group_stds.mean()),
    }
    return advantages, stats


def clip_advantages(advantages, adv_clip_max, advantage_max=0.0):
    """clamp to [-adv_clip_max, adv_clip_max], then rescale to advantage_max if > 0."""
    advantages = np.clip(advantages, -adv_clip_max, adv_clip_max)
    if advantage_max:
        advantages = advantages / adv_clip_max * advantage_max
    return advantages

