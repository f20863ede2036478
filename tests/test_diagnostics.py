"""The benchmark's statistics (issue H.4): bootstrap CIs, smoothing, the speedup, and the
gradient-estimator statistics, on constructed cases with known answers; the per-sample
gradients of both real losses add up to the batch gradient."""

import types

import numpy as np
import pytest
import torch

from advantage_weighted_matching import diagnostics as d


# ---- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_of_two_points_spans_both():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95% CI is [0, 1]
    estimate, low, high = d.bootstrap_ci(np.array([0.0, 1.0]), np.mean, num_resamples=4000)
    assert (estimate, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_of_a_constant_is_that_constant_and_paired_units_stay_paired():
    assert d.bootstrap_ci(np.full(5, 0.3), np.mean)[1:] == (pytest.approx(0.3), pytest.approx(0.3))
    a = np.random.default_rng(0).normal(size=20)
    estimate, low, high = d.bootstrap_ci((a + 1, a), lambda x, y: np.mean(x - y))  # paired: x - y == 1 always
    assert estimate == pytest.approx(1) and low == pytest.approx(1) and high == pytest.approx(1)
    with pytest.raises(ValueError, match="units"):
        d.bootstrap_ci((np.zeros(3), np.zeros(4)), lambda x, y: 0.0)


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval():
    sample = np.random.default_rng(1).normal(0.0, 1.0, 400)
    estimate, low, high = d.bootstrap_ci(sample, np.mean, num_resamples=4000, seed=2)
    half_width = 1.96 * sample.std(ddof=1) / np.sqrt(len(sample))  # ~0.098
    assert estimate == pytest.approx(sample.mean())
    assert low == pytest.approx(estimate - half_width, abs=0.015) and high == pytest.approx(estimate + half_width,
                                                                                            abs=0.015)


def test_bootstrap_band_of_curves_is_per_point():
    curves = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])  # 2 seeds x 3 evaluations
    mean, low, high = d.bootstrap_ci(curves, lambda c: c.mean(0), num_resamples=2000)
    assert mean.tolist() == [0.0, 2.0, 2.0] and low.tolist() == [0.0, 1.0, 2.0] and high.tolist() == [0.0, 3.0, 2.0]


# ---- curves and speedup -----------------------------------------------------------------------


def test_smooth_is_a_trailing_mean():
    assert d.smooth([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert d.smooth([[1.0, 3.0]], 3).tolist() == [[1.0, 2.0]]


def test_speedup_on_constructed_curves():
    x = np.array([[0.0, 10.0, 20.0, 30.0, 40.0]])
    flow_grpo = np.array([[0.0, 0.2, 0.4, 0.4, 0.4]])  # reaches its final 0.4 at x = 20
    awm = np.array([[0.0, 0.4, 0.5, 0.5, 0.5]])  # first reaches 0.4 at x = 10
    assert d.speedup(x, awm, x, flow_grpo, window=1) == pytest.approx((2.0, 0.4, 20.0, 10.0))
    slow = np.array([[0.0, 0.1, 0.2, 0.3, 0.35]])
    assert d.speedup(x, slow, x, flow_grpo, window=1)[0] == 0.0  # never reaches it
    # seed means: the two AWM seeds average to the first curve above
    awm_seeds = np.array([[0.0, 0.3, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0.5, 0.5]])
    assert d.speedup(np.repeat(x, 2, 0), awm_seeds, x, flow_grpo, window=1)[0] == 2.0
    assert d.time_to_reach([1, 2, 3], [0.1, 0.2, 0.3], 0.2) == 2.0
    flat = np.array([[0.3, 0.2, 0.25, 0.3, 0.1]])  # Flow-GRPO ends below the shared start
    assert d.speedup(x, np.array([[0.3, 0.5, 0.5, 0.5, 0.5]]), x, flat, window=1)[0] == 1.0


# ---- gradient statistics ----------------------------------------------------------------------


def test_variance_over_squared_mean_exact():
    # rows [1, 0], [3, 0]: mean [2, 0], unbiased variance 2 -> 2 / 4
    assert d.variance_over_squared_mean(torch.tensor([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(0.5)


def test_snr_per_sample_by_hand():
    # rows [1, 0], [3, 0], [2, 2], [2, -2]: mean [2, 0], ||mean||^2 = 4; unbiased variances 2/3 and 8/3,
    # tr Cov = 10/3; noise floor tr Cov / N = 5/6; (4 - 5/6) / (10/3) = 19/20
    rows = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    assert d.snr_per_sample(rows) == pytest.approx(0.95)
    # pure noise around a zero mean: the floor removed, the estimate is about 0 (the plain ratio saturates near N)
    noise = torch.randn(400, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(d.snr_per_sample(noise)) < 0.01
    assert d.variance_over_squared_mean(noise) == pytest.approx(400, rel=0.25)


def test_half_batch_cosine_on_constructed_batches():
    same = torch.tensor([[1.0, 2.0]]).repeat(6, 1)
    assert d.half_batch_cosine(same, 5)[0] == pytest.approx(1.0)
    assert d.half_batch_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), 5)[0] == pytest.approx(-1.0)
    # rows e1, e1, e2, e2: a split is {e1, e1} | {e2, e2} (cosine 0) with probability 1/3, else cosine 1
    mean, values = d.half_batch_cosine(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), 600)
    assert set(np.round(values, 12)) == {0.0, 1.0} and mean == pytest.approx(2 / 3, abs=0.06)


def test_half_batch_cosine_of_noisy_rows_matches_the_formula():
    # mean mu = e1, per-sample variance s^2 = 50 (1 per coordinate), N = 200:
    # E cos ~ |mu|^2 / (|mu|^2 + 2 s^2 / N) = 1 / (1 + 0.5)
    rows = torch.randn(200, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows[:, 0] += 1.0
    stats = d.gradient_stats(rows, num_splits=400)
    assert stats["half_batch_cosine"] == pytest.approx(2 / 3, abs=0.05)
    # E |mean|^2 = |mu|^2 + s^2 / N = 1.25, so the ratio is about 50 / 1.25
    assert stats["variance_over_squared_mean"] == pytest.approx(40, rel=0.1)
    assert stats["snr_per_sample"] == pytest.approx(1 / 50, rel=0.2)  # ||mu||^2 / s^2, unbiased
    assert stats["num_samples"] == 200


def test_per_sample_gradients_of_a_linear_loss_are_its_inputs():
    weight = torch.zeros(3, requires_grad=True)
    inputs = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    gradients = d.per_sample_gradients(lambda i: weight @ inputs[i], [weight], 2)
    assert torch.equal(gradients, inputs.double())


def _velocity(weight, bias):
    return lambda x, t: weight * x + bias * t.view(-1, 1, 1, 1)


def test_awm_per_sample_gradients_average_to_the_batch_gradient():
    from advantage_weighted_matching.objective import awm_loss

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1, 2, 4, 4, generator=g).requires_grad_(), torch.randn(1, 2, 4, 4, generator=g)
    bias.requires_grad_()
    B, T = 3, 2
    clean, noise = torch.randn(B, 2, 4, 4, generator=g), torch.randn(T, B, 2, 4, 4, generator=g)
    t, advantages = torch.rand(T, B, generator=g), torch.tensor([1.0, -0.5, 0.25])
    train = types.SimpleNamespace(weighting="ghuber", ghuber_power=0.25, loss_type="exp_first", clip_range=1.0)
    per_sample = d.per_sample_gradients(
        lambda b: d.awm_sample_loss(_velocity(weight, bias), clean[b:b + 1], noise[:, b], t[:, b],
                                    advantages[b:b + 1], train), [weight, bias], B)
    loss, _ = awm_loss(_velocity(weight, bias), clean.repeat(T, 1, 1, 1), noise.flatten(0, 1), t.reshape(-1),
                       advantages, T, weighting="ghuber", loss_type="exp_first", clip_range=1.0)
    batch = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [weight, bias])]).double()
    torch.testing.assert_close(per_sample.mean(0), batch, rtol=1e-5, atol=1e-9)


def test_flow_grpo_per_sample_gradients_average_to_the_batch_gradient():
    from advantage_weighted_matching.flow_grpo import flow_grpo_step_loss, step_rows

    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(1, 2, 4, 4, generator=g).requires_grad_(), torch.randn(1, 2, 4, 4, generator=g)
    bias.requires_grad_()
    B, N = 3, 5
    latents, log_probs = torch.randn(B, N + 1, 2, 4, 4, generator=g), -torch.rand(B, N, generator=g)
    sigmas = torch.linspace(1, 0, N + 1)
    steps, advantages = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, -0.5, 0.25])
    train = types.SimpleNamespace(clip_range=1e6)  # no clipping: the batch loss is the mean of the rows
    per_sample = d.per_sample_gradients(
        lambda b: d.flow_grpo_sample_loss(_velocity(weight, bias), latents[b:b + 1], log_probs[b:b + 1], sigmas,
                                          steps, advantages[b:b + 1], 0.7, train), [weight, bias], B)
    # the trainer's accumulation: each step's loss over the batch, averaged over the steps
    loss = torch.stack([flow_grpo_step_loss(_velocity(weight, bias), *step_rows(latents, log_probs, sigmas, j)[:4],
                                            float(sigmas[1]), 0.7, step_rows(latents, log_probs, sigmas, j)[4],
                                            advantages, clip_range=1e6)[0] for j in steps.tolist()]).mean()
    batch = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [weight, bias])]).double()
    torch.testing.assert_close(per_sample.mean(0), batch, rtol=1e-5, atol=1e-9)
