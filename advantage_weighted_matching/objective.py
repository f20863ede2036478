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


def awm_loss(
    velocity_fn, clean, noise, t, advantages, num_timesteps, *, weighting="Uniform", ghuber_power=0.25,
    loss_type="exp_first", clip_range=1.0, beta=0.0, kl_weight="Uniform", ref_velocity_fn=None, ema_beta=0.0,
    kl_ema_weight="Uniform", ema_velocity_fn=None, off_policy=False,
):
    """The full AWM micro-batch loss ``policy + beta KL + ema_beta KL_ema``.

    velocity_fn(x_t, t) -> v [R, C, h, w] with grad (the policy);
    ref_velocity_fn / ema_velocity_fn: base model / `ema` adapter (called under no_grad).
    clean, noise [R, C, h, w] and t [R] are time-major rows; advantages [B].
    Off-policy, the old log-prob is the `ema` adapter's (the sampling policy's).
    Returns (loss, metrics dict of detached scalars).
    """
    x_t = noisy_latents(clean, noise, t)
    v = velocity_fn(x_t, t)
    lp = weight_log_prob(flow_matching_log_prob(v, noise, clean), t, weighting, ghuber_power)
    with torch.no_grad():
        v_ref = ref_velocity_fn(x_t, t) if beta > 0 else None
        v_ema = ema_velocity_fn(x_t, t) if (ema_beta > 0 or off_policy) else None
    if off_policy:
        lp_old = weight_log_prob(flow_matching_log_prob(v_ema, noise, clean), t, weighting, ghuber_power)
    else:
        lp_old = lp.detach()
    ratio = likelihood_ratio(lp, lp_old, loss_type, num_timesteps)
    policy_loss, clipfrac = clipped_policy_loss(advantages, ratio, clip_range)
    zero = policy_loss.new_zeros(())
    kl = velocity_kl(v, v_ref, t, kl_weight) if beta > 0 else zero
    ema_kl = velocity_kl(v, v_ema, t, kl_ema_weight) if ema_beta > 0 else zero
    loss = policy_loss + beta * kl + ema_beta * ema_kl
    metrics = {
        "policy_loss": policy_loss.detach(), "kl_loss": kl.detach(), "ema_kl_loss": ema_kl.detach(),
        "loss": loss.detach(), "clipfrac": clipfrac.detach(), "log_prob": lp.detach().mean(),
    }
    return loss, metrics
