"""Flow-GRPO baseline objective: step selection, row layout, per-step log-probs
and ratios against an independent Normal density, gradient on-policy."""

import math

import pytest
import torch

from advantage_weighted_matching.flow_grpo import flow_grpo_loss, gather_steps, select_sde_steps
from advantage_weighted_matching.sde import sde_step, sde_step_mean, sde_step_mean_rows


def test_select_sde_steps_stratified_within_stochastic_steps():
    # 14 steps, sde_frac 0.5 -> 7 eligible steps; T = 3 strata floor(linspace(0, 7, 4)) = [0, 2), [2, 4), [4, 7)
    seen = [set(), set(), set()]
    for seed in range(200):
        idx = select_sde_steps(3, 14, 0.5, 0.9, torch.Generator().manual_seed(seed)).tolist()
        for k, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 7)]):
            assert lo <= idx[k] < hi
            seen[k].add(idx[k])
    assert seen == [{0, 1}, {2, 3}, {4, 5, 6}]
    with pytest.raises(ValueError, match="only 7 stochastic steps"):
        select_sde_steps(8, 14, 0.5, 0.9)


def test_gather_steps_is_time_major():
    B, N = 2, 5
    latents = torch.arange(B * (N + 1), dtype=torch.float32).view(B, N + 1, 1, 1, 1)  # value = b * 6 + j
    log_probs = torch.arange(B * N, dtype=torch.float32).view(B, N) * 10  # value = (b * 5 + j) * 10
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    x, x_next, sigma, sigma_next, old = gather_steps(latents, log_probs, sigmas, torch.tensor([1, 3]))
    # rows: (step 1, b 0), (step 1, b 1), (step 3, b 0), (step 3, b 1)
    assert x.flatten().tolist() == [1, 7, 3, 9]
    assert x_next.flatten().tolist() == [2, 8, 4, 10]
    assert old.tolist() == [10, 60, 30, 80]
    assert sigma.tolist() == pytest.approx([0.8, 0.8, 0.4, 0.4])
    assert sigma_next.tolist() == pytest.approx([0.6, 0.6, 0.2, 0.2])


def test_rows_mean_matches_scalar_step():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.5]), torch.tensor([0.9, 0.6, 0.3])
    mean, step_std = sde_step_mean_rows(x, v, sigma, sigma_next, 0.9, 0.7)
    for i in range(3):
        mean_i, std_i = sde_step_mean(x[i:i + 1], v[i:i + 1], float(sigma[i]), float(sigma_next[i]), 0.9, 0.7)
        torch.testing.assert_close(mean[i:i + 1], mean_i, rtol=1e-6, atol=1e-6)
        assert step_std[i].item() == pytest.approx(std_i, rel=1e-6)
    # sigma == 1 uses sigma_max: std = sqrt(1 / (1 - 0.9)) * 0.7, step std = std * sqrt(0.1)
    assert step_std[0].item() == pytest.approx(math.sqrt(10) * 0.7 * math.sqrt(0.1), rel=1e-6)


def test_loss_on_policy_ratio_one_and_gradient():
    torch.manual_seed(1)
    B, T = 3, 2
    net = torch.nn.Linear(4, 4)
    x = torch.randn(T * B, 4)
    sigma = torch.tensor([0.8] * B + [0.5] * B)
    sigma_next = torch.tensor([0.6] * B + [0.3] * B)
    with torch.no_grad():  # sample x_next from the same policy, keep its log-prob
        v = net(x)
        x_next, old_log_probs = [], []
        for r in range(T * B):
            step, lp = sde_step(x[r:r + 1], v[r:r + 1], float(sigma[r]), float(sigma_next[r]), 0.9, 0.7,
                                noise=torch.randn(1, 4))
            x_next.append(step)
            old_log_probs.append(lp)
        x_next, old_log_probs = torch.cat(x_next), torch.cat(old_log_probs)
    advantages = torch.tensor([1.0, -0.5, 2.0])

    loss, metrics = flow_grpo_loss(lambda x, t: net(x), x, x_next, sigma, sigma_next, 0.9, 0.7, old_log_probs,
                                   advantages, clip_range=0.2)
    assert metrics["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-advantages.repeat(T).mean().item(), abs=1e-5)  # ratio = 1
    grad = torch.autograd.grad(loss, net.weight)[0]

    # Independent: -mean(A * log N(x_next; mean_theta, step_std^2)) differentiated directly.
    mean, step_std = sde_step_mean_rows(x, net(x), sigma, sigma_next, 0.9, 0.7)
    log_density = torch.distributions.Normal(mean, step_std.expand_as(mean)).log_prob(x_next).mean(dim=1)
    torch.testing.assert_close(log_density.detach(), old_log_probs, rtol=1e-5, atol=1e-5)
    expected = torch.autograd.grad(-(advantages.repeat(T) * log_density).mean(), net.weight)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_kl_term_and_clipping():
    torch.manual_seed(2)
    net = torch.nn.Linear(4, 4)
    x, x_next = torch.randn(2, 4), torch.randn(2, 4)
    sigma, sigma_next = torch.tensor([0.7, 0.7]), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        mean, step_std = sde_step_mean_rows(x, net(x), sigma, sigma_next, 0.9, 0.7)
        lp = torch.distributions.Normal(mean, step_std.expand_as(mean)).log_prob(x_next).mean(dim=1)
    old = lp - torch.tensor([0.5, -0.5])  # ratios e^0.5 and e^-0.5: both clipped at eps 0.1
    ref = lambda x, t: net(x) + 1.0  # noqa: E731 - reference velocity offset by exactly 1
    loss, metrics = flow_grpo_loss(lambda x, t: net(x), x, x_next, sigma, sigma_next, 0.9, 0.7, old,
                                   torch.tensor([1.0, 1.0]), clip_range=0.1, beta=0.5, ref_velocity_fn=ref)
    assert metrics["kl_loss"].item() == pytest.approx(1.0, rel=1e-6)
    assert metrics["clipfrac"].item() == 1.0
    # A = 1: max(-r, -clip(r)) = -min(r, clip(r)) -> -1.1 for r = e^0.5, -e^-0.5 for r = e^-0.5
    expected_policy = (-1.1 - math.exp(-0.5)) / 2
    assert metrics["policy_loss"].item() == pytest.approx(expected_policy, rel=1e-5)
    assert loss.item() == pytest.approx(expected_policy + 0.5, rel=1e-5)
