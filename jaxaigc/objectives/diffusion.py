"""The diffusion training objectives: a timestep-weighted mean-squared error on the eps, x0 or v
target (DDPM's L_simple, Ho et al. 2020 Eq. 14, for eps with unit weights; the unCLIP prior's
||f(z_t, t) - z_0||^2 for x0; Salimans & Ho 2022 for v), and the variational bound's terms L_t
that learned-range variances train on.

Per example, with t ~ U{0, ..., T - 1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps):

    loss = w_t * mean over dimensions (model(x_t, t) - target)^2

Weightings ``w_t``: "none" (1); "min_snr" (Min-SNR-gamma, Hang et al. 2023: the x0-space weight
min(SNR_t, gamma), SNR_t = ab_t / (1 - ab_t), expressed for the target: divided by SNR_t for eps
and by SNR_t + 1 for v); or any float array [T]. The three targets with the same weighting in x0
space are the same loss: an x0 error d is an eps error of sqrt(SNR) d and a v error of
sqrt(SNR + 1) d.

The variational bound (improved DDPM, Nichol & Dhariwal 2021, Eq. 4-6), which learned-range
variances train on: L_vlb = L_0 + L_1 + ... + L_{T-1} (L_T has no parameters), estimated per
example as T L_t at the drawn t, with

    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   t > 0; Eq. 6, ``normal_kl``
    L_0 = -log p(x0 | x_1)                              8-bit data, bins of width 2 / 255; Eq. 5,
                                                        ``discretized_gaussian_log_likelihood``

in bits per dimension (:func:`vlb_terms`). The model's mean enters with a stopped gradient, so
L_vlb trains only the variance; the hybrid loss L_simple + lambda L_vlb (Eq. 16, lambda = 0.001)
is the decoder's (``objectives.unclip.decoder_loss_fn``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.diffusion.schedules import Diffusion, check_prediction

WEIGHTINGS = ("none", "min_snr")
QUARTILES = 4  # guided-diffusion logs each loss term per quarter of [0, T)


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
    """t ~ uniform over {0, ..., num_timesteps - 1}: int32 [batch]."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, jnp.int32)


def signal_to_noise(diffusion: Diffusion) -> np.ndarray:
    """SNR_t = ab_t / (1 - ab_t): float64 [T]."""
    return diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)


def loss_weights(
    diffusion: Diffusion,
    *,
    prediction: str,
    weighting: str | np.ndarray = "none",
    min_snr_gamma: float = 5.0,
) -> np.ndarray:
    """w_t for the ``prediction`` target: float64 [T] (see the module docstring)."""
    check_prediction(prediction)
    if not isinstance(weighting, str):
        weights = np.asarray(weighting, np.float64)
        if weights.shape != (diffusion.num_timesteps,):
            raise ValueError(
                f"weights have shape {weights.shape}, the process {diffusion.num_timesteps} steps"
            )
        return weights
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS} or an array")
    if weighting == "none":
        return np.ones(diffusion.num_timesteps)
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    snr = signal_to_noise(diffusion)
    clipped = np.minimum(snr, min_snr_gamma)  # the weight of the x0 error
    return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1.0)}[prediction]


def prediction_target(
    diffusion: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array, *, prediction: str
) -> jax.Array:
    """What the model regresses at x_t = q_sample(x0, t, noise): noise, x0 or v [b, ...]."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return diffusion.v_from(x0, t, noise)


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [b, ...] -> [b]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def diffusion_loss(
    diffusion: Diffusion,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    rng: jax.Array,
    *,
    prediction: str = "eps",
    weighting: str | np.ndarray = "none",
    min_snr_gamma: float = 5.0,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> jax.Array:
    """The weighted MSE of each example, float32 [b].

    Args:
      diffusion: the process (its ``model_timesteps`` are what ``model_fn`` sees).
      model_fn: ``(x_t [b, ...], t int32 [b]) -> prediction [b, ...]``.
      x0: data [b, ...].
      rng: key for t and the noise (those not given).
      prediction: "eps", "x0" or "v".
      weighting, min_snr_gamma: see ``loss_weights``.
      t: int [b] steps of ``diffusion``, default uniform. noise: [b, ...], default N(0, I).
    """
    weights = loss_weights(
        diffusion, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
    )
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
        t = sample_timesteps(t_rng, x0.shape[0], diffusion.num_timesteps)
    diffusion.check_timesteps(t)
    t = jnp.asarray(t, jnp.int32)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    xt = diffusion.q_sample(x0, t, noise)
    output = model_fn(xt, diffusion.model_timesteps(t)).astype(jnp.float32)
    if output.shape != x0.shape:
        raise ValueError(f"the model output has shape {output.shape}, the data {x0.shape}")
    target = prediction_target(diffusion, x0, t, noise, prediction=prediction)
    return jnp.asarray(weights, jnp.float32)[t] * mean_flat(jnp.square(output - target))


def loss_by_quartile(losses: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
    """``{"loss_q0": ..., "loss_q3": ...}``: the mean loss of the examples whose t lies in each
    quarter of [0, T) (quartile floor(4 t / T), as guided-diffusion); NaN for a quarter that the
    batch did not draw (with gradient accumulation, one such microbatch makes the step's NaN)."""
    quartile = (QUARTILES * t) // num_timesteps
    metrics = {}
    for q in range(QUARTILES):
        mask = (quartile == q).astype(jnp.float32)
        count = mask.sum()
        mean = (losses * mask).sum() / jnp.maximum(count, 1.0)
        metrics[f"loss_q{q}"] = jnp.where(count > 0, mean, jnp.nan)
    return metrics


def make_loss_fn(
    diffusion: Diffusion,
    apply_fn: Callable[..., jax.Array],
    *,
    data_key: str = "x",
    prediction: str = "eps",
    weighting: str | np.ndarray = "none",
    min_snr_gamma: float = 5.0,
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for ``make_train_step``.

    ``apply_fn(params, x_t, t, batch, rng) -> prediction [b, ...]``: t int32 [b] the model's
    timesteps; ``batch`` carries any conditioning; ``rng`` is for dropout (and conditioning
    dropout, for guidance). The data is ``batch[data_key]`` [b, ...]. The loss is the batch mean
    of ``diffusion_loss``; metrics: ``mse`` (unweighted) and ``loss_q0`` .. ``loss_q3``.
    """
    weights = loss_weights(  # checked now, before anything is traced
        diffusion, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
    )
    unweighted = np.ones(diffusion.num_timesteps)

    def loss_fn(params, batch, rng):
        model_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        x0 = batch[data_key]
        t = sample_timesteps(t_rng, x0.shape[0], diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        mse = diffusion_loss(
            diffusion,
            lambda xt, model_t: apply_fn(params, xt, model_t, batch, model_rng),
            x0,
            rng,
            prediction=prediction,
            weighting=unweighted,
            t=t,
            noise=noise,
        )  # [b]
        losses = jnp.asarray(weights, jnp.float32)[t] * mse
        loss = jnp.mean(losses)
        metrics = {"mse": jnp.mean(mse), **loss_by_quartile(losses, t, diffusion.num_timesteps)}
        return loss, metrics

    return loss_fn


def normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
        + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
    )  # fmt: skip


def _approx_normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, mean: jax.Array, log_scale: jax.Array
) -> jax.Array:
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2 / 255, the end bins open) under
    N(mean, e^(2 log_scale)); guided-diffusion's, with its tanh approximation of the CDF."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_terms(
    diffusion: Diffusion, x0: jax.Array, xt: jax.Array, t: jax.Array, eps: jax.Array, frac
) -> jax.Array:
    """L_t in bits per dimension, per example [b]: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
    for t > 0, the decoder's negative log-likelihood of x0 at t = 0. ``eps`` enters with a stopped
    gradient; ``frac`` [b, ...] is the model's variance interpolation in [-1, 1]."""
    true_mean, _, true_log_var = diffusion.q_posterior(x0, xt, t)
    x0_pred = diffusion.x0_from_eps(xt, t, jax.lax.stop_gradient(eps))
    mean, _, _ = diffusion.q_posterior(x0_pred, xt, t)
    log_var = diffusion.log_variance(t, xt.ndim, variance="learned_range", frac=frac)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)
