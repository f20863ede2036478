"""Flow-GRPO baseline (SPEC 7): trained steps, per-step log-probs and ratios against an
independent Normal density, the mean-space KL by hand, clipping, gradient on-policy."""

import math

import pytest
import torch

from advantage_weighted_matching.flow_grpo import flow_grpo_step_loss, mean_space_kl, num_train_steps, step_rows
from advantage_weighted_matching.sde import sde_step, sde_step_mean, sde_step_mean_rows


def test_num_train_steps_is_every_leading_sde_step():
    assert num_train_steps(10, 0.99) == 9  # Flow-GRPO's SD3 presets: 9 of 10 steps
    assert num_train_steps(10, 1.0) == 10
    assert num_train_steps(14, 0.9, sde_frac=0.5) == 7  # deterministic steps carry no log-prob
    assert num_train_steps(8, 0.99, sde_frac=1.0) == 7


def test_step_rows_picks_step_j_of_every_sample():
    B, N = 2, 5
    latents = torch.arange(B * (N + 1), dtype=torch.float32).view(B, N + 1, 1, 1, 1)  # value = b * 6 + j
    log_probs = torch.arange(B * N, dtype=torch.float32).view(B, N) * 10  # value = (b * 5 + j) * 10
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    x, x_next, sigma, sigma_next, old = step_rows(latents, log_probs, sigmas, 3)
    assert x.flatten().tolist() == [3, 9]
    assert x_next.flatten().tolist() == [4, 10]
    assert old.tolist() == [30, 80]
    assert sigma.tolist() == pytest.approx([0.4, 0.4])
    assert sigma_next.tolist() == pytest.approx([0.2, 0.2])


def test_rows_mean_and_std_match_scalar_step():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.5]), torch.tensor([0.9, 0.6, 0.3])
    mean, std_dev, step_std = sde_step_mean_rows(x, v, sigma, sigma_next, 0.9, 0.7)
    for i in range(3):
        mean_i, std_i = sde_step_mean(x[i:i + 1], v[i:i + 1], float(sigma[i]), float(sigma_next[i]), 0.9, 0.7)
        torch.testing.assert_close(mean[i:i + 1], mean_i, rtol=1e-6, atol=1e-6)
        assert step_std[i].item() == pytest.approx(std_i, rel=1e-6)
    # by hand: std_dev_t = sqrt(sigma / (1 - sigma)) * 0.7; sigma == 1 uses sigma_max 0.9
    assert std_dev.flatten().tolist() == pytest.approx([math.sqrt(10) * 0.7, 2 * 0.7, 0.7], rel=1e-6)
    assert step_std[0].item() == pytest.approx(math.sqrt(10) * 0.7 * math.sqrt(0.1), rel=1e-6)


def test_mean_space_kl_by_hand():
    # sigma 0.5 -> 0.3, level 0.7: std_dev_t = sqrt(0.5 / 0.5) * 0.7 = 0.7, dt = -0.2.
    # The means differ by (v - v_ref) (1 + std^2 (1 - sigma) / (2 sigma)) dt = 1 * 1.245 * (-0.2) = -0.249,
    # so KL = 0.249^2 / (2 * 0.49) = 0.062001 / 0.98 = 0.0632663265...
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma, sigma_next = torch.full((2,), 0.5), torch.full((2,), 0.3)
    mean, std_dev, _ = sde_step_mean_rows(x, v, sigma, sigma_next, 0.9, 0.7)
    mean_ref, _, _ = sde_step_mean_rows(x, v + 1.0, sigma, sigma_next, 0.9, 0.7)
    assert mean_space_kl(mean, mean_ref, std_dev).item() == pytest.approx(0.249**2 / 0.98, rel=1e-5)
    # rows with different sigmas: the row mean of each row's own value
    kl_rows = mean_space_kl(torch.zeros(2, 4), torch.tensor([[1.0] * 4, [2.0] * 4]), torch.tensor([1.0, 0.5]))
    assert kl_rows.item() == pytest.approx((1 / 2 + 4 / 0.5) / 2)


def _on_policy_step(net, x, sigma, sigma_next, level=0.7, sigma_max=0.9, seed=0):
    with torch.no_grad():  # sample x_next from the same policy, keep its log-prob
        g = torch.Generator().manual_seed(seed)
        rows = [sde_step(x[r:r + 1], net(x[r:r + 1]), float(sigma[r]), float(sigma_next[r]), sigma_max, level,
                         noise=torch.randn(1, x.shape[1], generator=g)) for r in range(x.shape[0])]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def test_loss_on_policy_ratio_one_and_gradient():
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    sigma, sigma_next = torch.full((3,), 0.8), torch.full((3,), 0.6)
    x_next, old_log_probs = _on_policy_step(net, x, sigma, sigma_next)
    advantages = torch.tensor([1.0, -0.5, 2.0])

    loss, metrics = flow_grpo_step_loss(lambda x, t: net(x), x, x_next, sigma, sigma_next, 0.9, 0.7, old_log_probs,
                                        advantages, clip_range=0.2)
    assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() < 1e-10
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-5)  # ratio = 1
    grad = torch.autograd.grad(loss, net.weight)[0]

    # Independent: -mean(A * log N(x_next; mean_theta, step_std^2)) differentiated directly.
    mean, _, step_std = sde_step_mean_rows(x, net(x), sigma, sigma_next, 0.9, 0.7)
    log_density = torch.distributions.Normal(mean, step_std.expand_as(mean)).log_prob(x_next).mean(dim=1)
    torch.testing.assert_close(log_density.detach(), old_log_probs, rtol=1e-5, atol=1e-5)
    expected = torch.autograd.grad(-(advantages * log_density).mean(), net.weight)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_kl_term_and_clipping():
    torch.manual_seed(2)
    net = torch.nn.Linear(4, 4)
    x, x_next = torch.randn(2, 4), torch.randn(2, 4)
    sigma, sigma_next = torch.tensor([0.5, 0.5]), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        mean, _, step_std = sde_step_mean_rows(x, net(x), sigma, sigma_next, 0.9, 0.7)
        lp = torch.distributions.Normal(mean, step_std.expand_as(mean)).log_prob(x_next).mean(dim=1)
    old = lp - torch.tensor([0.5, -0.5])  # ratios e^0.5 and e^-0.5: both clipped at eps 0.1
    ref = lambda x, t: net(x) + 1.0  # noqa: E731 - reference velocity offset by exactly 1
    loss, metrics = flow_grpo_step_loss(lambda x, t: net(x), x, x_next, sigma, sigma_next, 0.9, 0.7, old,
                                        torch.tensor([1.0, 1.0]), clip_range=0.1, beta=0.5, ref_velocity_fn=ref)
    # mean-space KL of a unit velocity offset at sigma 0.5 -> 0.3 (see test_mean_space_kl_by_hand);
    # the old velocity-space KL would have said 1.0, 15.8x more
    assert metrics["kl_loss"].item() == pytest.approx(0.249**2 / 0.98, rel=1e-5)
    assert metrics["clipfrac"].item() == 1.0
    # A = 1: max(-r, -clip(r)) = -min(r, clip(r)) -> -1.1 for r = e^0.5, -e^-0.5 for r = e^-0.5
    expected_policy = (-1.1 - math.exp(-0.5)) / 2
    assert metrics["policy_loss"].item() == pytest.approx(expected_policy, rel=1e-5)
    assert loss.item() == pytest.approx(expected_policy + 0.5 * 0.249**2 / 0.98, rel=1e-5)
    # the KL gradient flows through mean_theta only: d/dW of beta * KL equals autograd of the formula
    x_req = x.clone()
    kl_only, _ = flow_grpo_step_loss(lambda x, t: net(x), x_req, x_next, sigma, sigma_next, 0.9, 0.7, lp,
                                     torch.zeros(2), clip_range=0.1, beta=1.0, ref_velocity_fn=ref)
    grad = torch.autograd.grad(kl_only, net.weight)[0]
    m, s, _ = sde_step_mean_rows(x, net(x), sigma, sigma_next, 0.9, 0.7)
    m_ref = sde_step_mean_rows(x, (net(x) + 1.0).detach(), sigma, sigma_next, 0.9, 0.7)[0]
    want = torch.autograd.grad(((m - m_ref) ** 2).mean(dim=1).div(2 * s.flatten() ** 2).mean(), net.weight)[0]
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
