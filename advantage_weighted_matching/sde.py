"""Flow-matching SDE / ODE step with its Gaussian log-density (SPEC section 3b).

For step i with ``sigma = sigmas[i]``, ``sigma_next = sigmas[i + 1]``,
``dt = sigma_next - sigma`` (< 0), ``sigma_max = sigmas[1]``::

    std  = sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * level
    mean = x (1 + std^2 / (2 sigma) dt) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x'   = mean + std sqrt(-dt) xi

``level = 0`` (or ``deterministic``) is the Euler ODE step ``x' = x + dt v``.
The log-density of ``x'`` under ``N(mean, (std sqrt(-dt))^2)`` is averaged over
the non-batch dimensions (Flow-GRPO's per-step log-prob).
"""

import math

import torch


def sde_std(sigma, sigma_max, level):
    """Diffusion coefficient std(sigma) (a float)."""
    denominator = 1.0 - (sigma_max if sigma == 1.0 else sigma)
    return math.sqrt(sigma / denominator) * level


def sde_step_mean(x, velocity, sigma, sigma_next, sigma_max, level):
    """Mean [B, ...] and scalar step std `std * sqrt(-dt)` of the SDE transition."""
    dt = sigma_next - sigma
    std = sde_std(sigma, sigma_max, level)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + velocity * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std * math.sqrt(-dt)


def gaussian_log_prob(sample, mean, step_std):
    """log N(sample; mean, step_std^2), averaged over non-batch dims -> [B].

    `step_std` is a float or a tensor broadcastable to `sample`.
    """
    # A float std stays a Python number (a device tensor made from it would synchronise the GPU).
    if torch.is_tensor(step_std):
        step_std = step_std.to(sample.dtype)
    log_std = torch.log(step_std) if torch.is_tensor(step_std) else math.log(step_std)
    log_density = -((sample.detach() - mean) ** 2) / (2 * step_std**2) - log_std - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, sample.ndim)))


def sde_step(x, velocity, sigma, sigma_next, sigma_max, level, noise=None, prev_sample=None):
    """One SDE step. Returns (x_next [B, ...], log_prob [B] or None for ODE steps).

    With `prev_sample` given, no noise is drawn: the log-prob of that sample is
    returned (re-evaluating a stored rollout step).
    """
    if level == 0:
        x_next = x + (sigma_next - sigma) * velocity
        return x_next, None
    mean, step_std = sde_step_mean(x, velocity, sigma, sigma_next, sigma_max, level)
    if prev_sample is None:
        if noise is None:
            raise ValueError("a stochastic step needs `noise` (or `prev_sample` to score)")
        prev_sample = mean + step_std * noise
    return prev_sample, gaussian_log_prob(prev_sample, mean, step_std)


def sde_sample(velocity_fn, x, sigmas, noise_level, sde_frac, generator=None, deterministic=False, progress=None,
               draw_noise=None):
    """Roll the SDE (or the Euler ODE) over `sigmas` (num_steps + 1 entries, last 0).

    velocity_fn(x, sigma) -> v. Returns (latents: list of num_steps + 1 tensors,
    log_probs [B, num_steps] with zeros at deterministic steps). `draw_noise()` -> the
    next standard-normal draw like x, one per stochastic step (default: ``torch.randn``
    from `generator`).
    """
    if draw_noise is None:
        def draw_noise(shape=x.shape, device=x.device, dtype=x.dtype):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    sigmas = [float(s) for s in sigmas]
    num_steps = len(sigmas) - 1
    latents, log_probs = [x], []
    for i in range(num_steps):
        level = 0.0 if deterministic or i >= num_steps * sde_frac else noise_level
        velocity = velocity_fn(x, sigmas[i])
        noise = draw_noise() if level > 0 else None
        x, log_prob = sde_step(x, velocity, sigmas[i], sigmas[i + 1], sigmas[1], level, noise)
        log_probs.append(log_prob if log_prob is not None else x.new_zeros(x.shape[0]))
        latents.append(x)
        if progress is not None:
            progress()
    return latents, torch.stack(log_probs, dim=1)


def sde_step_mean_rows(x, velocity, sigma, sigma_next, sigma_max, level):
    """Row-wise `sde_step_mean` for training: sigma, sigma_next [R] tensors.

    Returns the mean [R, ...], ``std_dev_t = sqrt(sigma / (1 - sigma)) * level`` and the
    step std ``std_dev_t * sqrt(-dt)``, both [R, 1, ...] (broadcastable to x).
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = sigma.to(x.dtype)
    dt = (sigma_next.to(x.dtype) - sigma).view(shape)
    denominator = 1.0 - torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
    std = (torch.sqrt(sigma / denominator) * level).view(shape)
    sigma = sigma.view(shape)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + velocity * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std, std * torch.sqrt(-dt)
