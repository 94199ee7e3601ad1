"""The unCLIP objectives (Ramesh et al. 2022) on top of :mod:`jaxaigc.objectives.diffusion`:

- prior: ||f(z_i^(t), t, y) - z_i||^2 on the scaled CLIP image embedding (prediction "x0");
- decoder: DDPM's L_simple on eps (or the MSE on v or x0), plus improved DDPM's hybrid loss
  L_simple + lambda T L_t with lambda = 0.001 when the decoder learns its variances (Nichol &
  Dhariwal 2021, Eq. 16; the L_t terms are :func:`jaxaigc.objectives.diffusion.vlb_terms`).

CLIP features come precomputed in the batch; nothing here runs CLIP. Conditioning dropout for
guidance happens inside the models (``train=True``), driven by the loss's rng.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.diffusion import Diffusion
from jaxaigc.models.prior import embedding_to_latent, latent_to_embedding
from jaxaigc.objectives.diffusion import (
    loss_by_quartile,
    loss_weights,
    mean_flat,
    prediction_target,
    sample_timesteps,
    vlb_terms,
)

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


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

    The target is x0 = scale * image_embedding (standardised instead with the config's
    ``clip_stats``, the statistics held fixed). Metrics: ``mse`` (unweighted), ``loss_q0..3``,
    ``cos`` (cosine of predicted and true z_i, the paper's figure of merit) and ``cos_text``
    (cosine of z_t and z_i: the baseline a prior must beat).
    """
    weights = jnp.asarray(
        loss_weights(diffusion, prediction="x0", weighting=weighting, min_snr_gamma=min_snr_gamma),
        jnp.float32,
    )
    config = model.config

    def loss_fn(params, batch, rng):
        model_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        z_i = batch["image_embedding"].astype(jnp.float32)  # [b, d]
        x0 = embedding_to_latent(config, jax.lax.stop_gradient(params), z_i)
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
            cos=_cosine(latent_to_embedding(config, params, pred), z_i),
            cos_text=_cosine(batch["text_embedding"], z_i),
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
    ``"text_tokens"`` int [b, <= text_len] when the decoder encodes captions; a decoder reading
    CLIP's caption features (``clip_text_width``) takes ``"text_tokens"`` float [b, text_len,
    clip_text_width], ``"text_embedding"`` [b, clip_dim] and ``"text_mask"`` bool [b, text_len].

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
    clip_caption = ("text_tokens", "text_embedding", "text_mask")

    def loss_fn(params, batch, rng):
        model_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        x0 = batch["image"].astype(jnp.float32)
        t = sample_timesteps(t_rng, x0.shape[0], diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        xt = diffusion.q_sample(x0, t, noise)
        if model.config.clip_text_width:
            caption = {"text": None, **{k: batch.get(k) for k in clip_caption}}
        else:
            caption = {"text": batch.get("text_tokens")}
        out = model.apply(
            {"params": params}, xt, diffusion.model_timesteps(t), batch["image_embedding"],
            **caption, train=True, rngs={"dropout": model_rng},
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
