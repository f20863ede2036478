"""Training-timestep samplers against SPEC section 5 ("Timesteps per micro-batch").

Preset geometry: N = num_steps = 14, f = timestep_fraction = 0.9 -> int(N f) = 12,
T = train_timesteps = 6.
"""

import math

import pytest
import torch
from scipy.stats import norm

from advantage_weighted_matching.timesteps import (
    continuous_times,
    discrete_step_indices,
    sample_train_times,
    shift_time,
)

N, F, T, B = 14, 0.9, 6, 5
SEEDS = range(300)

# Strata [lo_k, hi_k), computed by hand (see the docstrings of each test).
STRATA = {
    # floor(linspace(0, 12, 7)) = [0, 2, 4, 6, 8, 10, 12]
    "discrete": [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)],
    # linspace(1, 12, 7) = 1, 2.833, 4.667, 6.5, 8.333, 10.167, 12 -> floors 1, 2, 4, 6, 8, 10, 12
    "discrete_wo_init": [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)],
    # index 0, then linspace(1, 12, 6) = 1, 3.2, 5.4, 7.6, 9.8, 12 -> floors 1, 3, 5, 7, 9, 12
    "discrete_with_init": [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 12)],
}


def _sigmas():
    """A strictly decreasing SD3-like grid of N + 1 values (shifted linspace, last 0)."""
    return shift_time(torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64), 3.0)


@pytest.mark.parametrize("time_type", sorted(STRATA))
def test_discrete_indices_one_per_stratum_and_every_value_occurs(time_type):
    strata = STRATA[time_type]
    seen = [set() for _ in strata]
    for seed in SEEDS:
        idx = discrete_step_indices(time_type, T, N, F, generator=torch.Generator().manual_seed(seed))
        assert idx.dtype == torch.long
        assert idx.shape == (T,)
        for k, (lo, hi) in enumerate(strata):
            assert lo <= int(idx[k]) < hi, (time_type, seed, idx.tolist())
            seen[k].add(int(idx[k]))
    assert seen == [set(range(lo, hi)) for lo, hi in strata]


def test_discrete_with_init_always_starts_at_index_zero():
    for seed in range(50):
        idx = discrete_step_indices("discrete_with_init", T, N, F, generator=torch.Generator().manual_seed(seed))
        assert int(idx[0]) == 0
        assert (idx[1:] >= 1).all()


def test_discrete_index_12_is_never_drawn():
    """int(N f) = 12 is the upper edge of the last stratum (exclusive)."""
    for time_type in STRATA:
        for seed in range(100):
            idx = discrete_step_indices(time_type, T, N, F, generator=torch.Generator().manual_seed(seed))
            assert int(idx.max()) <= 11


@pytest.mark.parametrize("time_type", sorted(STRATA))
def test_discrete_times_are_sigmas_at_indices_shared_over_batch(time_type):
    sigmas = _sigmas()
    for seed in range(20):
        t = sample_train_times(time_type, T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(seed))
        idx = discrete_step_indices(time_type, T, N, F, generator=torch.Generator().manual_seed(seed))
        assert t.shape == (T, B)
        assert t.dtype == torch.float64
        for b in range(B):
            assert torch.equal(t[:, b], sigmas[idx])
        # Distinct grid: recover each index and check it is in its stratum.
        for k, (lo, hi) in enumerate(STRATA[time_type]):
            (matches,) = torch.nonzero(sigmas == t[k, 0], as_tuple=True)
            assert matches.numel() == 1 and lo <= int(matches[0]) < hi


def test_discrete_with_init_first_time_is_first_sigma():
    sigmas = _sigmas()
    t = sample_train_times("discrete_with_init", T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t[0], torch.full((B,), float(sigmas[0]), dtype=torch.float64))
    assert float(sigmas[0]) == 1.0


def test_discrete_accepts_list_sigmas():
    sigmas = _sigmas().tolist()
    t = sample_train_times("discrete", T, 2, sigmas, F, 3.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (T, 2)
    assert set(t.flatten().tolist()) <= set(sigmas)


def _unshift(t, s):
    """Inverse of t' = s t / (1 + (s - 1) t): t = t' / (s - (s - 1) t')."""
    return t / (s - (s - 1) * t)


def test_shift_time_formula_by_hand():
    # s = 3: t = 0.5 -> 1.5 / 2 = 0.75; t = 0.2 -> 0.6 / 1.4; t = 1 -> 1; t = 0 -> 0
    got = shift_time(torch.tensor([0.5, 0.2, 1.0, 0.0], dtype=torch.float64), 3.0)
    torch.testing.assert_close(got, torch.tensor([0.75, 0.6 / 1.4, 1.0, 0.0], dtype=torch.float64))
    assert shift_time(0.25, 1.0) == 0.25


def test_uniform_one_value_per_stratum_of_0p2_1_per_column():
    s = 3.0
    width = 0.8 / T
    unsorted_columns = 0
    for seed in range(100):
        t = continuous_times("uniform", T, B, s, generator=torch.Generator().manual_seed(seed))
        assert t.shape == (T, B) and t.dtype == torch.float64
        pre = _unshift(t, s)
        # the round trip of the analytical inverse
        torch.testing.assert_close(shift_time(pre, s), t, rtol=0, atol=1e-14)
        assert (pre >= 0.2 - 1e-12).all() and (pre <= 1.0 + 1e-12).all()
        for b in range(B):
            column = pre[:, b]
            strata = torch.floor((column - 0.2) / width + 1e-9).long().clamp(max=T - 1)
            assert sorted(strata.tolist()) == list(range(T)), (seed, b, column.tolist())
            if not torch.equal(column, column.sort().values) and not torch.equal(
                column, column.sort(descending=True).values
            ):
                unsorted_columns += 1
    # Shuffled per column: of 500 columns of 6 values, nearly all are neither ascending nor descending.
    assert unsorted_columns > 450


def test_uniform_columns_are_shuffled_independently():
    t = continuous_times("uniform", T, 8, 3.0, generator=torch.Generator().manual_seed(0))
    orders = {tuple(t[:, b].argsort().tolist()) for b in range(8)}
    assert len(orders) > 1


def test_uniform_with_shift_one_is_unshifted():
    t = continuous_times("uniform", T, B, 1.0, generator=torch.Generator().manual_seed(5))
    width = 0.8 / T
    for b in range(B):
        strata = torch.floor((t[:, b] - 0.2) / width).long()
        assert sorted(strata.tolist()) == list(range(T))


def test_logit_normal_strata_of_normal_quantiles():
    s = 3.0
    edges = [norm.ppf(k / T) for k in range(T + 1)]  # -inf, ..., +inf
    for seed in range(100):
        t = continuous_times("logit_normal", T, B, s, generator=torch.Generator().manual_seed(seed))
        assert t.shape == (T, B) and t.dtype == torch.float64
        assert (t >= 0.01).all() and (t <= 1.0).all()
        # one value per timestep row, shared by every sample of the micro-batch (reference:
        # T draws, repeat_interleave over the batch)
        assert torch.equal(t, t[:, :1].expand(T, B))
        for b in range(B):
            column = t[:, b]
            z = torch.logit(_unshift(column, s)).sort().values  # pre-sigmoid values, ascending
            for k in range(T):
                if k == 0 and float(column.min()) == 0.01:
                    continue  # clamped: only the lowest stratum can fall below 0.01
                assert edges[k] - 1e-9 <= float(z[k]) <= edges[k + 1] + 1e-9, (seed, b, z.tolist(), edges)


def test_logit_normal_by_hand():
    # T = 2, s = 1 (no shift): strata [0, 0.5) and [0.5, 1); u_k = (k + r_k) / 2 with r_k the
    # generator's first two uniforms; z = Phi^-1(u); t = sigmoid(z), rows in randperm order.
    g = torch.Generator().manual_seed(11)
    r = torch.rand(2, generator=g, dtype=torch.float64)
    perm = torch.randperm(2, generator=g)
    u = [(0 + float(r[0])) / 2, (1 + float(r[1])) / 2]
    z = [norm.ppf(v) for v in u]
    want = [1 / (1 + math.exp(-z[int(i)])) for i in perm]
    t = continuous_times("logit_normal", 2, 3, 1.0, generator=torch.Generator().manual_seed(11))
    for k in range(2):
        for b in range(3):
            assert float(t[k, b]) == pytest.approx(max(want[k], 0.01), rel=1e-12)


def test_logit_normal_clamps_at_0p01():
    # With T = 1000 strata the lowest pre-sigmoid value is below ppf(0.001) = -3.09; with s = 0.01
    # shifted times s t / (1 + (s - 1) t) of the lowest strata fall far below 0.01.
    t = continuous_times("logit_normal", 1000, 1, 0.01, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) == 0.01
    assert (t >= 0.01).all()
    assert (t == 0.01).sum() > 1


@pytest.mark.parametrize("time_type", ["uniform", "logit_normal", "discrete", "discrete_wo_init"])
def test_reproducible_with_seeded_generator(time_type):
    sigmas = _sigmas()
    a = sample_train_times(time_type, T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(7))
    b = sample_train_times(time_type, T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(7))
    c = sample_train_times(time_type, T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(8))
    d = sample_train_times(time_type, T, B, sigmas, F, 3.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert not (torch.equal(a, c) and torch.equal(a, d))


def test_unknown_time_types_raise():
    with pytest.raises(ValueError, match="bogus"):
        sample_train_times("bogus", T, B, _sigmas(), F, 3.0)
    with pytest.raises(ValueError, match="uniform"):
        discrete_step_indices("uniform", T, N, F)


def test_stratum_edges_examples_match_spec_formula():
    """Cross-check the hand tables with floor(linspace(...)) computed in float64."""
    usable = int(N * F)
    assert usable == 12
    for time_type, (start, count) in {
        "discrete": (0, T),
        "discrete_wo_init": (1, T),
    }.items():
        edges = [math.floor(start + (usable - start) * i / count) for i in range(count + 1)]
        assert list(zip(edges[:-1], edges[1:])) == STRATA[time_type]
    edges = [math.floor(1 + 11 * i / (T - 1)) for i in range(T)]
    assert [(0, 1)] + list(zip(edges[:-1], edges[1:])) == STRATA["discrete_with_init"]
