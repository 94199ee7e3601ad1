"""The diffusion objectives: targets and weights against NumPy, the equivalence of the three
targets under Min-SNR, quartile metrics, a tiny denoiser whose loss falls, and the variational
bound's terms against SciPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jaxaigc.diffusion import Diffusion, cosine_betas
from jaxaigc.objectives import diffusion as objective
from jaxaigc.sample.diffusion import sample_ddim
from jaxaigc.train.state import init_state
from jaxaigc.train.step import make_train_step


def _data(b=8, shape=(3, 2), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, *shape)).astype(np.float32), rng.normal(size=(b, *shape))


def test_loss_equals_numpy_for_each_target():
    d = Diffusion(cosine_betas(100))
    x0, noise = _data()
    t = np.array([0, 3, 17, 40, 55, 80, 98, 99])
    ab = d.alphas_cumprod[t][:, None, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    targets = {"eps": noise, "x0": x0, "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}
    weights = np.linspace(0.5, 2.0, 100)

    def model_fn(xt, t):  # some function of both inputs
        return jnp.tanh(xt) * (t[:, None, None] / 100.0)

    output = np.tanh(xt) * (t[:, None, None] / 100.0)
    for prediction, target in targets.items():
        got = objective.diffusion_loss(
            d, model_fn, x0, jax.random.key(0), prediction=prediction, weighting=weights,
            t=t, noise=jnp.float32(noise),
        )  # fmt: skip
        expected = weights[t] * ((output - target) ** 2).mean((1, 2))
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=prediction)


def test_min_snr_weights_give_the_same_loss_for_every_target():
    """An x0 error d is an eps error sqrt(SNR) d and a v error sqrt(SNR + 1) d: with Min-SNR each
    target's loss is min(SNR, gamma) |d|^2."""
    d = Diffusion(cosine_betas(100))
    x0, noise = _data()
    t = np.array([0, 3, 17, 40, 55, 80, 95, 97])  # ab_99 ~ 1e-8: float32 x_t loses x0 there
    delta = 0.1 * np.random.default_rng(1).normal(size=x0.shape)
    x0_hat = jnp.float32(x0 + delta)

    def model_fn_for(prediction):
        def model_fn(xt, model_t):  # a model whose x0 estimate is x0 + delta
            eps_hat = d.eps_from_x0(xt, model_t, x0_hat)
            return {"x0": x0_hat, "eps": eps_hat, "v": d.v_from(x0_hat, model_t, eps_hat)}[
                prediction
            ]

        return model_fn

    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    expected = np.minimum(snr, 5.0) * (delta**2).mean((1, 2))
    for prediction in ("eps", "x0", "v"):
        got = objective.diffusion_loss(
            d, model_fn_for(prediction), x0, jax.random.key(0), prediction=prediction,
            weighting="min_snr", t=t, noise=jnp.float32(noise),
        )  # fmt: skip
        np.testing.assert_allclose(got, expected, rtol=2e-3, err_msg=prediction)
    weights = objective.loss_weights(d, prediction="eps", weighting="min_snr", min_snr_gamma=5.0)
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    np.testing.assert_allclose(weights, np.minimum(5.0 / snr, 1.0), rtol=1e-12)


def test_loss_by_quartile_is_the_masked_mean_and_nan_when_empty():
    losses = jnp.float32([1.0, 2.0, 3.0, 4.0, 5.0])
    t = jnp.int32([0, 24, 25, 99, 80])  # T = 100: quartiles 0, 0, 1, 3, 3
    metrics = objective.loss_by_quartile(losses, t, 100)
    np.testing.assert_allclose(metrics["loss_q0"], 1.5)
    np.testing.assert_allclose(metrics["loss_q1"], 3.0)
    assert np.isnan(metrics["loss_q2"])
    np.testing.assert_allclose(metrics["loss_q3"], 4.5)


def test_bad_objective_options_name_the_value():
    d = Diffusion(cosine_betas(10))
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        objective.make_loss_fn(d, lambda *a: a[1], weighting="snr")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        objective.make_loss_fn(d, lambda *a: a[1], prediction="score")
    with pytest.raises(ValueError, match=r"weights have shape \(5,\), the process 10 steps"):
        objective.loss_weights(d, prediction="eps", weighting=np.ones(5))
    with pytest.raises(ValueError, match=r"timestep 10 is outside \[0, 10\)"):
        objective.diffusion_loss(d, lambda x, t: x, jnp.zeros((1, 2)), jax.random.key(0), t=[10])
    with pytest.raises(ValueError, match=r"model output has shape \(1, 4\), the data \(1, 2\)"):
        objective.diffusion_loss(
            d, lambda x, t: jnp.zeros((1, 4)), jnp.zeros((1, 2)), jax.random.key(0)
        )


class Denoiser(nn.Module):
    """An MLP eps-model for 2-D points: [x, sinusoidal features of t] -> eps."""

    num_timesteps: int
    width: int = 128

    @nn.compact
    def __call__(self, x, t):
        phase = t[:, None].astype(jnp.float32) / self.num_timesteps * jnp.arange(1, 9) * jnp.pi
        h = jnp.concatenate([x, jnp.sin(phase), jnp.cos(phase)], axis=-1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)


def test_a_tiny_denoiser_trained_on_2d_data_lowers_the_loss_and_samples_the_data():
    d = Diffusion(cosine_betas(100))
    model = Denoiser(d.num_timesteps)
    loss_fn = objective.make_loss_fn(
        d, lambda params, xt, t, batch, rng: model.apply({"params": params}, xt, t)
    )
    tx = optax.adam(5e-3)
    init = lambda rng: model.init(rng, jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32))
    state = init_state(init, tx, jax.random.key(0), use_ema=False)
    step = jax.jit(make_train_step(loss_fn, tx, rng=jax.random.key(1)))

    # Eight well-separated modes on a circle: far from a Gaussian, so eps is learnable.
    angles = np.random.default_rng(0).integers(0, 8, size=(300, 256)) * (np.pi / 4)
    points = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)
    losses = []
    for batch in points:
        state, metrics = step(state, {"x": batch})
        losses.append(float(metrics["train/loss"]))
    assert set(metrics) >= {"train/mse", "train/loss_q0", "train/loss_q3"}
    # The untrained model's eps-MSE is ~1; it falls to ~0.35 within these steps.
    first, last = np.mean(losses[:3]), np.mean(losses[-50:])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first, (first, last)
    # Samples lie near the circle: median |r - 1| ~0.05 here, 0.21 for N(0, I) clipped to the box.
    apply = lambda params, x, t: model.apply({"params": params}, x, t)
    model_fn = jax.tree_util.Partial(apply, state.params)
    samples = sample_ddim(d, model_fn, (512, 2), jax.random.key(2), steps=20, clip_x0=True)
    radius_error = np.abs(np.linalg.norm(samples, axis=-1) - 1.0)
    print(f"median |r - 1| {np.median(radius_error):.3f}")
    assert np.median(radius_error) < 0.1


def test_variational_bound_terms_match_scipy():
    rng = np.random.default_rng(0)
    m1, m2, lv1, lv2 = rng.standard_normal((4, 50))
    kl = np.log(np.exp(0.5 * lv2) / np.exp(0.5 * lv1))
    kl += (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5
    np.testing.assert_allclose(objective.normal_kl(m1, lv1, m2, lv2), kl, rtol=1e-5, atol=1e-6)
    # 8-bit data: the probability of each bin of width 2 / 255, the end bins open.
    x = np.concatenate([[-1.0, 1.0], rng.integers(0, 256, 48) / 127.5 - 1.0])
    mean, log_scale = 0.3 * rng.standard_normal(50), rng.uniform(-4, 0, 50)
    std = np.exp(log_scale)
    upper = np.where(x > 0.999, 1.0, scipy.stats.norm.cdf(x + 1 / 255, mean, std))
    lower = np.where(x < -0.999, 0.0, scipy.stats.norm.cdf(x - 1 / 255, mean, std))
    got = objective.discretized_gaussian_log_likelihood(x, mean, log_scale)
    np.testing.assert_allclose(np.exp(got), upper - lower, atol=2e-3)  # tanh approximation
