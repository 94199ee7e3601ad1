"""Sampling loops with an oracle model for one-point data, thresholding against NumPy, guidance,
determinism and compilation reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.diffusion import Diffusion, cosine_betas, linear_betas
from jaxaigc.sample import diffusion as samplers
from jaxaigc.sample.diffusion import (
    classifier_free_guidance,
    dynamic_threshold,
    guided,
    sample_ddim,
    sample_ddpm,
    static_clip,
)

X_STAR = np.array([0.3, -0.7, 0.9], np.float32)  # the whole data distribution: one point


def oracle(diffusion, point, prediction="eps", learned_variance=False):
    """The exact model for data that is one ``point``: given x_t, x0 is known, so eps and v are.

    It reads ab from the original process at the model's timestep t (respacing must map to it).
    """
    alphas_cumprod = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)

    def model_fn(x, t):
        ab = alphas_cumprod[t][:, None]
        x0 = jnp.broadcast_to(jnp.asarray(point), x.shape)
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        out = {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[prediction]
        if learned_variance:  # any frac in [-1, 1] is a valid variance
            out = jnp.concatenate([out, jnp.tanh(x)], axis=-1)
        return out

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_in_10_steps_and_ddpm_land_on_the_single_data_point(prediction):
    d = Diffusion(cosine_betas(1000))
    model_fn = oracle(d, X_STAR, prediction)
    shape = (4, X_STAR.size)
    for eta in (0.0, 1.0):
        x = sample_ddim(
            d, model_fn, shape, jax.random.key(0), steps=10, eta=eta, prediction=prediction
        )
        np.testing.assert_allclose(x, np.broadcast_to(X_STAR, shape), atol=1e-4)
    x = sample_ddpm(d, model_fn, shape, jax.random.key(1), prediction=prediction)
    np.testing.assert_allclose(x, np.broadcast_to(X_STAR, shape), atol=1e-4)


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_ddpm_with_other_variances_and_respacing_lands_on_the_point(variance):
    d = Diffusion(linear_betas(1000))
    model_fn = oracle(d, X_STAR, learned_variance=variance == "learned_range")
    shape = (3, X_STAR.size)
    x = sample_ddpm(d, model_fn, shape, jax.random.key(2), steps=50, variance=variance)
    np.testing.assert_allclose(x, np.broadcast_to(X_STAR, shape), atol=1e-4)
    x = sample_ddim(d, model_fn, shape, jax.random.key(2), steps=25, variance=variance)
    np.testing.assert_allclose(x, np.broadcast_to(X_STAR, shape), atol=1e-4)


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    d = Diffusion(cosine_betas(100))
    model_fn = lambda x, t: 0.1 * x + jnp.sin(t.astype(jnp.float32))[:, None]
    x_T = jax.random.normal(jax.random.key(5), (2, 3))
    a, b = (
        sample_ddim(d, model_fn, (2, 3), jax.random.key(seed), steps=10, initial_noise=x_T)
        for seed in (0, 1)
    )
    np.testing.assert_array_equal(a, b)
    c = sample_ddim(d, model_fn, (2, 3), jax.random.key(1), steps=10, eta=0.5, initial_noise=x_T)
    assert not np.allclose(a, c)  # with eta > 0 the keys matter


def test_clipping_and_dynamic_thresholding_bound_the_sample():
    d = Diffusion(cosine_betas(100))
    model_fn = oracle(d, np.array([2.0, -3.0, 0.5], np.float32))
    shape = (2, 3)
    x = sample_ddpm(d, model_fn, shape, jax.random.key(0), steps=20, clip_x0=True)
    np.testing.assert_allclose(x, np.broadcast_to([1.0, -1.0, 0.5], shape), atol=1e-4)
    x = sample_ddim(d, model_fn, shape, jax.random.key(0), steps=20, dynamic_percentile=0.9)
    assert np.abs(x).max() <= 1 + 1e-4


def test_dynamic_threshold_matches_numpy():
    scales = np.array([0.3, 1, 2, 5])[:, None, None, None]  # the first has s = max(., 1) = 1
    x0 = np.random.default_rng(0).normal(size=(4, 5, 5, 3)) * scales
    p = 0.9
    s = np.maximum(np.quantile(np.abs(x0).reshape(4, -1), p, axis=1), 1.0)[:, None, None, None]
    assert s[0] == 1 and (s[1:] > 1).all()
    expected = np.clip(x0, -s, s) / s
    got = dynamic_threshold(jnp.float32(x0), percentile=p)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_array_equal(static_clip(jnp.float32([-2.0, 0.5, 3.0])), [-1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="percentile must be in"):
        dynamic_threshold(jnp.float32(x0), percentile=1.5)


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    def model_fn(x, t, conditional):
        cond = conditional[:, None]
        eps = jnp.where(cond, x + 1.0, x - 1.0)
        variance = jnp.where(cond, 0.5, -0.5) * jnp.ones_like(x)
        return jnp.concatenate([eps, variance], axis=-1)

    x, t = jnp.ones((2, 3)), jnp.zeros(2, jnp.int32)
    for scale in (1.0, 3.0):
        out = guided(model_fn, scale)(x, t)
        # s = 1 + w: uncond + s (cond - uncond) == (1 + w) cond - w uncond.
        w = scale - 1
        np.testing.assert_allclose(out[:, :3], (1 + w) * (x + 1) - w * (x - 1))
        np.testing.assert_allclose(out[:, 3:], 0.5)  # variance channels: the conditional ones
    np.testing.assert_allclose(classifier_free_guidance(2.0, 1.0, 4.0), 5.0)


def test_guided_sampling_calls_the_model_with_a_conditional_flag():
    d = Diffusion(cosine_betas(100))
    cond_point, uncond_point = np.array([0.5, 0.0], np.float32), np.array([0.0, 0.0], np.float32)
    cond_fn, uncond_fn = oracle(d, cond_point), oracle(d, uncond_point)

    def model_fn(x, t, conditional):
        return jnp.where(conditional[:, None], cond_fn(x, t), uncond_fn(x, t))

    # Guiding between two exact models extrapolates x0: uncond + s (cond - uncond).
    x = sample_ddim(d, model_fn, (2, 2), jax.random.key(0), steps=10, guidance_scale=3.0)
    np.testing.assert_allclose(x, np.broadcast_to([1.5, 0.0], (2, 2)), atol=1e-4)


def test_partial_model_fns_with_new_params_reuse_the_compiled_sampler():
    d = Diffusion(cosine_betas(50))

    def apply(params, x, t):
        return params["w"] * x

    before = samplers._sample_loop._cache_size()
    for w in (0.1, 0.2, 0.3):
        model_fn = jax.tree_util.Partial(apply, {"w": jnp.float32(w)})
        sample_ddim(d, model_fn, (2, 2), jax.random.key(0), steps=5)
    assert samplers._sample_loop._cache_size() == before + 1


def test_bad_sampler_options_name_the_value():
    d = Diffusion(cosine_betas(50))
    model_fn = lambda x, t: x
    with pytest.raises(ValueError, match="eta must be >= 0, got -1"):
        sample_ddim(d, model_fn, (1, 2), jax.random.key(0), eta=-1)
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        sample_ddpm(d, model_fn, (1, 2), jax.random.key(0), prediction="noise")
    with pytest.raises(ValueError, match="unknown variance 'fixed'"):
        sample_ddpm(d, model_fn, (1, 2), jax.random.key(0), variance="fixed")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 50\], got 51"):
        sample_ddim(d, model_fn, (1, 2), jax.random.key(0), steps=51)
    with pytest.raises(ValueError, match=r"initial_noise has shape \(2, 2\), the samples \(1, 2\)"):
        sample_ddim(d, model_fn, (1, 2), jax.random.key(0), initial_noise=jnp.zeros((2, 2)))
