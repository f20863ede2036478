"""Statistics for the AWM vs Flow-GRPO benchmark (issue H.4): bootstrap bands, the
speedup, and the variance of each method's policy-gradient estimator.

Gradient estimators. On one rollout batch of N images (one SDE rollout with its
per-step log-probs, so that both losses see the same images and advantages), the
per-sample gradients ``G [N, P]`` of the LoRA parameters come from the real losses:
``objective.awm_loss`` on the sample's clean latent at T fresh (t, eps) draws, and
``flow_grpo.flow_grpo_step_loss`` averaged over every trained SDE step of the sample
(SPEC 7; the trainer accumulates the same per-step losses). The
batch estimator is the row mean ``g = mean_i G_i``. Reported (both scale-free, so
the two losses' different magnitudes do not matter):

* ``variance_over_squared_mean`` = tr Cov(G_i) / ||g||^2: the per-sample variance
  (unbiased, summed over parameters) over the squared norm of the mean (itself
  noisy: E ||g||^2 = ||mu||^2 + tr Cov / N, so the ratio saturates near N);
* ``snr_per_sample`` = (||g||^2 - tr Cov / N) / tr Cov: an unbiased estimate of
  ||mu||^2 over the estimate of tr Cov (the noise floor removed, so it does not
  saturate; it can come out <= 0 when the batch cannot resolve the mean). One over it
  is the number of images a batch needs for a signal-to-noise ratio of 1;
* ``half_batch_cosine``: the cosine between the means of two disjoint random
  halves of the batch, averaged over splits; 1 for a noiseless estimator, about 0
  when noise dominates. For i.i.d. rows with mean mu and per-sample variance s^2,
  E cos ~ ||mu||^2 / (||mu||^2 + 2 s^2 / N).

Curves. ``smooth`` is a trailing mean over evaluations; ``speedup`` is Flow-GRPO's
time (or images) to reach its final smoothed reward over AWM's time to first reach
that value, computed on seed-mean curves; ``bootstrap_ci`` resamples seeds.
"""

import numpy as np
import torch

# ----------------------------------------------------------------------------- curves and bootstrap


def bootstrap_ci(data, statistic, num_resamples=2000, level=0.95, seed=0):
    """Percentile bootstrap over the first axis (the units, e.g. seeds).

    `data` is one array or a tuple of arrays sharing their first axis (resampled with
    the same indices: paired units); ``statistic(*arrays) -> float or array``.
    Returns (estimate, low, high), each shaped like the statistic.
    """
    arrays = tuple(np.asarray(d) for d in (data if isinstance(data, tuple) else (data,)))
    units = arrays[0].shape[0]
    if any(a.shape[0] != units for a in arrays):
        raise ValueError(f"arrays disagree on the number of units: {[a.shape[0] for a in arrays]}")
    rng = np.random.default_rng(seed)
    draws = np.stack([
        np.asarray(statistic(*(a[index] for a in arrays)), dtype=np.float64)
        for index in rng.integers(units, size=(num_resamples, units))
    ])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return np.asarray(statistic(*arrays), dtype=np.float64), low, high


def smooth(values, window=3):
    """Trailing moving average along the last axis (the first points average what exists so far)."""
    values = np.asarray(values, dtype=np.float64)
    cumulative = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, axis=-1)], axis=-1)
    end = np.arange(1, values.shape[-1] + 1)
    start = np.maximum(end - window, 0)
    return (cumulative[..., end] - cumulative[..., start]) / (end - start)


def time_to_reach(x, reward, target):
    """First x at which `reward` >= `target` (inf if never). x, reward [E]."""
    reached = np.nonzero(np.asarray(reward) >= target - 1e-12)[0]
    return float(np.asarray(x)[reached[0]]) if len(reached) else float("inf")


def speedup(awm_x, awm_reward, flow_grpo_x, flow_grpo_reward, window=3):
    """Flow-GRPO's x (wall-clock or images) to reach its final smoothed reward / AWM's x to
    first reach that value, on the seed-mean curves. Inputs [S, E] (seeds x evaluations).

    Returns (speedup, target, flow_grpo_x, awm_x); speedup 0 when AWM never reaches it, 1 when
    both start there (Flow-GRPO never improved on the shared starting point; inf if only AWM does).
    """
    fg = smooth(np.mean(flow_grpo_reward, axis=0), window)
    aw = smooth(np.mean(awm_reward, axis=0), window)
    target = float(fg[-1])
    t_fg = time_to_reach(np.mean(flow_grpo_x, axis=0), fg, target)
    t_aw = time_to_reach(np.mean(awm_x, axis=0), aw, target)
    if t_aw == 0:
        return (1.0 if t_fg == 0 else float("inf")), target, t_fg, t_aw
    return (t_fg / t_aw if np.isfinite(t_aw) else 0.0), target, t_fg, t_aw


# ----------------------------------------------------------------------------- gradient statistics


def variance_over_squared_mean(gradients):
    """tr Cov / ||mean||^2 of per-sample gradients [N, P] (unbiased covariance, N >= 2)."""
    gradients = torch.as_tensor(gradients, dtype=torch.float64)
    mean = gradients.mean(0)
    return float(gradients.var(0, unbiased=True).sum() / mean.pow(2).sum())


def snr_per_sample(gradients):
    """(||mean||^2 - tr Cov / N) / tr Cov of per-sample gradients [N, P] (unbiased Cov, N >= 2):
    ||mu||^2 / tr Cov with the noise floor tr Cov / N of ||mean||^2 removed."""
    gradients = torch.as_tensor(gradients, dtype=torch.float64)
    variance = gradients.var(0, unbiased=True).sum()
    squared_mean = gradients.mean(0).pow(2).sum() - variance / gradients.shape[0]
    return float(squared_mean / variance)


def cosine(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def half_batch_cosine(gradients, num_splits=32, seed=0):
    """Mean cosine between the mean gradients of two disjoint random halves of the rows
    of `gradients` [N, P], over `num_splits` splits. Returns (mean, per-split values)."""
    gradients = torch.as_tensor(gradients, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    half = gradients.shape[0] // 2
    values = []
    for _ in range(num_splits):
        order = torch.randperm(gradients.shape[0], generator=generator)
        values.append(cosine(gradients[order[:half]].mean(0), gradients[order[half:2 * half]].mean(0)))
    return float(np.mean(values)), values


def gradient_stats(gradients, num_splits=32, seed=0):
    """The estimator statistics of per-sample gradients [N, P] as a flat dict."""
    gradients = torch.as_tensor(gradients, dtype=torch.float64)
    cos, _ = half_batch_cosine(gradients, num_splits, seed)
    ratio = variance_over_squared_mean(gradients)
    return {
        "num_samples": gradients.shape[0], "half_batch_cosine": cos, "variance_over_squared_mean": ratio,
        "snr_per_sample": 1.0 / ratio - 1.0 / gradients.shape[0],  # = snr_per_sample(gradients), one pass
        "mean_grad_norm": float(gradients.mean(0).norm()),
        "per_sample_grad_norm": float(gradients.norm(dim=1).mean()),
    }


def per_sample_gradients(sample_loss, params, num_samples):
    """G [N, P] (float64, CPU): row i is the gradient of ``sample_loss(i)`` (a scalar tensor)
    with respect to the flattened `params`; one backward per sample."""
    rows = []
    for index in range(num_samples):
        grads = torch.autograd.grad(sample_loss(index), params, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double().cpu() for g, p in zip(grads, params)
        ]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- the two losses, per sample
# Thin wrappers: the only places that know the losses' signatures.


def awm_sample_loss(velocity_fn, clean, noise, t, advantage, train):
    """The AWM policy loss of one sample: clean [1, C, h, w] at T times t [T] with noise [T, C, h, w];
    advantage [1]; `train` the config's train block (weighting, ghuber_power, loss_type, clip_range).
    KL terms off (beta = ema_beta = 0): the policy-gradient estimator alone."""
    from advantage_weighted_matching.objective import awm_loss

    num_timesteps = t.shape[0]
    loss, _ = awm_loss(
        velocity_fn, clean.expand(num_timesteps, -1, -1, -1), noise, t, advantage, num_timesteps,
        weighting=train.weighting, ghuber_power=train.ghuber_power, loss_type=train.loss_type,
        clip_range=train.clip_range,
    )
    return loss


def flow_grpo_sample_loss(velocity_fn, latents, log_probs, sigmas, steps, advantage, noise_level, train):
    """The Flow-GRPO policy loss of one sample, averaged over its trained SDE steps: latents
    [1, N + 1, C, h, w], log_probs [1, N], sigmas [N + 1], steps [K] (LongTensor), advantage [1].
    KL off (beta = 0)."""
    from advantage_weighted_matching.flow_grpo import flow_grpo_step_loss, step_rows

    losses = []
    for j in steps.tolist():
        x, x_next, sigma, sigma_next, old_log_probs = step_rows(latents, log_probs, sigmas, j)
        loss, _ = flow_grpo_step_loss(velocity_fn, x, x_next, sigma, sigma_next, float(sigmas[1]), noise_level,
                                      old_log_probs, advantage, clip_range=train.clip_range)
        losses.append(loss)
    return torch.stack(losses).mean()
