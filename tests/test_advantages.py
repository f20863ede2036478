"""Group-relative advantages against SPEC section 4, with hand-computed numbers."""

import math

import numpy as np
import pytest

from advantage_weighted_matching.advantages import STD_EPS, clip_advantages, group_advantages

PROMPTS = ["a", "b", "a", "b", "a", "b"]  # interleaved: grouping is by text, not position
REWARDS = [1.0, 10.0, 2.0, 10.0, 3.0, 10.0]


def test_std_eps_is_1e_minus_4():
    assert STD_EPS == 1e-4


def test_per_prompt_group_std():
    adv, stats = group_advantages(PROMPTS, REWARDS, per_prompt=True, global_std=False)
    # group a = [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.816496580927726
    # 1 / (0.816496580927726 + 1e-4) = 1.2245948897605123
    # group b = [10, 10, 10]: mean 10, std 0 -> 0 / 1e-4 = 0
    expected = [-1.2245948897605123, 0.0, 0.0, 0.0, 1.2245948897605123, 0.0]
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, expected, rtol=1e-12, atol=1e-15)
    assert stats["prompts_seen"] == 2
    assert stats["mean_group_size"] == 3.0
    assert stats["zero_std_fraction"] == 0.5
    assert stats["mean_group_std"] == pytest.approx(math.sqrt(2 / 3) / 2, rel=1e-12)


def test_per_prompt_global_std():
    adv, _ = group_advantages(PROMPTS, REWARDS, per_prompt=True, global_std=True)
    # all rewards: mean 6, deviations -5,4,-4,4,-3,4 -> squares sum 98, / 6 -> std sqrt(98/6) = 4.041451884327381
    # 1 / (4.041451884327381 + 1e-4) = 0.24742970735520475
    s = 0.24742970735520475
    np.testing.assert_allclose(adv, [-s, 0.0, 0.0, 0.0, s, 0.0], rtol=1e-12, atol=1e-15)


def test_no_tracking_uses_global_mean_and_std():
    adv, stats = group_advantages(PROMPTS, REWARDS, per_prompt=False)
    s = 0.24742970735520475
    # (r - 6) / (4.041451884327381 + 1e-4)
    np.testing.assert_allclose(adv, [-5 * s, 4 * s, -4 * s, 4 * s, -3 * s, 4 * s], rtol=1e-12)
    assert stats == {}


def test_group_stats_on_crafted_example():
    prompts = ["p", "q", "r", "p", "r", "s", "q", "r", "p", "r"]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 1.0]
    # p = [1, 1, 1] (all one, std 0); q = [0, 0] (all zero, std 0); r = [0, 1, 0, 1] (std 0.5); s = [0.5] (std 0)
    adv, stats = group_advantages(prompts, rewards)
    assert stats == {
        "mean_group_size": 2.5,  # (3 + 2 + 4 + 1) / 4
        "prompts_seen": 4,
        "zero_std_fraction": 0.75,
        "all_one_fraction": 0.25,
        "all_zero_fraction": 0.25,
        "mean_group_std": 0.125,  # (0 + 0 + 0.5 + 0) / 4
    }
    a = 0.5 / 0.5001  # (r - 0.5) / (0.5 + 1e-4)
    np.testing.assert_allclose(adv, [0, 0, -a, 0, a, 0, 0, -a, 0, a], rtol=1e-12, atol=1e-15)


def test_accepts_numpy_and_returns_float64():
    adv, _ = group_advantages(["x", "x"], np.array([0, 1], dtype=np.float32))
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, [-0.5 / 0.5001, 0.5 / 0.5001], rtol=1e-12)


def test_clip_then_rescale():
    a = np.array([-7.0, -2.5, 0.0, 3.0, 10.0])
    np.testing.assert_allclose(clip_advantages(a, 5, 1), [-1.0, -0.5, 0.0, 0.6, 1.0], rtol=1e-15)
    # advantage_max = 2: clamp to [-5, 5] then / 5 * 2
    np.testing.assert_allclose(clip_advantages(a, 5, 2), [-2.0, -1.0, 0.0, 1.2, 2.0], rtol=1e-15)


def test_advantage_max_zero_leaves_clamped_values():
    a = np.array([-7.0, -2.5, 0.0, 3.0, 10.0])
    np.testing.assert_array_equal(clip_advantages(a, 5, 0), [-5.0, -2.5, 0.0, 3.0, 5.0])
    np.testing.assert_array_equal(clip_advantages(a, 5), [-5.0, -2.5, 0.0, 3.0, 5.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_raise(bad):
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(["a", "a", "b"], [1.0, bad, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(["a", "a", "b"], [1.0, bad, 0.0], per_prompt=False)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 prompts but 2 rewards"):
        group_advantages(["a", "b", "c"], [1.0, 2.0])
