"""Stochastic Adams (SA-Solver) rollout for rectified flow, data-prediction form.

SPEC section 3a. Schedule ``alpha(t) = 1 - t``, ``sigma(t) = t``,
``lambda(t) = log(alpha / sigma)``; data prediction ``D(x, t) = x - t v(x, t)``.
One step from ``x`` at ``t_prev`` to ``t`` (``h = lambda_t - lambda_prev``,
``s = 1 + tau^2``, one standard-normal draw ``xi``)::

    x_t = exp(-tau^2 h) (t / t_prev) x
        + sum_i s t exp(-tau^2 lambda_t) g_i D_i
        + t sqrt(1 - exp(-2 tau^2 h)) xi

with ``g_i = sum_j c_ij E_{p-1-j}(lambda_prev, lambda_t)``: ``c_ij`` are the power
coefficients of the Lagrange basis through the nodes, and
``E_k(a, b) = int_a^b exp(s x) x^k dx``.

``tau`` of a step is evaluated at the step's target time ``t`` (as the
reference does) and shared by its predictor and corrector, which also share
``xi`` (the corrector redoes the same stochastic step with a better gradient
estimate). On the presets' 14-step grid (noise 0.4, window [0.3, 0.9]) that
makes steps 4..11 stochastic (step k goes from t[k-1] to t[k]).

Coefficients are float64 Python numbers; tensors keep the latents' dtype.
"""

import math

import torch


def exp_poly_integral(k, a, b, s):
    """E_k(a, b) = int_a^b exp(s x) x^k dx in closed form.

    Repeated integration by parts: int exp(s x) x^k dx =
    exp(s x) sum_{m=0}^{k} (-1)^m k! / (k - m)! x^(k-m) / s^(m+1).
    """

    def antiderivative(x):
        total = 0.0
        for m in range(k + 1):
            total += (-1) ** m * math.factorial(k) / math.factorial(k - m) * x ** (k - m) / s ** (m + 1)
        return math.exp(s * x) * total

    return antiderivative(b) - antiderivative(a)


def lagrange_power_coefficients(nodes):
    """c[i][j]: L_i(x) = sum_j c[i][j] x^(p-1-j) for the Lagrange basis through `nodes`."""
    p = len(nodes)
    coefficients = []
    for i, node_i in enumerate(nodes):
        poly = [1.0]  # highest power first
        denominator = 1.0
        for j, node_j in enumerate(nodes):
            if j == i:
                continue
            poly = [a - node_j * b for a, b in zip(poly + [0.0], [0.0] + poly)]  # poly * (x - node_j)
            denominator *= node_i - node_j
        coefficients.append([c / denominator for c in poly])
    assert all(len(row) == p for row in coefficients)
    return coefficients


def gradient_coefficients(lambda_prev, lambda_t, nodes, tau):
    """g_i for the model outputs at `nodes` (lambdas, most recent first)."""
    p = len(nodes)
    s = 1.0 + tau**2
    integrals = [exp_poly_integral(p - 1 - j, lambda_prev, lambda_t, s) for j in range(p)]
    return [sum(c_ij * e for c_ij, e in zip(row, integrals)) for row in lagrange_power_coefficients(nodes)]


def predictor_correction(lambda_prev, lambda_prev2, lambda_t, tau):
    """Order-2 few-step term of the predictor (added to g_0, subtracted from g_1)."""
    s, h = 1.0 + tau**2, lambda_t - lambda_prev
    return math.exp(s * lambda_t) * (h**2 / 2 - (h * s - 1 + math.exp(-s * h)) / s**2) / (lambda_prev - lambda_prev2)


def corrector_correction(lambda_prev, lambda_t, tau):
    """Order-2 few-step term of the corrector (added to g_0, subtracted from g_1)."""
    s, h = 1.0 + tau**2, lambda_t - lambda_prev
    return math.exp(s * lambda_t) * (h / 2 - (h * s - 1 + math.exp(-s * h)) / (s**2 * h))


def log_snr(t):
    """lambda(t) = log((1 - t) / t)."""
    return math.log((1.0 - t) / t)


def sa_step(x, outputs, nodes, t_prev, t, tau, noise, correction=0.0):
    """One SA step from `x` [B, ...] at `t_prev` to `t`.

    `outputs`: data predictions D_i (tensors like x), most recent first, taken at
    the lambdas `nodes`; `correction`: the order-2 few-step term for g_0 / g_1.
    """
    lambda_prev, lambda_t = log_snr(t_prev), log_snr(t)
    h = lambda_t - lambda_prev
    g = gradient_coefficients(lambda_prev, lambda_t, nodes, tau)
    if len(g) == 2:
        g[0] += correction
        g[1] -= correction
    s = 1.0 + tau**2
    out = math.exp(-(tau**2) * h) * (t / t_prev) * x
    scale = s * t * math.exp(-(tau**2) * lambda_t)
    for g_i, output in zip(g, outputs):
        out = out + (scale * g_i) * output
    if tau > 0:
        out = out + t * math.sqrt(-math.expm1(-2.0 * tau**2 * h)) * noise
    return out


def sa_solver_time_grid(sigmas):
    """SPEC 3a grid: flow sigmas with t[0] = 1 - 1e-3 and t[-2] = t[-3] / 2 (t[-1] = 0)."""
    t = [float(v) for v in sigmas]
    if len(t) < 4 or t[-1] != 0.0:
        raise ValueError(f"need >= 3 steps ending at sigma 0, got {t}")
    t[0] = 1.0 - 1e-3
    t[-2] = t[-3] / 2.0
    return t


def tau_at(t, noise_level):
    """Stochasticity: noise_level inside [0.3, 0.9], 0 outside."""
    return noise_level if 0.3 <= t <= 0.9 else 0.0


def sa_solver_sample(denoise, x, t, noise_level, generator=None, progress=None, draw_noise=None):
    """Run the SA-Solver (predictor order 2, corrector order 2, PEC) over grid `t`.

    denoise(x, t) -> D, the data prediction, same shape as x [B, C, H, W].
    Returns the list of len(t) latents (start, then after every step; the last is
    the clean sample). Calls `denoise` exactly len(t) - 1 times.
    `draw_noise()` -> the next standard-normal draw like x, one per stochastic step in
    step order (default: ``torch.randn`` from `generator`; chunked rollouts pass draws
    made per rollout batch, see ``rollout.BatchNoise``).
    """
    if draw_noise is None:
        def draw_noise(shape=x.shape, device=x.device, dtype=x.dtype):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    steps = len(t) - 1
    lambdas = [log_snr(v) for v in t[:-1]]
    latents = [x]
    outputs = [denoise(x, t[0])]  # most recent first, at most two kept
    for step in range(1, steps):
        t_prev, t_now = t[step - 1], t[step]
        tau = tau_at(t_now, noise_level)  # SPEC 3a: the step's target time
        noise = draw_noise() if tau > 0 else None

        order = 1 if step == 1 else min(2, steps - step + 1)
        nodes = [lambdas[step - 1 - i] for i in range(order)]
        correction = 0.0
        if order == 2:
            correction = predictor_correction(lambdas[step - 1], lambdas[step - 2], lambdas[step], tau)
        x_pred = sa_step(x, outputs[:order], nodes, t_prev, t_now, tau, noise, correction)
        fresh = denoise(x_pred, t_now)

        if step == 1:  # the first corrector is disabled
            x = x_pred
        else:
            c_order = min(2, steps - step + 2)
            c_outputs = [fresh] + outputs[: c_order - 1]
            c_nodes = [lambdas[step - i] for i in range(c_order)]
            c_correction = corrector_correction(lambdas[step - 1], lambdas[step], tau) if c_order == 2 else 0.0
            x = sa_step(x, c_outputs, c_nodes, t_prev, t_now, tau, noise, c_correction)
        outputs = [fresh] + outputs[:1]
        latents.append(x)
        if progress is not None:
            progress()
    # Final step to t = 0: the latest data prediction (taken at the predictor
    # point of the previous step), no model call.
    latents.append(outputs[0])
    return latents
