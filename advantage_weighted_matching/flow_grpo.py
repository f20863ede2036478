"""Flow-GRPO baseline (Liu et al., arXiv 2505.05470) as its release trains SD3 (SPEC section 7).

The rollout is the SDE of SPEC 3b at every step, storing each step's x_j, x_{j+1}
and ``log p_old(x_{j+1} | x_j)`` (averaged over C, h, w). Training visits every
step ``j < J = int(num_steps * min(sde_frac, timestep_fraction))`` of every sample,
in order, each step its own forward and backward (gradients accumulate over
micro-batches x steps). For step j of a micro-batch of B samples::

    std_dev_t   = sqrt(sigma_j / (1 - sigma_j)) * noise_level   (sigma_max for sigma_j = 1)
    mean_theta  = SDE transition mean at (x_j, sigma_j) with v_theta        (SPEC 3b)
    log p_theta = mean_CHW log N(x_{j+1}; mean_theta, (std_dev_t sqrt(-dt))^2)
    r_b         = exp(log p_theta - log p_old)
    L = mean_b max(-A_b r_b, -A_b clip(r_b, 1 - eps, 1 + eps))
      + beta * mean_b [ mean_CHW (mean_theta - mean_ref)^2 / (2 std_dev_t^2) ]

The KL to the base model lives in the space of transition means (mean_ref from the
LoRA-disabled model, no grad), not of velocities. With ``train.cfg`` the velocity is
``v_uncond.detach() + s (v_text - v_uncond)`` (see ``rollout.velocity``).

Shapes: latents [B, N + 1, C, h, w], log_probs [B, N]; one step's rows are [B, ...].
"""

import torch

from advantage_weighted_matching.objective import clipped_policy_loss
from advantage_weighted_matching.sde import gaussian_log_prob, sde_step_mean_rows


def num_train_steps(num_steps, timestep_fraction, sde_frac=1.0):
    """J: the number of leading SDE steps trained per sample (Flow-GRPO: int(10 * 0.99) = 9)."""
    return int(num_steps * min(sde_frac, timestep_fraction))


def step_rows(latents, log_probs, sigmas, j):
    """Step j of every sample: (x_j, x_{j+1} [B, ...], sigma_j, sigma_{j+1}, old log-prob [B])."""
    batch = latents.shape[0]
    sigma = sigmas[j].expand(batch)
    sigma_next = sigmas[j + 1].expand(batch)
    return latents[:, j], latents[:, j + 1], sigma, sigma_next, log_probs[:, j]


def mean_space_kl(mean, mean_ref, std_dev):
    """mean_rows[ mean_CHW (mean - mean_ref)^2 / (2 std_dev^2) ]; std_dev [R] or broadcastable [R, 1, ...]."""
    per_row = (mean - mean_ref).pow(2).mean(dim=tuple(range(1, mean.ndim)))
    return (per_row / (2 * std_dev.reshape(-1).to(per_row.dtype) ** 2)).mean()


def flow_grpo_step_loss(
    velocity_fn, x, x_next, sigma, sigma_next, sigma_max, noise_level, old_log_probs, advantages, *,
    clip_range=1e-4, beta=0.0, ref_velocity_fn=None,
):
    """Loss of one SDE step over a micro-batch. Returns (loss, metrics).

    velocity_fn(x, sigma) -> v [B, C, h, w] with grad; ref_velocity_fn: the base model (no grad).
    sigma, sigma_next, old_log_probs, advantages: [B].
    """
    v = velocity_fn(x, sigma)
    mean, std_dev, step_std = sde_step_mean_rows(x.float(), v.float(), sigma, sigma_next, sigma_max, noise_level)
    log_probs = gaussian_log_prob(x_next.float(), mean, step_std)
    ratio = torch.exp(log_probs - old_log_probs)
    policy_loss, clipfrac = clipped_policy_loss(advantages, ratio, clip_range)
    if beta > 0:
        with torch.no_grad():
            v_ref = ref_velocity_fn(x, sigma)
            mean_ref, _, _ = sde_step_mean_rows(x.float(), v_ref.float(), sigma, sigma_next, sigma_max, noise_level)
        kl = mean_space_kl(mean, mean_ref, std_dev)
    else:
        kl = policy_loss.new_zeros(())
    loss = policy_loss + beta * kl
    metrics = {
        "policy_loss": policy_loss.detach(), "kl_loss": kl.detach(), "ema_kl_loss": torch.zeros_like(kl.detach()),
        "loss": loss.detach(), "clipfrac": clipfrac.detach(), "log_prob": log_probs.detach().mean(),
        "approx_kl": 0.5 * (log_probs.detach() - old_log_probs).pow(2).mean(),
    }
    return loss, metrics
