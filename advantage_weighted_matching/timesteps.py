"""Training-timestep samplers (SPEC section 5, "Timesteps per micro-batch").

All return ``t`` of shape [T, B] (T = train_timesteps, B = micro-batch size);
the trainer flattens it time-major to T * B rows. Discrete types draw T step
indices shared by the whole micro-batch and read ``t = sigmas[idx]`` (the
scheduler's ``timesteps / 1000``). ``uniform`` draws per (timestep, sample);
``logit_normal`` draws T values shared by every sample of the micro-batch (the
reference draws T and repeats each over the batch).

Stratification: stratum k spans ``[lo_k, hi_k)``; ``idx_k = lo_k + floor(u_k (hi_k - lo_k))``.
"""

import math

import torch

DISCRETE = ("discrete", "discrete_wo_init", "discrete_with_init")


def _stratified_indices(start, stop, count, generator):
    """One index per stratum of floor(linspace(start, stop, count + 1)) -> LongTensor [count]."""
    edges = torch.linspace(start, stop, count + 1, dtype=torch.float64).floor()
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return (lo + torch.floor(u * (hi - lo))).long()


def discrete_step_indices(time_type, num_timesteps, num_steps, timestep_fraction, generator=None):
    """Step indices [T] into the rollout grid for the discrete time types."""
    usable = int(num_steps * timestep_fraction)
    if time_type == "discrete":
        return _stratified_indices(0, usable, num_timesteps, generator)
    if time_type == "discrete_wo_init":
        return _stratified_indices(1, usable, num_timesteps, generator)
    if time_type == "discrete_with_init":
        rest = _stratified_indices(1, usable, num_timesteps - 1, generator)
        return torch.cat([torch.zeros(1, dtype=torch.long), rest])
    raise ValueError(f"not a discrete time type: {time_type!r}")


def shift_time(t, shift):
    """SD3 time shift t -> s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def _shuffle_columns(values, generator):
    """Independently permute each column of [T, B] `values` along T."""
    order = torch.rand(values.shape, generator=generator, dtype=torch.float64).argsort(dim=0)
    return values.gather(0, order)


def continuous_times(time_type, num_timesteps, batch_size, time_shift, generator=None):
    """[T, B] times for `uniform` (stratified on [0.2, 1], per sample) or `logit_normal`
    (T stratified normal quantiles, shuffled, one value per row k shared by all B samples)."""
    strata = torch.arange(num_timesteps, dtype=torch.float64)
    if time_type == "uniform":
        u = (strata.unsqueeze(1) + torch.rand(num_timesteps, batch_size, generator=generator,
                                                dtype=torch.float64)) / num_timesteps
        t = _shuffle_columns(0.2 + 0.8 * u, generator)
        return shift_time(t, time_shift)
    if time_type == "logit_normal":
        u = (strata + torch.rand(num_timesteps, generator=generator, dtype=torch.float64)) / num_timesteps
        z = math.sqrt(2.0) * torch.erfinv(2 * u - 1)  # standard-normal quantiles of the strata
        z = z[torch.randperm(num_timesteps, generator=generator)]
        t = shift_time(torch.sigmoid(z), time_shift).clamp(min=0.01)
        return t.unsqueeze(1).expand(num_timesteps, batch_size).clone()
    raise ValueError(f"not a continuous time type: {time_type!r}")


def sample_train_times(
    time_type, num_timesteps, batch_size, sigmas, timestep_fraction, time_shift, generator=None
):
    """[T, B] float64 training times in (0, 1].

    `sigmas`: the rollout's flow grid (num_steps + 1 entries, last 0).
    """
    if time_type in DISCRETE:
        num_steps = len(sigmas) - 1
        idx = discrete_step_indices(time_type, num_timesteps, num_steps, timestep_fraction, generator)
        t = torch.as_tensor(sigmas, dtype=torch.float64)[idx]
        return t.unsqueeze(1).expand(num_timesteps, batch_size).clone()
    return continuous_times(time_type, num_timesteps, batch_size, time_shift, generator)
