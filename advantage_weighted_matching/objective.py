"""The AWM objective (SPEC section 5): flow-matching log-likelihood surrogate,
its weightings, likelihood ratio, clipped policy loss, and velocity-space KLs.

Rows are time-major: row ``k * B + b`` is timestep k of sample b (R = T * B).
Shapes: velocities, noise, clean latents [R, C, h, w]; t, lp [R]; advantages [B].

    x_t = (1 - t) x0 + t eps,   target velocity eps - x0
    lp  = - mean_CHW (v_theta(x_t, t) - (eps - x0))^2        (float64)

On-policy the old log-prob is ``lp.detach()``: the ratio is exactly 1 in value
and ``d ratio = d lp``, so the loss gradient is the advantage-weighted
flow-matching gradient ``-mean(A * d lp)``.
"""

import torch

WEIGHTINGS = ("Uniform", "t", "t**2", "huber", "ghuber")


def noisy_latents(clean, noise, t):
    """x_t = (1 - t) x0 + t eps with t [R] broadcast over C, h, w."""
    t = t.to(clean.dtype).view(-1, *([1] * (clean.ndim - 1)))
    return (1 - t) * clean + t * noise


def flow_matching_log_prob(v_pred, noise, clean):
    """lp [R] = -mean over C, h, w of (v_pred - (noise - clean))^2, in float64."""
    err = v_pred.double() - (noise.double() - clean.double())
    return -err.pow(2).mean(dim=tuple(range(1, err.ndim)))


def weight_log_prob(lp, t, weighting, ghuber_power=0.25):
    """Apply a SPEC weighting to lp [R] at times t [R]."""
    t = t.to(lp.dtype)
    if weighting == "Uniform":
        return lp
    if weighting == "t":
        return lp * t
    if weighting == "t**2":
        return lp * t**2
    if weighting == "huber":
        return -(torch.sqrt(-lp + 1e-10) - 1e-5) * t
    if weighting == "ghuber":
        p = ghuber_power
        return -((-lp + 1e-10) ** p - 1e-10**p) * t / p
    raise ValueError(f"weighting={weighting!r} is not one of {list(WEIGHTINGS)}")


def likelihood_ratio(lp, lp_old, loss_type, num_timesteps):
    """exp_first: exp(lp - lp_old) per row [T*B]; sum_first: exp(mean_T lp - mean_T lp_old) [B]."""
    if loss_type == "exp_first":
        return torch.exp(lp - lp_old)
    if loss_type == "sum_first":
        return torch.exp((lp - lp_old).view(num_timesteps, -1).mean(dim=0))
    raise ValueError(f"loss_type={loss_type!r} is not one of ['exp_first', 'sum_first']")


def clipped_policy_loss(advantages, ratio, clip_range):
    """mean(max(-A ratio, -A clamp(ratio, 1 - clip, 1 + clip))) and the clip fraction.

    `advantages` [B] are repeated over the T timesteps when `ratio` has T * B rows.
    """
    repeats = ratio.shape[0] // advantages.shape[0]
    advantages = advantages.to(ratio.dtype).repeat(repeats)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, clipfrac


def elbo_std(t):
    """std_t = 0.7 sqrt(t / (1 - clamp(t, 0, 0.99)))."""
    return 0.7 * torch.sqrt(t / (1 - t.clamp(0, 0.99)))


def velocity_kl(v_pred, v_ref, t, weighting="Uniform"):
    """KL surrogate between two velocity fields, a scalar.

    Uniform: mean((v - v_ref)^2); ELBO: per row divided by 2 std_t^2, then mean.
    """
    per_row = (v_pred.float() - v_ref.float()).pow(2).mean(dim=tuple(range(1, v_pred.ndim)))
    if weighting == "Uniform":
        return per_row.mean()
    if weighting == "ELBO":
        return (per_row / (2 * elbo_std(t.to(per_row.dtype)) ** 2)).mean()
    raise ValueError(f"KL weighting={weighting!r} is not one of ['Uniform', 'ELBO']")
