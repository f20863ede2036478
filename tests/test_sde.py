"""Flow-matching SDE step, its log-density, and the SDE / Euler rollout (SPEC section 3b)."""

import math

import pytest
import torch

from advantage_weighted_matching.sde import gaussian_log_prob, sde_sample, sde_std, sde_step, sde_step_mean

# Worked example, by hand: sigma = 0.8, sigma_next = 0.6, sigma_max = 0.9, level = 0.7, x = 1, v = 2.
#   dt   = 0.6 - 0.8 = -0.2
#   std  = sqrt(0.8 / (1 - 0.8)) * 0.7 = sqrt(4) * 0.7 = 1.4        (sigma != 1: sigma itself)
#   std^2 = 1.96
#   x coefficient: 1 + 1.96 / (2 * 0.8) * (-0.2) = 1 - 1.225 * 0.2 = 0.755
#   v coefficient: (1 + 1.96 * (1 - 0.8) / (2 * 0.8)) * (-0.2) = (1 + 0.245) * (-0.2) = -0.249
#   mean = 0.755 * 1 + (-0.249) * 2 = 0.755 - 0.498 = 0.257
#   step std = std * sqrt(-dt) = 1.4 * sqrt(0.2) = 0.6260990337...
SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL = 0.8, 0.6, 0.9, 0.7


def test_sde_std_worked_example():
    assert sde_std(SIGMA, SIGMA_MAX, LEVEL) == pytest.approx(1.4, rel=1e-14)


def test_sde_std_sigma_one_uses_sigma_max():
    # sigma == 1: sqrt(1 / (1 - 0.9)) * 0.7 = sqrt(10) * 0.7 = 2.2135943621...
    assert sde_std(1.0, SIGMA_MAX, LEVEL) == pytest.approx(2.2135943621178655, rel=1e-12)
    assert sde_std(1.0, 0.75, 1.0) == pytest.approx(2.0, rel=1e-14)  # sqrt(1 / 0.25)
    assert math.isfinite(sde_std(1.0, SIGMA_MAX, LEVEL))
    # sigma_max is used only at sigma == 1
    assert sde_std(0.5, 0.1, 1.0) == pytest.approx(1.0, rel=1e-14)  # sqrt(0.5 / 0.5)


def test_sde_std_level_zero():
    assert sde_std(0.8, 0.9, 0.0) == 0.0


def test_sde_step_mean_worked_example():
    x = torch.tensor([[1.0]], dtype=torch.float64)
    v = torch.tensor([[2.0]], dtype=torch.float64)
    mean, step_std = sde_step_mean(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL)
    assert mean.item() == pytest.approx(0.257, rel=1e-12)
    assert step_std == pytest.approx(0.6260990336999411, rel=1e-12)


def test_sde_step_mean_at_sigma_one():
    # sigma = 1, sigma_next = 0.9, sigma_max = 0.9, level 0.7: std^2 = 10 * 0.49 = 4.9, dt = -0.1
    #   x coef = 1 + 4.9 / 2 * (-0.1) = 0.755; v coef = (1 + 0) * (-0.1) = -0.1
    #   x = 1, v = 2: mean = 0.755 - 0.2 = 0.555; step std = sqrt(4.9) * sqrt(0.1) = 0.7
    mean, step_std = sde_step_mean(torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64),
                                   1.0, 0.9, 0.9, 0.7)
    assert mean.item() == pytest.approx(0.555, rel=1e-12)
    assert step_std == pytest.approx(0.7, rel=1e-12)


def test_sde_step_with_noise_and_log_prob():
    # x' = mean + step_std * xi; with xi = 0.5: 0.257 + 0.6260990337 * 0.5 = 0.5700495168...
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    x_next, log_prob = sde_step(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL, noise=noise)
    std = 1.4 * math.sqrt(0.2)
    torch.testing.assert_close(x_next, torch.tensor([[0.257 + 0.5 * std, 0.257 - std]], dtype=torch.float64))
    # log N = -xi^2 / 2 - log(step_std) - log(2 pi) / 2, averaged over the two elements
    expected = (-(0.25 + 1.0) / 2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert log_prob.shape == (1,)
    assert log_prob.item() == pytest.approx(expected, rel=1e-12)


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v = torch.randn(3, 4, 5, 5, generator=g)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    x_next, log_prob = sde_step(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL, noise=noise)
    mean, step_std = sde_step_mean(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL)
    reference = torch.distributions.Normal(mean, step_std).log_prob(x_next).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob, reference, rtol=1e-5, atol=1e-5)


def test_rescoring_a_stored_sample():
    g = torch.Generator().manual_seed(1)
    x, v, other = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    mean, step_std = sde_step_mean(x, v, 0.6, 0.4, 0.97, 0.5)
    x_next, log_prob = sde_step(x, v, 0.6, 0.4, 0.97, 0.5, prev_sample=other)
    assert x_next is other
    reference = torch.distributions.Normal(mean, step_std).log_prob(other).mean(dim=1)
    torch.testing.assert_close(log_prob, reference, rtol=1e-12, atol=1e-12)
    # gradients flow through the mean (the policy), not through the stored sample
    v_req = v.clone().requires_grad_(True)
    _, lp = sde_step(x, v_req, 0.6, 0.4, 0.97, 0.5, prev_sample=other)
    lp.sum().backward()
    assert v_req.grad is not None and v_req.grad.abs().sum() > 0


def test_gaussian_log_prob_tensor_std():
    sample = torch.tensor([[0.0, 2.0]])
    mean = torch.zeros(1, 2)
    lp = gaussian_log_prob(sample, mean, torch.tensor(2.0))
    expected = ((-0.0 - 0.5) / 2) - math.log(2.0) - 0.5 * math.log(2 * math.pi)  # (0 + 4/8) / 2 elements
    assert lp.item() == pytest.approx(expected, rel=1e-6)


def test_level_zero_is_euler_exactly():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    x_next, log_prob = sde_step(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, 0.0)
    assert log_prob is None
    assert torch.equal(x_next, x + (SIGMA_NEXT - SIGMA) * v)
    # the SDE mean at level 0 is the Euler step too (std = 0)
    mean, step_std = sde_step_mean(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX, 0.0)
    assert step_std == 0.0
    torch.testing.assert_close(mean, x + (SIGMA_NEXT - SIGMA) * v, rtol=0, atol=1e-7)


def test_stochastic_step_requires_noise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="noise"):
        sde_step(x, x, SIGMA, SIGMA_NEXT, SIGMA_MAX, LEVEL)


# ---------------------------------------------------------------------------
SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.2, 0.0]


def _velocity_field(calls):
    def velocity(x, sigma):
        calls.append(sigma)
        return torch.sin(x) - sigma * x  # state-dependent, so the path matters

    return velocity


def test_deterministic_equals_hand_euler_loop():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    calls = []
    latents, log_probs = sde_sample(_velocity_field(calls), x0, SIGMAS, noise_level=0.7, sde_frac=1.0,
                                    generator=torch.Generator().manual_seed(0), deterministic=True)
    x, expected = x0, [x0]
    for i in range(len(SIGMAS) - 1):
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * (torch.sin(x) - SIGMAS[i] * x)
        expected.append(x)
    assert calls == SIGMAS[:-1]
    assert len(latents) == 6
    for got, want in zip(latents, expected):
        assert torch.equal(got, want)
    assert log_probs.shape == (2, 5)
    assert torch.equal(log_probs, torch.zeros(2, 5))


def test_sde_sample_stochastic_steps_follow_sde_frac():
    # num_steps 5, sde_frac 0.4: level = noise_level for i < 5 * 0.4 = 2 -> steps 0, 1
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 2, 2, 2, generator=g)
    latents, log_probs = sde_sample(_velocity_field([]), x0, SIGMAS, 0.7, 0.4, torch.Generator().manual_seed(9))
    assert log_probs.shape == (3, 5)
    assert (log_probs[:, :2] != 0).all()
    assert torch.equal(log_probs[:, 2:], torch.zeros(3, 3))
    # the ODE steps are exact Euler from the stochastic state
    for i in (2, 3, 4):
        x = latents[i]
        assert torch.equal(latents[i + 1], x + (SIGMAS[i + 1] - SIGMAS[i]) * (torch.sin(x) - SIGMAS[i] * x))
    # the stochastic steps replay with the same generator draws: step 0 uses sigma_max = sigmas[1] = 0.9
    replay = torch.Generator().manual_seed(9)
    x = x0
    for i in (0, 1):
        v = torch.sin(x) - SIGMAS[i] * x
        mean, step_std = sde_step_mean(x, v, SIGMAS[i], SIGMAS[i + 1], 0.9, 0.7)
        x_next = mean + step_std * torch.randn(x.shape, generator=replay)
        torch.testing.assert_close(latents[i + 1], x_next, rtol=1e-6, atol=1e-6)
        reference = torch.distributions.Normal(mean, step_std).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_probs[:, i], reference, rtol=1e-5, atol=1e-5)
        x = x_next


def test_sde_sample_reproducible_and_seed_dependent():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    a, la = sde_sample(_velocity_field([]), x0, SIGMAS, 0.7, 1.0, torch.Generator().manual_seed(1))
    b, lb = sde_sample(_velocity_field([]), x0, SIGMAS, 0.7, 1.0, torch.Generator().manual_seed(1))
    c, _ = sde_sample(_velocity_field([]), x0, SIGMAS, 0.7, 1.0, torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(la, lb)
    assert (a[-1] - c[-1]).abs().max() > 1e-3
    # noise_level 0 with sde_frac 1 is the ODE
    d, ld = sde_sample(_velocity_field([]), x0, SIGMAS, 0.0, 1.0, torch.Generator().manual_seed(1))
    e, _ = sde_sample(_velocity_field([]), x0, SIGMAS, 0.7, 1.0, None, deterministic=True)
    assert all(torch.equal(u, v) for u, v in zip(d, e))
    assert torch.equal(ld, torch.zeros(2, 5))
