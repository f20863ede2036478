"""SA-Solver coefficients, time grid and sampler (SPEC section 3a)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy.integrate import quad

from advantage_weighted_matching.sa_solver import (
    corrector_correction,
    exp_poly_integral,
    gradient_coefficients,
    lagrange_power_coefficients,
    log_snr,
    predictor_correction,
    sa_solver_sample,
    sa_solver_time_grid,
    sa_step,
    tau_at,
)


def sd3_sigmas(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(torch.float64)


def sd3_grid(num_steps):
    return sa_solver_time_grid(sd3_sigmas(num_steps))


# ---------------------------------------------------------------------------
# E_k(a, b) = int_a^b exp(s x) x^k dx
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "a, b, s",
    [(-6.9, -3.6, 1.0), (-2.0, -1.2, 1.49), (0.5, 2.0, 1.0), (-0.3, 0.4, 1.49), (1.5, -1.0, 1.0), (-1.0, -4.0, 1.49),
     (-5.0, 3.0, 1.16), (2.2, 2.2, 1.0)],
)
def test_exp_poly_integral_matches_quad(k, a, b, s):
    expected, _ = quad(lambda x: math.exp(s * x) * x**k, a, b, epsabs=0, epsrel=1e-13)
    got = exp_poly_integral(k, a, b, s)
    if expected == 0.0:
        assert got == 0.0
    else:
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_exp_poly_integral_hand_values():
    # k = 0, s = 1: e^b - e^a
    assert exp_poly_integral(0, 0.0, 1.0, 1.0) == pytest.approx(math.e - 1, rel=1e-14)
    # k = 1, s = 1 on [0, 1]: [e^x (x - 1)]_0^1 = 0 - (-1) = 1
    assert exp_poly_integral(1, 0.0, 1.0, 1.0) == pytest.approx(1.0, rel=1e-14)
    # k = 2, s = 2 on [0, 1]: [e^{2x} (x^2/2 - x/2 + 1/4)]_0^1 = e^2/4 - 1/4
    assert exp_poly_integral(2, 0.0, 1.0, 2.0) == pytest.approx((math.e**2 - 1) / 4, rel=1e-14)


# ---------------------------------------------------------------------------
# Lagrange basis in power form
@pytest.mark.parametrize("nodes", [[-1.3], [-1.3, -2.1], [0.4, -0.7, -2.5], [2.0, 1.0, -1.0, -3.5]])
def test_lagrange_basis(nodes):
    c = lagrange_power_coefficients(nodes)
    p = len(nodes)
    assert len(c) == p and all(len(row) == p for row in c)

    def basis(i, x):
        return sum(c[i][j] * x ** (p - 1 - j) for j in range(p))

    for i in range(p):
        for j, node in enumerate(nodes):
            assert basis(i, node) == pytest.approx(1.0 if i == j else 0.0, abs=1e-12)
    for x in (-3.0, -0.25, 0.0, 1.7):
        assert sum(basis(i, x) for i in range(p)) == pytest.approx(1.0, abs=1e-12)


def test_lagrange_two_nodes_by_hand():
    # nodes (2, 5): L_0 = (x - 5) / (2 - 5) = -x/3 + 5/3, L_1 = (x - 2) / 3 = x/3 - 2/3
    c = lagrange_power_coefficients([2.0, 5.0])
    assert c[0] == pytest.approx([-1 / 3, 5 / 3])
    assert c[1] == pytest.approx([1 / 3, -2 / 3])
    assert lagrange_power_coefficients([0.7]) == [[1.0]]


# ---------------------------------------------------------------------------
# Gradient coefficients
@pytest.mark.parametrize("tau", [0.0, 0.4, 0.7])
@pytest.mark.parametrize("nodes", [[-1.0], [-1.0, -1.8], [0.2, -0.5], [-0.9, -1.4, -2.2]])
def test_gradient_coefficients_are_weighted_basis_integrals(tau, nodes):
    # g_i = int_{lambda_prev}^{lambda_t} exp(s l) L_i(l) dl with L_i in product form
    lambda_prev, lambda_t = nodes[0], nodes[0] + 0.6
    s = 1 + tau**2

    def basis(i, x):
        out = 1.0
        for j, nj in enumerate(nodes):
            if j != i:
                out *= (x - nj) / (nodes[i] - nj)
        return out

    g = gradient_coefficients(lambda_prev, lambda_t, nodes, tau)
    for i in range(len(nodes)):
        expected, _ = quad(lambda x: math.exp(s * x) * basis(i, x), lambda_prev, lambda_t, epsabs=0, epsrel=1e-13)
        assert g[i] == pytest.approx(expected, rel=1e-9)


def test_order_one_coefficient_is_ddim():
    # tau = 0, order 1, s = 1: g_0 = exp(lambda_t) - exp(lambda_prev) = (1-t)/t - (1-t_prev)/t_prev.
    # t_prev = 0.8, t = 0.6: 0.4/0.6 - 0.2/0.8 = 0.41666...
    t_prev, t = 0.8, 0.6
    g = gradient_coefficients(log_snr(t_prev), log_snr(t), [log_snr(t_prev)], 0.0)
    assert len(g) == 1
    assert g[0] == pytest.approx(0.4 / 0.6 - 0.2 / 0.8, rel=1e-12)
    assert g[0] == pytest.approx(5 / 12, rel=1e-12)


def test_order_one_step_is_ddim():
    # x_t = (t/t_prev) x + t g_0 D = 0.75 x + 0.6 * 5/12 D = 0.75 x + 0.25 D  (DDIM for alpha = 1 - t, sigma = t)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    out = sa_step(x, [d], [log_snr(0.8)], 0.8, 0.6, 0.0, None)
    torch.testing.assert_close(out, 0.75 * x + 0.25 * d, rtol=1e-12, atol=1e-12)


def test_log_snr():
    assert log_snr(0.5) == 0.0
    assert log_snr(0.2) == pytest.approx(math.log(4.0))
    assert log_snr(0.999) == pytest.approx(math.log(0.001 / 0.999))


def test_correction_terms_by_hand():
    # tau = 0 (s = 1), lambda_prev = 0, lambda_t = 1 (h = 1), lambda_prev2 = -0.5:
    # predictor: e^1 * (1/2 - (1 - 1 + e^-1)) / 0.5 = e * (0.5 - e^-1) * 2 = e - 2
    assert predictor_correction(0.0, -0.5, 1.0, 0.0) == pytest.approx(math.e - 2.0, rel=1e-12)
    # corrector: e^1 * (1/2 - (1 - 1 + e^-1) / 1) = e/2 - 1
    assert corrector_correction(0.0, 1.0, 0.0) == pytest.approx(math.e / 2 - 1.0, rel=1e-12)
    # tau = 1 (s = 2), h = 1, lambda_t = 1: e^2 * (1/2 - (2 - 1 + e^-2) / 4) / 0.5
    assert predictor_correction(0.0, -0.5, 1.0, 1.0) == pytest.approx(
        math.exp(2) * (0.5 - (1 + math.exp(-2)) / 4) / 0.5, rel=1e-12
    )
    # corrector tau = 1: e^2 * (1/2 - (2 - 1 + e^-2) / 4)
    assert corrector_correction(0.0, 1.0, 1.0) == pytest.approx(math.exp(2) * (0.5 - (1 + math.exp(-2)) / 4), rel=1e-12)


def test_order_two_step_uses_correction_on_g0_and_g1():
    # The step is linear in the outputs; moving `correction` from g_1 to g_0 changes
    # the result by s * t * exp(-tau^2 lambda_t) * correction * (D_0 - D_1).
    tau, t_prev, t = 0.4, 0.7, 0.5
    x = torch.tensor([0.3], dtype=torch.float64)
    d0, d1 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    nodes = [log_snr(t_prev), log_snr(0.8)]
    noise = torch.tensor([0.25], dtype=torch.float64)
    plain = sa_step(x, [d0, d1], nodes, t_prev, t, tau, noise, 0.0)
    corrected = sa_step(x, [d0, d1], nodes, t_prev, t, tau, noise, 0.1)
    scale = (1 + tau**2) * t * math.exp(-(tau**2) * log_snr(t))
    assert (corrected - plain).item() == pytest.approx(scale * 0.1 * 3.0, rel=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("order", [1, 2])
def test_step_is_exact_for_point_mass_data(tau, order):
    # Data = a point mass at c: D = c exactly, and x_t = (1 - t) c + t z with z ~ N(0, 1).
    # Exponential integrator: x_t = (1-t) c + t (exp(-tau^2 h) z + sqrt(1 - exp(-2 tau^2 h)) xi),
    # i.e. the marginal N((1-t) c, t^2) is kept exactly, for any order (sum_i L_i = 1, corrections cancel).
    t_prev, t = 0.8, 0.55
    h = log_snr(t) - log_snr(t_prev)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(3, 5, generator=g, dtype=torch.float64)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64)
    xi = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x = (1 - t_prev) * c + t_prev * z
    nodes = [log_snr(t_prev), log_snr(0.9)][:order]
    correction = predictor_correction(nodes[0], log_snr(0.9), log_snr(t), tau) if order == 2 else 0.0
    out = sa_step(x, [c] * order, nodes, t_prev, t, tau, xi, correction)
    expected = (1 - t) * c + t * (math.exp(-(tau**2) * h) * z + math.sqrt(1 - math.exp(-2 * tau**2 * h)) * xi)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Time grid and tau
def test_time_grid_14_steps():
    sigmas = sd3_sigmas(14)
    t = sa_solver_time_grid(sigmas)
    assert len(t) == 15
    assert all(isinstance(v, float) for v in t)
    assert t[0] == 0.999
    assert t[-1] == 0.0
    assert t[-3] == float(sigmas[-3])
    assert t[-2] == float(sigmas[-3]) / 2
    assert t[1:-2] == [float(v) for v in sigmas[1:-2]]
    # SD3 shift-3 grid, by hand: u = linspace(1, sigma_min, 14) with
    # sigma_min = 3 * 0.001 / (1 + 2 * 0.001); sigma = 3u / (1 + 2u).
    sigma_min = 3 * 0.001 / (1 + 2 * 0.001)
    for i in range(1, 13):
        u = 1 + (sigma_min - 1) * i / 13
        assert t[i] == pytest.approx(3 * u / (1 + 2 * u), abs=1e-6)
    # u_1 = 1 - (1 - 0.0029940) / 13 = 0.923307 -> 2.769922 / 2.846614 = 0.973058
    assert t[1] == pytest.approx(0.973058, abs=1e-6)
    # u_12 = 0.0796868 -> 0.239060 / 1.159374 = 0.206198; t[13] = t[12] / 2 = 0.103099
    assert t[12] == pytest.approx(0.206198, abs=1e-6)
    assert t[13] == pytest.approx(0.103099, abs=1e-6)
    assert all(a > b for a, b in zip(t, t[1:]))


def test_time_grid_rejects_short_or_open_grids():
    with pytest.raises(ValueError):
        sa_solver_time_grid([1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        sa_solver_time_grid([1.0, 0.7, 0.4, 0.1])


def test_tau_window():
    assert tau_at(0.3, 0.7) == 0.7 and tau_at(0.9, 0.7) == 0.7 and tau_at(0.6, 0.7) == 0.7
    assert tau_at(0.29, 0.7) == 0.0 and tau_at(0.91, 0.7) == 0.0 and tau_at(0.999, 0.7) == 0.0


# ---------------------------------------------------------------------------
# Sampler with a constant denoiser
def _constant_denoiser(c, calls):
    def denoise(x, t):
        calls.append(t)
        return c.clone()

    return denoise


@pytest.mark.parametrize("num_steps", [3, 6, 14])
def test_constant_denoiser_ode_is_exact(num_steps):
    # D = c: dx/dt = (x - c)/t, so x_t = c + (t / t0) (x_start - c); the last latent is c.
    t = sd3_grid(num_steps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    c = torch.randn(2, 4, 3, 3, generator=g)
    calls = []
    latents = sa_solver_sample(_constant_denoiser(c, calls), x0, t, 0.0)
    assert len(latents) == num_steps + 1 == len(t)
    assert len(calls) == num_steps == len(t) - 1
    assert calls == t[:-1]  # one evaluation per grid time, in order, none at t = 0
    assert latents[0] is x0
    for i in range(1, len(t) - 1):
        torch.testing.assert_close(latents[i], c + (t[i] / t[0]) * (x0 - c), rtol=1e-5, atol=1e-5)
    assert torch.equal(latents[-1], c)


def test_stochastic_steps_only_inside_tau_window():
    # SPEC 3a: tau is evaluated at the step's TARGET time (reference: tau=tau(t), t = timesteps[step]).
    # With D = c the scaled noise z_t = (x_t - (1-t) c) / t only changes at steps whose target
    # t[k] lies in [0.3, 0.9]. 14-step shift-3 grid, by hand: t[3] = 0.9094 > 0.9,
    # t[4] = 0.8715 ... t[11] = 0.3574 inside, t[12] = 0.2062 < 0.3, so steps 4..11 are stochastic.
    t = sd3_grid(14)
    assert t[3] == pytest.approx(0.9094, abs=1e-4) and t[4] == pytest.approx(0.8715, abs=1e-4)
    assert t[11] == pytest.approx(0.3574, abs=1e-4) and t[12] == pytest.approx(0.2062, abs=1e-4)
    c = torch.full((4096,), 0.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g, dtype=torch.float64)
    latents = sa_solver_sample(_constant_denoiser(c, []), x, t, 0.4, torch.Generator().manual_seed(1))
    # the start is not exactly N(.., t0^2) scaled; compare each step to its predecessor instead
    z = [(latents[i] - (1 - t[i]) * c) / t[i] for i in range(len(t) - 1)]
    changed = [i for i in range(1, len(t) - 1) if (z[i] - z[i - 1]).abs().max() > 1e-9]
    assert changed == list(range(4, 12))
    assert torch.equal(latents[-1], c)
    # the noisy steps keep z standard normal up to the deterministic start shift (exact per step)
    assert z[11].std().item() == pytest.approx(1.0, abs=0.05)


def test_preset_step_four_by_hand():
    # Step 4 (t[3] = 0.9094 -> t[4] = 0.8715) is the first stochastic step of the presets (tau 0.4).
    # With D = c everywhere, order-2 predictor and corrector both reduce to the exact exponential
    # integrator (the Lagrange weights sum to the order-1 integral, corrections cancel on equal D):
    #   x_4 = (1 - t4) c + t4 (exp(-tau^2 h) z_3 + sqrt(1 - exp(-2 tau^2 h)) xi),
    # h = log((1 - t4) / t4) - log((1 - t3) / t3). Noise std in x: t4 sqrt(1 - exp(-2 tau^2 h)) ~ 0.30.
    t = sd3_grid(14)
    tau, t3, t4 = 0.4, t[3], t[4]
    h = math.log((1 - t4) / t4) - math.log((1 - t3) / t3)
    noise_std = t4 * math.sqrt(1 - math.exp(-2 * tau**2 * h))
    assert noise_std == pytest.approx(0.30, abs=0.01)
    c = torch.full((3,), 0.25, dtype=torch.float64)
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    draws = torch.Generator().manual_seed(3)
    latents = sa_solver_sample(_constant_denoiser(c, []), x, t, tau, draws)
    xi = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # the first draw
    z3 = (latents[3] - (1 - t3) * c) / t3
    expected = (1 - t4) * c + t4 * (math.exp(-(tau**2) * h) * z3 + math.sqrt(1 - math.exp(-2 * tau**2 * h)) * xi)
    torch.testing.assert_close(latents[4], expected, rtol=1e-10, atol=1e-10)
    # and steps 1..3 used no draw at all: deterministic, z unchanged
    torch.testing.assert_close(z3, (latents[0] - (1 - t[0]) * c) / t[0], rtol=1e-10, atol=1e-10)


def test_noise_is_reproducible_and_matters():
    t = sd3_grid(14)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g)

    def denoise(x, t):  # a nonlinear, state-dependent denoiser
        return torch.tanh(x) * (1 - t)

    a = sa_solver_sample(denoise, x0, t, 0.7, torch.Generator().manual_seed(5))
    b = sa_solver_sample(denoise, x0, t, 0.7, torch.Generator().manual_seed(5))
    c = sa_solver_sample(denoise, x0, t, 0.7, torch.Generator().manual_seed(6))
    d = sa_solver_sample(denoise, x0, t, 0.0, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert (a[-1] - c[-1]).abs().max() > 1e-3
    assert (a[-1] - d[-1]).abs().max() > 1e-3
    # steps whose target lies above the tau window (t[k] > 0.9, k <= 3) are deterministic
    for i in range(4):
        torch.testing.assert_close(a[i], d[i], rtol=0, atol=0)
    assert (a[4] - d[4]).abs().max() > 1e-3
    # noise_level 0 ignores the generator entirely
    e = sa_solver_sample(denoise, x0, t, 0.0, None)
    assert all(torch.equal(u, v) for u, v in zip(d, e))


def _reference_sa_solver(denoise, x, t, noise_level, generator):
    """SPEC 3a written out literally: coefficients by quadrature over the product-form
    Lagrange basis, PEC loop, corrector restarting from x with the predictor's xi."""
    steps = len(t) - 1

    def lam(v):
        return math.log((1 - v) / v)

    def step(x, outputs, nodes, t_prev, t_now, tau, xi, corr):
        s, h = 1 + tau**2, lam(t_now) - lam(t_prev)
        g = []
        for i in range(len(nodes)):
            def basis(l, i=i):
                out = 1.0
                for j, nj in enumerate(nodes):
                    if j != i:
                        out *= (l - nj) / (nodes[i] - nj)
                return out

            g.append(quad(lambda l: math.exp(s * l) * basis(l), lam(t_prev), lam(t_now), epsabs=0, epsrel=1e-13)[0])
        if len(g) == 2:
            g[0] += corr
            g[1] -= corr
        out = math.exp(-(tau**2) * h) * (t_now / t_prev) * x
        for g_i, d in zip(g, outputs):
            out = out + s * t_now * math.exp(-(tau**2) * lam(t_now)) * g_i * d
        return out + t_now * math.sqrt(1 - math.exp(-2 * tau**2 * h)) * xi

    outputs = [denoise(x, t[0])]
    latents = [x]
    for n in range(1, steps):
        t_prev, t_now = t[n - 1], t[n]
        tau = noise_level if 0.3 <= t_now <= 0.9 else 0.0  # the target time
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype) if tau > 0 else torch.zeros_like(x)
        s, h = 1 + tau**2, lam(t_now) - lam(t_prev)
        order = 1 if n == 1 else min(2, steps - n + 1)
        corr = 0.0
        if order == 2:
            corr = math.exp(s * lam(t_now)) * (h**2 / 2 - (h * s - 1 + math.exp(-s * h)) / s**2) / (
                lam(t[n - 1]) - lam(t[n - 2]))
        x_pred = step(x, outputs[:order], [lam(t[n - 1 - i]) for i in range(order)], t_prev, t_now, tau, xi, corr)
        fresh = denoise(x_pred, t_now)
        if n > 1:
            c_order = min(2, steps - n + 2)
            c_corr = math.exp(s * lam(t_now)) * (h / 2 - (h * s - 1 + math.exp(-s * h)) / (s**2 * h))
            x = step(x, [fresh] + outputs[: c_order - 1], [lam(t[n - i]) for i in range(c_order)], t_prev, t_now,
                     tau, xi, c_corr if c_order == 2 else 0.0)
        else:
            x = x_pred
        outputs = [fresh] + outputs[:1]
        latents.append(x)
    latents.append(outputs[0])
    return latents


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
@pytest.mark.parametrize("num_steps", [3, 8])
def test_sampler_matches_literal_spec(noise_level, num_steps):
    def denoise(x, t):
        return torch.tanh(x) * (1 - t) + 0.3 * t * x

    t = sd3_grid(num_steps)
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sa_solver_sample(denoise, x0, t, noise_level, torch.Generator().manual_seed(1))
    want = _reference_sa_solver(denoise, x0, t, noise_level, torch.Generator().manual_seed(1))
    assert len(got) == len(want) == num_steps + 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_final_latent_is_last_prediction_at_predictor_point():
    # SPEC: final x = D evaluated at the predictor point of step steps - 1, at t[-2].
    t = sd3_grid(6)
    seen = []

    def denoise(x, t_now):
        out = x * 0.5 + t_now
        seen.append(out)
        return out

    latents = sa_solver_sample(denoise, torch.ones(1, 2), t, 0.0)
    assert torch.equal(latents[-1], seen[-1])
    assert not torch.equal(latents[-1], latents[-2] * 0.5 + t[-2])  # not D at the corrected point


# ---------------------------------------------------------------------------
# 1-D Gaussian data N(mu, s0^2): exact denoiser, analytic probability-flow map.
MU, S0 = 0.7, 0.5


def gaussian_denoiser(x, t):
    # x_t = (1-t) x0 + t eps: E[x0 | x_t] = mu + (1-t) s0^2 / ((1-t)^2 s0^2 + t^2) (x_t - (1-t) mu)
    a = 1.0 - t
    return MU + a * S0**2 / (a * a * S0**2 + t * t) * (x - a * MU)


def pf_endpoint(x_start, t_start):
    # the ODE keeps (x_t - (1-t) mu) / sqrt((1-t)^2 s0^2 + t^2) constant; at t = 0 it is (x0 - mu) / s0
    return MU + S0 * (x_start - (1 - t_start) * MU) / math.sqrt((1 - t_start) ** 2 * S0**2 + t_start**2)


def test_gaussian_ode_convergence():
    # Measured max errors over x in [-3, 3] (float64): 20 -> 0.1219, 40 -> 0.0571,
    # 80 -> 0.0161, 160 -> 0.0038 (observed orders 1.09, 1.83, 2.08). With 10 steps
    # the error is 0.068, below the 20-step one: the few-step order-2 corrections
    # make the 10 -> 20 change non-monotone, so the sequence starts at 20.
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    errors = []
    for steps in (20, 40, 80, 160):
        t = sd3_grid(steps)
        out = sa_solver_sample(gaussian_denoiser, x, t, 0.0)[-1]
        errors.append((out - pf_endpoint(x, t[0])).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert orders[0] > 0.8 and orders[1] > 1.5 and orders[2] > 1.7, orders
    assert errors[0] < 0.15
    assert errors[2] < 0.025  # 80 steps
    assert errors[3] < 0.006  # 160 steps
    # and the 10-step run is still close
    t = sd3_grid(10)
    assert (sa_solver_sample(gaussian_denoiser, x, t, 0.0)[-1] - pf_endpoint(x, t[0])).abs().max() < 0.09


def test_gaussian_sde_endpoint_distribution():
    # Measured (seed 0, 20000 samples, noise_level 0.7, 160 steps): mean 0.7019, std 0.5044.
    # Sampling error alone: 0.5 / sqrt(20000) = 0.0035 (mean), ~0.0025 (std).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    out = sa_solver_sample(gaussian_denoiser, x, sd3_grid(160), 0.7, g)[-1]
    assert out.mean().item() == pytest.approx(MU, abs=0.012)
    assert out.std().item() == pytest.approx(S0, abs=0.012)
    # it is a genuinely different map from the ODE one
    ode = sa_solver_sample(gaussian_denoiser, x, sd3_grid(160), 0.0)[-1]
    assert (out - ode).abs().mean() > 0.05


# ---------------------------------------------------------------------------
# Order-2 few-step corrections, checked by means other than their closed form.
# What they do (derived by hand): the linear (slope) part of the interpolated data
# prediction is integrated against exp(s lambda_t), the weight at the step's end,
# instead of exp(s lambda). So the order-2 step integrates the effective prediction
#   D_eff(l) = D_base + exp(s (lambda_t - l)) (l - l_base) / (l_0 - l_1) (D_0 - D_1)
# where D_base / l_base is the node the line passes through at the interval start.
ZERO = torch.zeros(1, dtype=torch.float64)  # deterministic part only: xi = 0


def _effective_step(x, d0, d1, t_prev, t, tau, l0, l1, base_is_newest):
    """One deterministic order-2 SA step by 200-point Gauss-Legendre quadrature of D_eff."""
    import numpy as np

    s, lp, lt = 1 + tau**2, log_snr(t_prev), log_snr(t)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    lam = 0.5 * (lt - lp) * nodes + 0.5 * (lt + lp)
    w = 0.5 * (lt - lp) * weights
    d_base, l_base = (d0, l0) if base_is_newest else (d1, l1)
    base = float(np.sum(w * np.exp(s * lam)))
    slope = float(np.sum(w * np.exp(s * lt) * (lam - l_base))) / (l0 - l1)
    integral = base * d_base + slope * (d0 - d1)
    h = lt - lp
    return math.exp(-(tau**2) * h) * (t / t_prev) * x + s * t * math.exp(-(tau**2) * lt) * integral


@pytest.mark.parametrize("tau", [0.0, 0.4, 0.7])
@pytest.mark.parametrize("t_prev2, t_prev, t", [(0.95, 0.87, 0.78), (0.5, 0.36, 0.2), (0.3, 0.2, 0.1)])
def test_predictor_correction_equals_quadrature_of_effective_prediction(tau, t_prev2, t_prev, t):
    # Predictor nodes [l_prev, l_prev2]: the line through (l_prev, D_0) extrapolated with the end weight.
    x, d0, d1 = 0.37, -0.8, 1.3
    nodes = [log_snr(t_prev), log_snr(t_prev2)]
    corr = predictor_correction(nodes[0], nodes[1], log_snr(t), tau)
    got = sa_step(torch.tensor([x], dtype=torch.float64), [torch.tensor([d0], dtype=torch.float64),
                  torch.tensor([d1], dtype=torch.float64)], nodes, t_prev, t, tau, ZERO, corr).item()
    want = _effective_step(x, d0, d1, t_prev, t, tau, nodes[0], nodes[1], base_is_newest=True)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    # the sign matters: the opposite correction misses the quadrature by far more than round-off
    flipped = sa_step(torch.tensor([x], dtype=torch.float64), [torch.tensor([d0], dtype=torch.float64),
                      torch.tensor([d1], dtype=torch.float64)], nodes, t_prev, t, tau, ZERO, -corr).item()
    assert abs(flipped - want) > 1e-6


@pytest.mark.parametrize("tau", [0.0, 0.4, 0.7])
@pytest.mark.parametrize("t_prev, t", [(0.87, 0.78), (0.36, 0.2), (0.2, 0.1)])
def test_corrector_correction_equals_quadrature_of_effective_prediction(tau, t_prev, t):
    # Corrector nodes [l_t, l_prev]: the line through (l_prev, D_1) and (l_t, D_0), slope with the end weight.
    x, d0, d1 = -0.52, 0.9, 0.15
    nodes = [log_snr(t), log_snr(t_prev)]
    corr = corrector_correction(nodes[1], nodes[0], tau)
    got = sa_step(torch.tensor([x], dtype=torch.float64), [torch.tensor([d0], dtype=torch.float64),
                  torch.tensor([d1], dtype=torch.float64)], nodes, t_prev, t, tau, ZERO, corr).item()
    want = _effective_step(x, d0, d1, t_prev, t, tau, nodes[0], nodes[1], base_is_newest=False)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_order_two_steps_have_third_order_local_error(tau):
    # Linear ODE with a known solution: D(lambda) = cos(lambda) (no x dependence), so the exact
    # deterministic step is x_t = exp(-tau^2 h)(t/t_prev) x + s t exp(-tau^2 l_t) int exp(s l) cos(l) dl,
    # with the integral in closed form: exp(s l)(s cos l + sin l)/(s^2 + 1).
    # An order-2 method has local error O(h^3): halving h divides it by about 8.
    def exact(x, t_prev, t):
        s, lp, lt = 1 + tau**2, log_snr(t_prev), log_snr(t)
        anti = lambda v: math.exp(s * v) * (s * math.cos(v) + math.sin(v)) / (s**2 + 1)  # noqa: E731
        return math.exp(-(tau**2) * (lt - lp)) * (t / t_prev) * x + s * t * math.exp(-(tau**2) * lt) * (anti(lt) - anti(lp))

    def t_of(lam):  # inverse of lambda = log((1 - t) / t)
        return 1.0 / (1.0 + math.exp(lam))

    x, l_prev = 0.4, 0.1
    pred_err, corr_err = [], []
    for h in (0.2, 0.1, 0.05, 0.025):
        t_prev2, t_prev, t = t_of(l_prev - h), t_of(l_prev), t_of(l_prev + h)
        want = exact(x, t_prev, t)
        lp2, lp, lt = l_prev - h, l_prev, l_prev + h
        d = lambda v: torch.tensor([math.cos(v)], dtype=torch.float64)  # noqa: E731
        xt = torch.tensor([x], dtype=torch.float64)
        pred = sa_step(xt, [d(lp), d(lp2)], [lp, lp2], t_prev, t, tau, ZERO, predictor_correction(lp, lp2, lt, tau))
        corr = sa_step(xt, [d(lt), d(lp)], [lt, lp], t_prev, t, tau, ZERO, corrector_correction(lp, lt, tau))
        pred_err.append(abs(pred.item() - want))
        corr_err.append(abs(corr.item() - want))
    for errors in (pred_err, corr_err):
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(6.0 < r < 10.0 for r in ratios), (errors, ratios)
