"""The AWM objective against SPEC section 5, with hand-computed numbers."""

import pytest
import torch

from advantage_weighted_matching.objective import (
    awm_loss,
    clipped_policy_loss,
    elbo_std,
    flow_matching_log_prob,
    likelihood_ratio,
    noisy_latents,
    velocity_kl,
    weight_log_prob,
)

F64 = torch.float64


# --------------------------------------------------------------------------- log-prob


def test_noisy_latents_by_hand():
    clean = torch.tensor([[[[2.0]]], [[[2.0]]]])
    noise = torch.tensor([[[[-1.0]]], [[[-1.0]]]])
    t = torch.tensor([0.25, 1.0], dtype=F64)
    # 0.75 * 2 + 0.25 * -1 = 1.25; t = 1 -> noise
    assert noisy_latents(clean, noise, t).flatten().tolist() == [1.25, -1.0]


def test_flow_matching_log_prob_by_hand():
    # R = 2 rows of shape [C=1, h=1, w=2]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2)
    noise = torch.tensor([[0.5, 0.5], [1.0, 1.0]]).view(2, 1, 1, 2)
    clean = torch.tensor([[0.0, 1.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    # target = noise - clean = [[0.5, -0.5], [1, -1]]; err = [[0.5, 2.5], [2, 5]]
    # row 0: (0.25 + 6.25) / 2 = 3.25; row 1: (4 + 25) / 2 = 14.5
    lp = flow_matching_log_prob(v, noise, clean)
    assert lp.dtype == F64
    assert lp.shape == (2,)
    assert lp.tolist() == [-3.25, -14.5]


def test_flow_matching_log_prob_is_float64_from_half_inputs():
    v = torch.full((1, 1, 1, 1), 1.0 / 3.0, dtype=torch.float16)
    zero = torch.zeros_like(v)
    lp = flow_matching_log_prob(v, zero, zero)
    assert lp.dtype == F64
    assert lp.item() == -(float(v.item()) ** 2)  # squared in float64, not in half


# --------------------------------------------------------------------------- weightings

LP = torch.tensor([-0.0625, -4.0], dtype=F64)
TT = torch.tensor([0.5, 0.25], dtype=F64)

WEIGHTED = {
    "Uniform": [-0.0625, -4.0],
    "t": [-0.03125, -1.0],
    "t**2": [-0.015625, -0.25],
    # -(sqrt(0.0625 + 1e-10) - 1e-5) * 0.5, -(sqrt(4 + 1e-10) - 1e-5) * 0.25
    "huber": [-0.12499500009999998, -0.49999750000625],
    # p = 0.25: -(((0.0625 + 1e-10)^0.25 - (1e-10)^0.25) * 0.5 / 0.25)
    #           = -((0.5000000002 - 0.0031622776601684) * 2) = -0.99367544508
    # and       -(((4 + 1e-10)^0.25 - (1e-10)^0.25) * 0.25 / 0.25) = -(1.41421356237 - 0.00316227766)
    "ghuber": [-0.9936754450796633, -1.4110512847217656],
}


@pytest.mark.parametrize("weighting", sorted(WEIGHTED))
def test_weightings_by_hand(weighting):
    got = weight_log_prob(LP, TT, weighting, ghuber_power=0.25)
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor(WEIGHTED[weighting], dtype=F64), rtol=0, atol=1e-12)


def test_ghuber_power_is_used():
    # p = 0.5: -((0.0625 + 1e-10)^0.5 - 1e-5) * 0.5 / 0.5 = -(0.2500000002 - 0.00001)
    got = weight_log_prob(LP[:1], TT[:1], "ghuber", ghuber_power=0.5)
    torch.testing.assert_close(got, torch.tensor([-0.2499900002], dtype=F64), rtol=0, atol=1e-10)


def test_weighting_casts_float32_t_to_lp_dtype():
    got = weight_log_prob(LP, TT.float(), "t")
    assert got.dtype == F64


def test_unknown_weighting_raises():
    with pytest.raises(ValueError, match="cubic"):
        weight_log_prob(LP, TT, "cubic")


# --------------------------------------------------------------------------- ratio

# T = 2, B = 3; row k * B + b. d = lp - lp_old:
#   k=0: b0 0.1, b1 0.2, b2 0.3
#   k=1: b0 0.5, b1 -0.4, b2 0.0
LP_OLD = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25, -1.0], dtype=F64)
DIFF = torch.tensor([0.1, 0.2, 0.3, 0.5, -0.4, 0.0], dtype=F64)
LP_NEW = LP_OLD + DIFF


def test_exp_first_ratio_is_elementwise():
    ratio = likelihood_ratio(LP_NEW, LP_OLD, "exp_first", 2)
    torch.testing.assert_close(ratio, torch.exp(DIFF), rtol=1e-12, atol=0)
    assert ratio.shape == (6,)


def test_sum_first_ratio_averages_over_time_per_sample():
    ratio = likelihood_ratio(LP_NEW, LP_OLD, "sum_first", 2)
    # time-major: b0 (0.1 + 0.5) / 2 = 0.3, b1 (0.2 - 0.4) / 2 = -0.1, b2 (0.3 + 0) / 2 = 0.15
    expected = torch.exp(torch.tensor([0.3, -0.1, 0.15], dtype=F64))
    torch.testing.assert_close(ratio, expected, rtol=1e-12, atol=0)
    # a sample-major reading (pairs (0.1, 0.2), (0.3, 0.5), (-0.4, 0)) would give exp([0.15, 0.4, -0.2])
    assert not torch.allclose(ratio, torch.exp(torch.tensor([0.15, 0.4, -0.2], dtype=F64)))


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="mean_first"):
        likelihood_ratio(LP_NEW, LP_OLD, "mean_first", 2)


# --------------------------------------------------------------------------- clipped loss


def test_clipped_policy_loss_clips_on_both_sides():
    # T = 2, B = 2, A = [2, -1] repeated -> [2, -1, 2, -1]; clip 0.1
    advantages = torch.tensor([2.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 0.95, 1.02], dtype=F64, requires_grad=True)
    loss, clipfrac = clipped_policy_loss(advantages, ratio, 0.1)
    # row 0: A=2,  r=1.5 : max(-3.0, -2 * 1.1 = -2.2) = -2.2  (clipped above)
    # row 1: A=-1, r=0.5 : max(0.5, 0.9)              =  0.9  (clipped below)
    # row 2: A=2,  r=0.95: max(-1.9, -1.9)            = -1.9
    # row 3: A=-1, r=1.02: max(1.02, 1.02)            =  1.02
    # mean = (-2.2 + 0.9 - 1.9 + 1.02) / 4 = -0.545
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(-0.545, abs=1e-12)
    assert clipfrac.item() == 0.5
    (grad,) = torch.autograd.grad(loss, ratio)
    # clipped rows carry no gradient; others -A / 4
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -0.5, 0.25], dtype=F64))


def test_clipped_policy_loss_pessimistic_side_is_not_clipped():
    advantages = torch.tensor([2.0, -1.0])
    ratio = torch.tensor([0.5, 1.5], dtype=F64)
    loss, clipfrac = clipped_policy_loss(advantages, ratio, 0.1)
    # A=2, r=0.5: max(-1.0, -1.8) = -1.0;  A=-1, r=1.5: max(1.5, 1.1) = 1.5; mean 0.25
    assert loss.item() == pytest.approx(0.25, abs=1e-12)
    assert clipfrac.item() == 1.0


def test_clipped_policy_loss_repeats_advantage_time_major():
    # T = 2, B = 2: rows [k0b0, k0b1, k1b0, k1b1] use A [a0, a1, a0, a1]
    advantages = torch.tensor([1.0, 0.0])
    ratio = torch.tensor([1.0, 5.0, 3.0, 7.0], dtype=F64)
    loss, _ = clipped_policy_loss(advantages, ratio, 100.0)
    # only rows 0 and 2 count: -(1 + 3) / 4 = -1.0 (sample-major repeat_interleave would give -(1+5)/4)
    assert loss.item() == -1.0


# --------------------------------------------------------------------------- tiny velocity model


class TinyVelocity(torch.nn.Module):
    """v(x_t, t) = Linear([flatten(x_t), t]) reshaped to x_t's shape."""

    def __init__(self, shape=(2, 2, 2), seed=0, scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.shape = shape
        numel = shape[0] * shape[1] * shape[2]
        self.linear = torch.nn.Linear(numel + 1, numel)
        with torch.no_grad():
            self.linear.weight.mul_(scale)

    def forward(self, x_t, t):
        flat = torch.cat([x_t.flatten(1), t.to(x_t.dtype).unsqueeze(1)], dim=1)
        return self.linear(flat).view(x_t.shape)


def _batch(T=2, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(T * B, 2, 2, 2, generator=g)
    noise = torch.randn(T * B, 2, 2, 2, generator=g)
    t = torch.tensor([0.8] * B + [0.3] * B, dtype=F64)[: T * B]
    advantages = torch.tensor([1.0, -0.5, 2.0])[:B]
    return clean, noise, t, advantages


def _independent_lp(model, clean, noise, t, weighting="Uniform", p=0.25):
    tt = t.float().view(-1, 1, 1, 1)
    x_t = (1 - tt) * clean + tt * noise
    v = model(x_t, t)
    lp = -((v.double() - (noise.double() - clean.double())) ** 2).mean(dim=(1, 2, 3))
    if weighting == "ghuber":
        lp = -((-lp + 1e-10) ** p - 1e-10**p) * t / p
    return x_t, v, lp


@pytest.mark.parametrize("loss_type", ["exp_first", "sum_first"])
@pytest.mark.parametrize("weighting", ["Uniform", "ghuber"])
def test_on_policy_gradient_is_advantage_weighted_flow_matching(loss_type, weighting):
    model = TinyVelocity()
    clean, noise, t, advantages = _batch()
    T, B = 2, 3
    params = list(model.parameters())

    loss, metrics = awm_loss(
        model, clean, noise, t, advantages, T, weighting=weighting, loss_type=loss_type, clip_range=1e-4,
    )
    grads = torch.autograd.grad(loss, params)

    # value: ratio exactly 1, loss = mean(-A) = -(1 - 0.5 + 2) / 3
    assert loss.item() == pytest.approx(-2.5 / 3, abs=1e-12)
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["policy_loss"].item() == loss.item()

    _, _, lp = _independent_lp(model, clean, noise, t, weighting)
    direct = -(advantages.double().repeat(T) * lp).mean()
    expected = torch.autograd.grad(direct, params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        assert e.abs().max() > 1e-3  # non-trivial gradient


def test_on_policy_ratio_is_exactly_one():
    model = TinyVelocity()
    clean, noise, t, _ = _batch()
    _, _, lp = _independent_lp(model, clean, noise, t)
    for loss_type in ("exp_first", "sum_first"):
        ratio = likelihood_ratio(lp, lp.detach(), loss_type, 2)
        assert torch.equal(ratio.detach(), torch.ones_like(ratio))


def test_exp_first_and_sum_first_same_gradient_on_policy():
    """exp_first: -mean_rows(A dlp); sum_first: -mean_b(A_b mean_T dlp) = -(1/TB) sum A_b dlp: equal."""
    model = TinyVelocity(seed=3)
    clean, noise, t, advantages = _batch(seed=4)
    params = list(model.parameters())
    g_exp = torch.autograd.grad(
        awm_loss(model, clean, noise, t, advantages, 2, loss_type="exp_first", weighting="t")[0], params
    )
    g_sum = torch.autograd.grad(
        awm_loss(model, clean, noise, t, advantages, 2, loss_type="sum_first", weighting="t")[0], params
    )
    for a, b in zip(g_exp, g_sum):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- KL


def test_velocity_kl_uniform_and_elbo_by_hand():
    v_ref = torch.zeros(2, 1, 2, 2)
    v = torch.cat([torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)])  # per-row msq 1 and 4
    t = torch.tensor([0.5, 0.995], dtype=F64)
    assert velocity_kl(v, v_ref, t, "Uniform").item() == pytest.approx(2.5, rel=1e-7)
    # std_0.5 = 0.7 sqrt(0.5 / 0.5) = 0.7 -> 2 std^2 = 0.98
    # std_0.995 = 0.7 sqrt(0.995 / (1 - 0.99)) = 6.982478 -> 2 std^2 = 2 * 0.49 * 99.5 = 97.51
    # (1 / 0.98 + 4 / 97.51) / 2 = 0.5307147985
    assert velocity_kl(v, v_ref, t, "ELBO").item() == pytest.approx(0.5307147984822069, rel=1e-5)


def test_elbo_std_values():
    std = elbo_std(torch.tensor([0.5, 0.995, 0.0, 1.0], dtype=F64))
    torch.testing.assert_close(std, torch.tensor([0.7, 6.982478070141001, 0.0, 7.0], dtype=F64))


def test_velocity_kl_unknown_weighting_raises():
    with pytest.raises(ValueError, match="Bogus"):
        velocity_kl(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), "Bogus")


# --------------------------------------------------------------------------- awm_loss end to end


def _raise(*_):
    raise AssertionError("must not be called")


def test_awm_loss_end_to_end_components():
    T, B = 2, 3
    policy, ref, ema = TinyVelocity(seed=0), TinyVelocity(seed=1), TinyVelocity(seed=2)
    clean, noise, t, advantages = _batch()
    beta, ema_beta = 0.003, 1.0
    loss, metrics = awm_loss(
        policy, clean, noise, t, advantages, T, weighting="ghuber", ghuber_power=0.25, loss_type="exp_first",
        clip_range=1.0, beta=beta, kl_weight="ELBO", ref_velocity_fn=ref, ema_beta=ema_beta,
        kl_ema_weight="Uniform", ema_velocity_fn=ema,
    )
    x_t, v, lp = _independent_lp(policy, clean, noise, t, "ghuber")
    with torch.no_grad():
        v_ref, v_ema = ref(x_t, t), ema(x_t, t)
        policy_loss = -advantages.double().mean()
        std2 = (0.7 * torch.sqrt(t / (1 - t.clamp(0, 0.99)))) ** 2
        kl = (((v - v_ref) ** 2).mean(dim=(1, 2, 3)).double() / (2 * std2)).mean()
        ema_kl = ((v - v_ema) ** 2).mean()
        expected = policy_loss + beta * kl + ema_beta * ema_kl
    assert kl.item() > 0.01 and ema_kl.item() > 0.01
    assert metrics["policy_loss"].item() == pytest.approx(policy_loss.item(), abs=1e-12)
    assert metrics["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["ema_kl_loss"].item() == pytest.approx(ema_kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].item() == loss.item()
    assert metrics["log_prob"].item() == pytest.approx(lp.mean().item(), rel=1e-6)
    assert loss.requires_grad
    # the reference and EMA models are constants
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None for p in policy.parameters())


def test_awm_loss_gradient_includes_kl_terms():
    T = 2
    policy, ref = TinyVelocity(seed=0), TinyVelocity(seed=1)
    clean, noise, t, advantages = _batch()
    params = list(policy.parameters())
    beta = 0.5
    loss, _ = awm_loss(policy, clean, noise, t, advantages, T, beta=beta, ref_velocity_fn=ref)
    grads = torch.autograd.grad(loss, params)
    x_t, v, lp = _independent_lp(policy, clean, noise, t)
    with torch.no_grad():
        v_ref = ref(x_t, t)
    direct = -(advantages.double().repeat(T) * lp).mean() + beta * ((v - v_ref) ** 2).mean()
    for g, e in zip(grads, torch.autograd.grad(direct, params)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["exp_first", "sum_first"])
def test_awm_loss_off_policy_uses_ema_log_prob_as_old(loss_type):
    T, B = 2, 3
    policy, ema = TinyVelocity(seed=0), TinyVelocity(seed=0)
    with torch.no_grad():
        ema.linear.weight.add_(0.05)
    clean, noise, t, advantages = _batch()
    clip = 0.2
    loss, metrics = awm_loss(
        policy, clean, noise, t, advantages, T, weighting="Uniform", loss_type=loss_type, clip_range=clip,
        ema_velocity_fn=ema, ema_beta=0.0, off_policy=True, ref_velocity_fn=_raise,
    )
    _, _, lp = _independent_lp(policy, clean, noise, t)
    _, _, lp_old = _independent_lp(ema, clean, noise, t)
    with torch.no_grad():
        d = lp - lp_old
        ratio = torch.exp(d) if loss_type == "exp_first" else torch.exp(d.view(T, B).mean(0))
        a = advantages.double().repeat(ratio.numel() // B)
        expected = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)).mean()
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    assert (ratio - 1).abs().max() > 1e-3  # genuinely off-policy
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(clipfrac.item())
    assert metrics["ema_kl_loss"].item() == 0.0
    # on-policy value would be -mean(A)
    assert loss.item() != pytest.approx(-advantages.double().mean().item(), abs=1e-6)


def test_awm_loss_off_policy_same_model_is_on_policy_value():
    policy = TinyVelocity(seed=0)
    clean, noise, t, advantages = _batch()
    loss, metrics = awm_loss(policy, clean, noise, t, advantages, 2, ema_velocity_fn=policy, off_policy=True)
    assert loss.item() == pytest.approx(-2.5 / 3, abs=1e-12)


def test_awm_loss_beta_zero_never_calls_reference_or_ema():
    policy = TinyVelocity()
    clean, noise, t, advantages = _batch()
    loss, metrics = awm_loss(
        policy, clean, noise, t, advantages, 2, beta=0.0, ref_velocity_fn=_raise, ema_beta=0.0,
        ema_velocity_fn=_raise, off_policy=False,
    )
    assert metrics["kl_loss"].item() == 0.0
    assert metrics["ema_kl_loss"].item() == 0.0
    assert loss.item() == pytest.approx(-2.5 / 3, abs=1e-12)
    with pytest.raises(AssertionError, match="must not be called"):
        awm_loss(policy, clean, noise, t, advantages, 2, beta=0.1, ref_velocity_fn=_raise)


def test_awm_loss_off_policy_ghuber_ratio_by_hand():
    # clean = noise = 0, so the target velocity is 0 and lp = -v^2 for constant velocities.
    # Policy v = 0.3, EMA (old) v = 0.5, t = 0.5, ghuber p = 0.5 (e = 1e-10):
    #   w(lp)     = -((0.09 + e)^0.5 - e^0.5) * 0.5 / 0.5 = -(0.3 - 1e-5)
    #   w(lp_old) = -((0.25 + e)^0.5 - e^0.5) * 0.5 / 0.5 = -(0.5 - 1e-5)
    #   ratio = exp(0.2) = 1.2214028 (an unweighted old log-prob, -0.25, would give exp(-0.05)).
    # A = [1, 0], clip 0.3 (ratio inside): loss = mean(-1.2214028, 0) = -0.6107014.
    shape = (2, 1, 2, 2)
    clean = noise = torch.zeros(shape)
    t = torch.full((2,), 0.5, dtype=F64)
    weight = torch.nn.Parameter(torch.tensor(0.3))
    policy = lambda x, t: weight * torch.ones_like(x)  # noqa: E731
    ema = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    loss, metrics = awm_loss(policy, clean, noise, t, torch.tensor([1.0, 0.0]), 1, weighting="ghuber",
                             ghuber_power=0.5, loss_type="exp_first", clip_range=0.3, ema_velocity_fn=ema,
                             off_policy=True)
    assert loss.item() == pytest.approx(-1.2214027581601699 / 2, rel=1e-6)
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["log_prob"].item() == pytest.approx(-(0.3 - 1e-5), rel=1e-6)
