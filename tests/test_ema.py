"""Weight EMA, KL-EMA decay and the LR schedule against SPEC section 5."""

import io
import math

import pytest
import torch

from advantage_weighted_matching.ema import WeightEMA, kl_ema_decay, lerp_, weight_ema_decay
from advantage_weighted_matching.optim import CosineToThird, build_lr_scheduler, build_optimizer

# --------------------------------------------------------------------------- weight EMA


def test_weight_ema_decay_schedule():
    assert weight_ema_decay(0, 0.99) == pytest.approx(0.1, abs=1e-15)  # min(1/10, .99)
    assert weight_ema_decay(100, 0.99) == pytest.approx(0.9181818181818182, abs=1e-15)  # 101/110
    assert weight_ema_decay(1000, 0.99) == 0.99  # min(1001/1010 = 0.99109, .99)
    assert weight_ema_decay(1000, 0.999) == pytest.approx(1001 / 1010, abs=1e-15)


def test_weight_ema_one_update_by_hand():
    theta = [torch.tensor([1.0, 1.0, 4.0]), torch.tensor([[-2.0]])]
    ema = WeightEMA([torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[2.0]])], max_decay=0.99)
    decay = ema.step(theta, 100)
    assert decay == pytest.approx(101 / 110, abs=1e-15)
    w = 9 / 110  # 1 - decay
    # ema + w (theta - ema)
    torch.testing.assert_close(ema.shadow[0], torch.tensor([w, 1.0, 2.0 + 2.0 * w]), rtol=0, atol=3e-7)
    torch.testing.assert_close(ema.shadow[1], torch.tensor([[2.0 - 4.0 * w]]), rtol=0, atol=3e-7)


def test_weight_ema_shadow_is_a_float32_copy():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    ema = WeightEMA([param])
    assert ema.shadow[0].dtype == torch.float32
    assert not ema.shadow[0].requires_grad
    with torch.no_grad():
        param.add_(1.0)
    assert ema.shadow[0].tolist() == [1.0, 2.0]  # not aliased


def test_weight_ema_interval_phase_is_the_references():
    # Reference ema.py: update when (k + 1) % n == 0. With n = 3: k = 2, 5, 8, ... (not 0, 3, 6).
    ema = WeightEMA([torch.zeros(2)], max_decay=0.99, update_step_interval=3)
    theta = [torch.ones(2)]
    assert ema.step(theta, 0) is None
    assert ema.step(theta, 1) is None
    assert ema.shadow[0].tolist() == [0.0, 0.0]
    decay = ema.step(theta, 2)  # by hand: min(3 / 12, 0.99) = 0.25; shadow = 0.25 * 0 + 0.75 * 1
    assert decay == pytest.approx(0.25)
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 0.75), rtol=0, atol=3e-7)
    assert ema.step(theta, 3) is None and ema.step(theta, 4) is None
    theta = [torch.full((2,), 2.0)]
    decay = ema.step(theta, 5)  # 6 / 15 = 0.4: 0.4 * 0.75 + 0.6 * 2 = 1.5
    assert decay == pytest.approx(0.4)
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 1.5), rtol=0, atol=3e-7)
    # interval 1 updates at every step, k = 0 included (decay 1/10)
    every = WeightEMA([torch.zeros(1)], max_decay=0.99, update_step_interval=1)
    assert every.step([torch.ones(1)], 0) == pytest.approx(0.1)


def test_weight_ema_swap_twice_restores():
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))]
    ema = WeightEMA(params)
    ema.step([torch.tensor([5.0, 6.0]), torch.tensor([7.0])], 0)  # decay 0.1: shadow = 0.1 s + 0.9 theta
    shadow = [s.clone() for s in ema.shadow]
    torch.testing.assert_close(shadow[0], torch.tensor([4.6, 5.6]))
    ema.swap(params)
    torch.testing.assert_close(params[0].data, shadow[0])
    torch.testing.assert_close(params[1].data, shadow[1])
    assert ema.shadow[0].tolist() == [1.0, 2.0]
    ema.swap(params)
    assert params[0].tolist() == [1.0, 2.0] and params[1].tolist() == [3.0]
    torch.testing.assert_close(ema.shadow[0], shadow[0], rtol=0, atol=0)


def test_weight_ema_state_dict_round_trip():
    a = WeightEMA([torch.tensor([1.0, 2.0])])
    a.step([torch.tensor([3.0, 5.0])], 10)
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    b = WeightEMA([torch.zeros(2)])
    b.load_state_dict(loaded)
    assert torch.equal(b.shadow[0], a.shadow[0])
    # state_dict is a copy
    a.shadow[0].add_(1.0)
    assert not torch.equal(state["shadow"][0], a.shadow[0])


# --------------------------------------------------------------------------- KL-EMA


def test_kl_ema_decay_linear_and_constant():
    assert kl_ema_decay(0, 0.3, "linear") == 0.0
    assert kl_ema_decay(100, 0.3, "linear") == pytest.approx(0.1, abs=1e-15)
    assert kl_ema_decay(1000, 0.3, "linear") == 0.3
    assert kl_ema_decay(0, 0.3, "constant") == 0.3
    assert kl_ema_decay(100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="cosine"):
        kl_ema_decay(1, 0.3, "cosine")


def test_kl_ema_update_by_hand():
    ema = [torch.tensor([1.0, 2.0])]
    theta = [torch.tensor([3.0, -2.0])]
    d = kl_ema_decay(1000, 0.3, "linear")
    lerp_(ema, theta, 1.0 - d)
    # 0.3 * [1, 2] + 0.7 * [3, -2] = [2.4, -0.8]
    torch.testing.assert_close(ema[0], torch.tensor([2.4, -0.8]), rtol=0, atol=1e-6)
    assert theta[0].tolist() == [3.0, -2.0]


def test_kl_ema_update_at_step_zero_copies_policy():
    ema = [torch.tensor([1.0, 2.0])]
    lerp_(ema, [torch.tensor([3.0, -2.0])], 1.0 - kl_ema_decay(0, 0.3, "linear"))
    assert ema[0].tolist() == [3.0, -2.0]


def test_lerp_casts_source_dtype_and_requires_equal_lengths():
    target = [torch.zeros(2, dtype=torch.float32)]
    lerp_(target, [torch.ones(2, dtype=torch.float16)], 0.25)
    assert target[0].tolist() == [0.25, 0.25]
    with pytest.raises(ValueError):
        lerp_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)


# --------------------------------------------------------------------------- LR schedule


def test_cosine_to_third_multiplier():
    f = CosineToThird(100)
    assert f(0) == pytest.approx(1.0, abs=1e-15)
    assert f(25) == pytest.approx(0.9023689270621824, abs=1e-15)  # 1/3 + 1/3 (1 + cos(pi / 4))
    assert f(50) == pytest.approx(2.0 / 3.0, abs=1e-15)
    assert f(100) == pytest.approx(1.0 / 3.0, abs=1e-15)
    assert f(10_000) == pytest.approx(1.0 / 3.0, abs=1e-15)
    # the presets' decay_steps 1e10: effectively constant
    assert CosineToThird(1e10)(1000) == pytest.approx(1.0, abs=1e-12)


def test_lambda_lr_values_after_stepping_adamw():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], 3e-4, (0.9, 0.999), 1e-4, 1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert optimizer.param_groups[0]["eps"] == 1e-8
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    scheduler = build_lr_scheduler(optimizer, 4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    # 3e-4 * [1, 1/3 + 1/3 (1 + cos(pi/4)), 2/3, 1/3 + 1/3 (1 + cos(3 pi/4)), 1/3, 1/3]
    expected = [3e-4 * (1 / 3 + (1 / 3) * (1 + math.cos(math.pi * k / 4))) if k < 4 else 1e-4 for k in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[2] == pytest.approx(2e-4, rel=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4, rel=1e-12)


def test_scheduler_state_dict_round_trip():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], 3e-4, (0.9, 0.999), 0.0, 1e-8)
    scheduler = build_lr_scheduler(optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # how checkpoints read it

    param2 = torch.nn.Parameter(torch.zeros(1))
    optimizer2 = build_optimizer([param2], 3e-4, (0.9, 0.999), 0.0, 1e-8)
    scheduler2 = build_lr_scheduler(optimizer2, 999)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    assert scheduler2.last_epoch == 3
    assert scheduler2.lr_lambdas[0].decay_steps == 10
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr(), rel=1e-15)
    for _ in range(4):
        optimizer.step(), scheduler.step()
        optimizer2.step(), scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * CosineToThird(10)(7), rel=1e-12)
