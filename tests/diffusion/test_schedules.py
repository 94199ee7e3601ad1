"""The diffusion process's tables and per-step formulas against direct NumPy evaluation, and
guided-diffusion's schedule / spacing definitions re-implemented here as loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.diffusion import Diffusion, cosine_betas, linear_betas, spaced_timesteps


def guided_diffusion_cosine_betas(num_diffusion_timesteps, max_beta=0.999):
    """guided-diffusion ``betas_for_alpha_bar`` with the cosine alpha_bar, as written there."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def guided_diffusion_linear_betas(num_diffusion_timesteps):
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def guided_diffusion_space_timesteps(num_timesteps, count):
    """guided-diffusion ``space_timesteps(num_timesteps, [count])`` (one section), as written."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return taken


def _diffusion(T=50):
    return Diffusion(cosine_betas(T))


def _x_and_t(d, shape=(6, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    x0, eps = rng.normal(size=(2, *shape))
    t = np.array([0, 1, 2, d.num_timesteps // 2, d.num_timesteps - 2, d.num_timesteps - 1])
    return x0, eps, t


def _assert_float32_close(got, terms):
    """got == sum(terms) up to float32 rounding of each term (cancellation of large terms, as
    1 / sqrt(ab) x_t - sqrt(1 / ab - 1) eps near t = T, loses digits in any float32 code)."""
    expected, scale = sum(terms), sum(np.abs(term) for term in terms)
    np.testing.assert_array_less(np.abs(np.asarray(got) - expected), 3e-7 * scale + 1e-6)


def _col(values, ndim):
    return values.reshape(values.shape + (1,) * (ndim - 1))


@pytest.mark.parametrize("T", [1, 7, 50, 1000, 4000])
def test_cosine_and_linear_betas_equal_guided_diffusion(T):
    exact = {"rtol": 0, "atol": 1e-12}
    np.testing.assert_allclose(cosine_betas(T), guided_diffusion_cosine_betas(T), **exact)
    np.testing.assert_allclose(linear_betas(T), guided_diffusion_linear_betas(T), **exact)
    assert cosine_betas(T).dtype == linear_betas(T).dtype == np.float64
    assert cosine_betas(1000).max() == 0.999  # the cap is reached at the end of the schedule


@pytest.mark.parametrize("T, steps", [(1000, 64), (1000, 250), (1000, 10), (50, 49), (7, 2)])
def test_spaced_timesteps_equal_guided_diffusion(T, steps):
    assert spaced_timesteps(T, steps).tolist() == guided_diffusion_space_timesteps(T, steps)


def test_q_sample_and_posterior_match_the_formulas():
    d = _diffusion()
    x0, eps, t = _x_and_t(d)
    ab = np.cumprod(1 - d.betas)
    ab_prev = np.append(1.0, ab[:-1])
    beta, ab_t, ab_p = (_col(a[t], 3) for a in (d.betas, ab, ab_prev))
    xt = np.sqrt(ab_t) * x0 + np.sqrt(1 - ab_t) * eps
    np.testing.assert_allclose(d.q_sample(jnp.float32(x0), t, jnp.float32(eps)), xt, atol=1e-6)

    mean, var, log_var = d.q_posterior(jnp.float32(x0), jnp.float32(xt), t)
    expected_mean = (
        beta * np.sqrt(ab_p) / (1 - ab_t) * x0 + (1 - ab_p) * np.sqrt(1 - beta) / (1 - ab_t) * xt
    )
    expected_var = beta * (1 - ab_p) / (1 - ab_t)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-6, atol=0)
    assert var[0].item() == 0.0  # t = 0: the posterior is a point
    # The log is clipped at t = 0 to its t = 1 value (guided-diffusion).
    posterior = d.betas * (1 - ab_prev) / (1 - ab)
    clipped = np.log(np.where(t == 0, posterior[1], posterior[t]))
    np.testing.assert_allclose(log_var[:, 0, 0], clipped, rtol=1e-6)


def test_conversions_match_the_formulas_and_round_trip():
    d = _diffusion()
    x0, eps, t = _x_and_t(d)
    ab = _col(np.cumprod(1 - d.betas)[t], 3)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    f = jnp.float32
    np.testing.assert_allclose(d.v_from(f(x0), t, f(eps)), v, atol=1e-6)
    a, b = np.sqrt(1 / ab), np.sqrt(1 / ab - 1)  # up to 3e4 at t = T - 1
    _assert_float32_close(d.x0_from_eps(f(xt), t, f(eps)), [a * xt, -b * eps])
    _assert_float32_close(d.eps_from_x0(f(xt), t, f(x0)), [a * xt / b, -x0 / b])
    np.testing.assert_allclose(d.x0_from_v(f(xt), t, f(v)), x0, atol=1e-5)
    np.testing.assert_allclose(d.eps_from_v(f(xt), t, f(v)), eps, atol=1e-5)
    # eps -> x0 -> eps and x0 -> eps -> x0 through x_t, and the prediction splitter.
    ok = t < d.num_timesteps - 1  # x0 from eps at the last step amplifies rounding by 1e4
    xt32 = d.q_sample(f(x0), t, f(eps))
    np.testing.assert_allclose(d.x0_from_eps(xt32, t, f(eps))[ok], x0[ok], atol=2e-4)
    np.testing.assert_allclose(d.eps_from_x0(xt32, t, f(x0))[t > 0], eps[t > 0], atol=2e-4)
    for prediction, output in [("eps", eps), ("x0", x0), ("v", v)]:
        got_x0, got_eps = d.split_prediction(f(output), xt32, t, prediction=prediction)
        np.testing.assert_allclose(got_x0[ok], x0[ok], atol=2e-4, err_msg=prediction)
        np.testing.assert_allclose(got_eps[t > 0], eps[t > 0], atol=2e-4, err_msg=prediction)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_the_formulas(variance):
    d = _diffusion()
    x0, xt, t = _x_and_t(d)
    noise = np.random.default_rng(1).normal(size=x0.shape)
    frac = np.random.default_rng(2).uniform(-1, 1, size=x0.shape)
    posterior = d.betas * (1 - d.alphas_cumprod_prev) / (1 - d.alphas_cumprod)
    small = _col(np.log(np.append(posterior[1], posterior[1:]))[t], 3)
    large = _col(np.log(np.append(posterior[1], d.betas[1:]))[t], 3)
    log_var = {
        "fixed_small": small,
        "fixed_large": large,
        "learned_range": (frac + 1) / 2 * _col(np.log(d.betas[t]), 3) + (1 - frac) / 2 * small,
    }[variance]
    c1, c2 = (_col(c[t], 3) for c in (d.posterior_mean_coef1, d.posterior_mean_coef2))
    expected = c1 * x0 + c2 * xt + _col(t > 0, 3) * np.exp(0.5 * log_var) * noise
    got = d.ddpm_step(
        jnp.float32(xt),
        t,
        jnp.float32(x0),
        jnp.float32(noise),
        variance=variance,
        frac=jnp.float32(frac) if variance == "learned_range" else None,
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ddim_step_matches_the_formula_for_strided_steps():
    d = _diffusion()
    x0, xt, t = _x_and_t(d)
    eps, noise = np.random.default_rng(1).normal(size=(2, *x0.shape))
    t_prev = np.array([-1, -1, 0, 10, 30, 20])
    eta = 0.7
    ab = _col(d.alphas_cumprod[t], 3)
    ab_prev = _col(np.where(t_prev < 0, 1.0, d.alphas_cumprod[t_prev]), 3)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    x0_hat = np.sqrt(1 / ab) * xt - np.sqrt(1 / ab - 1) * eps
    expected = np.sqrt(ab_prev) * x0_hat + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * noise
    got = d.ddim_step(jnp.float32(xt), jnp.float32(eps), t, t_prev, eta=eta, noise=noise)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_ddim_with_eta_1_one_step_back_is_the_ddpm_posterior():
    d = _diffusion()
    x0, eps, t = _x_and_t(d)
    t = t[t > 0]  # t = 0 -> -1 has no posterior variance on either side
    x0, eps = x0[: t.size], eps[: t.size]
    xt = d.q_sample(jnp.float32(x0), t, jnp.float32(eps))
    noise = np.random.default_rng(3).normal(size=x0.shape)
    eps_hat = d.eps_from_x0(xt, t, jnp.float32(x0))
    mean = d.ddim_step(xt, eps_hat, t, t - 1, eta=1.0, noise=jnp.zeros_like(xt), x0=x0)
    noisy = d.ddim_step(xt, eps_hat, t, t - 1, eta=1.0, noise=noise, x0=x0)
    posterior_mean, posterior_var, _ = d.q_posterior(jnp.float32(x0), xt, t)
    np.testing.assert_allclose(mean, posterior_mean, atol=2e-5)
    sigma = (noisy - mean) / noise
    np.testing.assert_allclose(sigma**2, np.broadcast_to(posterior_var, x0.shape), rtol=1e-3)


def test_respaced_process_keeps_alphas_cumprod_and_maps_to_original_timesteps():
    d = Diffusion(cosine_betas(1000))
    use = spaced_timesteps(1000, 64)
    spaced = d.respace(use)
    assert spaced.num_timesteps == 64
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[use], rtol=1e-10)
    kept = d.alphas_cumprod[use]
    np.testing.assert_allclose(spaced.betas, 1 - kept / np.append(1, kept[:-1]), rtol=1e-12)
    np.testing.assert_array_equal(spaced.model_timesteps(np.arange(64)), use)
    # Respacing a respaced process composes: its steps map to the original timesteps.
    twice = spaced.respace([0, 5, 63])
    np.testing.assert_array_equal(twice.timesteps, use[[0, 5, 63]])
    # 1e-7: a last beta of 1 - 2.5e-9 keeps 1 - beta to only ~8 digits (as in guided-diffusion).
    np.testing.assert_allclose(twice.alphas_cumprod, d.alphas_cumprod[use[[0, 5, 63]]], rtol=1e-7)
    # A step's forward marginal is the original's at the mapped timestep.
    x0 = jnp.ones((3, 2))
    np.testing.assert_allclose(
        spaced.q_sample(x0, np.array([0, 5, 63]), x0),
        d.q_sample(x0, use[[0, 5, 63]], x0),
        rtol=1e-6,
    )


def test_diffusion_is_hashable_by_its_tables_and_a_static_jit_argument():
    a, b = Diffusion(cosine_betas(20)), Diffusion(cosine_betas(20))
    assert a == b and hash(a) == hash(b)
    assert a != Diffusion(linear_betas(20))  # ends at beta = 1: allowed
    assert a != Diffusion(cosine_betas(20), timesteps=np.arange(20) * 2)
    f = jax.jit(lambda d, x: d.q_sample(x, jnp.zeros(1, jnp.int32), x), static_argnums=0)
    np.testing.assert_allclose(f(a, jnp.ones((1, 2))), f(b, jnp.ones((1, 2))))


def test_bad_inputs_name_the_value():
    d = _diffusion(10)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"timestep 10 is outside \[0, 10\)"):
        d.q_sample(x, np.array([0, 10]), x)
    with pytest.raises(ValueError, match=r"timestep -1 is outside \[0, 10\)"):
        d.q_posterior(x, x, np.array([-1, 3]))
    with pytest.raises(ValueError, match=r"timestep -2 is outside \[-1, 10\)"):
        d.ddim_step(x, x, np.array([1, 1]), np.array([-2, 0]))
    with pytest.raises(ValueError, match="eta must be >= 0, got -0.5"):
        d.ddim_step(x, x, np.array([1, 1]), np.array([0, 0]), eta=-0.5)
    with pytest.raises(ValueError, match=r"unknown prediction 'score'"):
        d.split_prediction(x, x, np.array([1, 1]), prediction="score")
    with pytest.raises(ValueError, match=r"unknown variance 'learned'"):
        d.log_variance(np.array([1, 1]), 2, variance="learned")
    with pytest.raises(ValueError, match=r"increase strictly; 3 follows 5 at index 2"):
        d.respace([0, 5, 3])
    with pytest.raises(ValueError, match=r"increase strictly; 5 follows 5"):
        d.respace([0, 5, 5])
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\), got 0..10"):
        d.respace([0, 5, 10])
    with pytest.raises(ValueError, match=r"betas\[1\] = 0.0"):
        Diffusion([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"betas\[2\] = 1.5"):
        Diffusion([0.1, 0.2, 1.5])
    with pytest.raises(ValueError, match=r"betas\[0\] = nan"):
        Diffusion([np.nan])
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(10, 11)
    # Traced timesteps cannot be checked: out of range they read NaN, not a clamped neighbour.
    out = jax.jit(lambda t: d.q_sample(x, t, x))(jnp.array([3, 10]))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
