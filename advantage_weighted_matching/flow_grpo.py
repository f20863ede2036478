"""Flow-GRPO baseline objective (Liu et al., arXiv 2505.05470), for comparison.

The rollout is the SDE of SPEC 3b; each stochastic step j (x_j -> x_{j+1}) is a
Gaussian policy action with log-density ``log p(x_{j+1} | x_j)`` (averaged over
C, h, w, as stored at sampling time). Training re-evaluates the velocity at
(x_j, sigma_j) and the log-density of the stored x_{j+1}; per step::

    r_j = exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))
    L   = mean_{j,b} max(-A_b r_j, -A_b clip(r_j, 1 - eps, 1 + eps))
        + beta * mean((v_theta(x_j) - v_ref(x_j))^2)          (velocity-space KL)

Rows are time-major like the AWM loss: row ``k * B + b`` is step idx[k] of
sample b. Shapes: latents [B, N + 1, C, h, w], log_probs [B, N], idx [T].
"""

import torch

from advantage_weighted_matching.objective import clipped_policy_loss, velocity_kl
from advantage_weighted_matching.sde import gaussian_log_prob, sde_step_mean_rows


def select_sde_steps(num_timesteps, num_steps, sde_frac, timestep_fraction, generator=None):
    """T distinct step indices, stratified over the first stochastic steps
    ``[0, int(num_steps * min(sde_frac, timestep_fraction)))``, sorted -> LongTensor [T]."""
    usable = int(num_steps * min(sde_frac, timestep_fraction))
    if num_timesteps > usable:
        raise ValueError(f"{num_timesteps} training steps requested but only {usable} stochastic steps are eligible")
    edges = torch.linspace(0, usable, num_timesteps + 1, dtype=torch.float64).floor()
    u = torch.rand(num_timesteps, generator=generator, dtype=torch.float64)
    return (edges[:-1] + torch.floor(u * (edges[1:] - edges[:-1]))).long()


def gather_steps(latents, log_probs, sigmas, idx):
    """Time-major rows of the chosen steps: (x_j, x_{j+1}, sigma_j, sigma_{j+1}, old log-prob), each [T*B, ...]."""
    x = latents[:, idx].transpose(0, 1).flatten(0, 1)
    x_next = latents[:, idx + 1].transpose(0, 1).flatten(0, 1)
    old_log_probs = log_probs[:, idx].transpose(0, 1).flatten()
    batch = latents.shape[0]
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    return x, x_next, sigmas[idx].repeat_interleave(batch), sigmas[idx + 1].repeat_interleave(batch), old_log_probs


def flow_grpo_loss(
    velocity_fn, x, x_next, sigma, sigma_next, sigma_max, noise_level, old_log_probs, advantages, *,
    clip_range=1e-4, beta=0.0, ref_velocity_fn=None,
):
    """Clipped per-step likelihood-ratio loss + beta velocity KL. Returns (loss, metrics).

    velocity_fn(x, t) -> v [R, C, h, w] with grad; ref_velocity_fn: base model (no grad).
    sigma, sigma_next, old_log_probs [R]; advantages [B] (repeated over the T steps).
    """
    v = velocity_fn(x, sigma)
    mean, step_std = sde_step_mean_rows(x.float(), v.float(), sigma, sigma_next, sigma_max, noise_level)
    log_probs = gaussian_log_prob(x_next.float(), mean, step_std)
    ratio = torch.exp(log_probs - old_log_probs)
    policy_loss, clipfrac = clipped_policy_loss(advantages, ratio, clip_range)
    if beta > 0:
        with torch.no_grad():
            v_ref = ref_velocity_fn(x, sigma)
        kl = velocity_kl(v, v_ref, sigma)
    else:
        kl = policy_loss.new_zeros(())
    loss = policy_loss + beta * kl
    metrics = {
        "policy_loss": policy_loss.detach(), "kl_loss": kl.detach(), "ema_kl_loss": torch.zeros_like(kl.detach()),
        "loss": loss.detach(), "clipfrac": clipfrac.detach(), "log_prob": log_probs.detach().mean(),
    }
    return loss, metrics
