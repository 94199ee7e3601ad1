"""The unCLIP objectives (Ramesh et al. 2022) on top of :mod:`jaxaigc.objectives.diffusion`:

- prior: ||f(z_i^(t), t, y) - z_i||^2 on the scaled CLIP image embedding (prediction "x0");
- decoder: DDPM's L_simple on eps (or the MSE on v or x0), plus improved DDPM's variational
  bound with weight lambda = 0.001 when the decoder learns its variances (Nichol & Dhariwal 2021,
  Eq. 16: L_hybrid = L_simple + lambda L_vlb, L_vlb = T E_t[L_t]; the mean enters L_vlb with a
  stopped gradient, so L_vlb trains only the variance).

CLIP features come precomputed in the batch; nothing here runs CLIP. Conditioning dropout for
guidance happens inside the models (``train=True``), driven by the loss's rng.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.diffusion import Diffusion
from jaxaigc.objectives.diffusion import (
    loss_by_quartile,
    loss_weights,
    mean_flat,
    prediction_target,
    sample_timesteps,
)

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


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


def _loss_and_metrics(losses, mse, t, num_timesteps, **extra):
    metrics = {"mse": jnp.mean(mse), **loss_by_quartile(losses, t, num_timesteps)}
    metrics |= {name: jnp.mean(value) for name, value in extra.items()}
    return jnp.mean(losses), metrics


def prior_loss_fn(
    model: nn.Module,
    diffusion: Diffusion,
    *,
    weighting: str | np.ndarray = "none",
    min_snr_gamma: float = 5.0,
) -> LossFn:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for the diffusion prior, with batch
    ``{"text_tokens": float [b, text_len, text_width], "text_embedding": [b, embed_dim],
    "image_embedding": [b, embed_dim]}`` (CLIP's per-token text features and unit-norm
    embeddings) and optional ``"text_mask"`` bool [b, text_len].

    The target is x0 = scale * image_embedding. Metrics: ``mse`` (unweighted), ``loss_q0..3``,
    ``cos`` (cosine of predicted and true z_i, the paper's figure of merit) and ``cos_text``
    (cosine of z_t and z_i: the baseline a prior must beat).
    """
    weights = jnp.asarray(
        loss_weights(diffusion, prediction="x0", weighting=weighting, min_snr_gamma=min_snr_gamma),
        jnp.float32,
    )
    scale = model.config.embedding_scale

    def loss_fn(params, batch, rng):
        model_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        x0 = scale * batch["image_embedding"].astype(jnp.float32)  # [b, d]
        t = sample_timesteps(t_rng, x0.shape[0], diffusion.num_timesteps)
        xt = diffusion.q_sample(x0, t, jax.random.normal(noise_rng, x0.shape, jnp.float32))
        pred = model.apply(
            {"params": params}, xt, diffusion.model_timesteps(t), batch["text_tokens"],
            batch["text_embedding"], text_mask=batch.get("text_mask"), train=True,
            rngs={"dropout": model_rng},
        )  # fmt: skip
        mse = mean_flat(jnp.square(pred - x0))
        return _loss_and_metrics(
            weights[t] * mse, mse, t, diffusion.num_timesteps,
            cos=_cosine(pred, x0), cos_text=_cosine(batch["text_embedding"], x0),
        )  # fmt: skip

    return loss_fn


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


def decoder_loss_fn(
    model: nn.Module,
    diffusion: Diffusion,
    *,
    weighting: str | np.ndarray = "none",
    min_snr_gamma: float = 5.0,
    vlb_weight: float = 0.001,
) -> LossFn:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for the decoder, with batch
    ``{"image": float [b, r, r, 3] in [-1, 1], "image_embedding": [b, clip_dim]}`` and
    ``"text_tokens"`` int [b, <= text_len] when the decoder encodes captions.

    Loss: the (weighted) MSE on the config's ``prediction`` target (eps: DDPM's L_simple), plus
    ``vlb_weight * T * L_t`` when the config's variance is "learned_range". Metrics: ``mse``,
    ``loss_q0..3`` and, with learned variances, ``vlb`` (bits per dimension of the sampled L_t).
    """
    prediction = model.config.prediction
    weights = jnp.asarray(
        loss_weights(
            diffusion, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
        ),
        jnp.float32,
    )
    learned = model.config.variance == "learned_range"

    def loss_fn(params, batch, rng):
        model_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        x0 = batch["image"].astype(jnp.float32)
        t = sample_timesteps(t_rng, x0.shape[0], diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        xt = diffusion.q_sample(x0, t, noise)
        out = model.apply(
            {"params": params}, xt, diffusion.model_timesteps(t), batch["image_embedding"],
            batch.get("text_tokens"), train=True, rngs={"dropout": model_rng},
        )  # fmt: skip
        pred, frac = jnp.split(out, 2, axis=-1) if learned else (out, None)
        target = prediction_target(diffusion, x0, t, noise, prediction=prediction)
        mse = mean_flat(jnp.square(pred - target))
        losses = weights[t] * mse
        if not learned:
            return _loss_and_metrics(losses, mse, t, diffusion.num_timesteps)
        _, eps = diffusion.split_prediction(pred, xt, t, prediction=prediction)
        vlb = vlb_terms(diffusion, x0, xt, t, eps, frac)
        losses = losses + vlb_weight * diffusion.num_timesteps * vlb
        return _loss_and_metrics(losses, mse, t, diffusion.num_timesteps, vlb=vlb)

    return loss_fn
