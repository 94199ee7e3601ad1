"""The dVAE objective of DALL-E (Ramesh et al. 2021, Sec. 2.1 and App. A.2).

The ELBO of a discrete VAE whose categorical posterior q(z | x) = softmax(encoder logits) is relaxed
with gumbel-softmax (no straight-through in the paper), a uniform prior over the vocabulary, and a
logit-Laplace likelihood. Per example, with D = H W C image dimensions:

    loss = (NLL(x | relaxed z) + beta * KL(q(z | x) || uniform)) / D

Dividing the summed ELBO by the constant D keeps beta's meaning (its weight relative to the summed
NLL, as in the paper) while the loss no longer grows with the image size. beta rises 0 -> 6.6 over
5k updates and the temperature falls 1 -> 1/16 over 150k updates, both on cosine schedules.

The likelihood is the paper's logit-Laplace of the pixels mapped into (eps, 1 - eps) (App. A.3,
:func:`jaxaigc.models.dvae.map_pixels`). It is an L1 in logit space: the decoder's best location
for a pixel is its median given the codes, which weak information does not move (a code that sees
a red shape a third of the time still decodes to the black background, or to a grey), and the
learned scale b lets the decoder widen where it is unsure, so the encoder gets little signal. On
flat synthetic images (most pixels black, flat saturated shapes) the codes then learn where a shape
is but not its colour or outline. Two departures, off by default, get it going:

- ``gaussian_warmup_steps``: the NLL trained on is ``(1 - w) NLL_laplace + w NLL_gaussian``, w
  falling 1 -> 0 (cosine), a fixed-scale Gaussian on the mapped pixels (a squared error) whose
  mean moves with any information, like the KL weight's warm-up from 0; after it, the paper's
  objective alone. The reported NLL is the logit-Laplace's throughout.
- ``log_scale_floor``: ln b held above a floor, so the density stays bounded where the decoder is
  exact (the flat background, where ln b would otherwise fall without limit).

``likelihood="gaussian"`` (not in the paper) trains with the Gaussian alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxaigc.models.dvae import (
    LOGIT_LAPLACE_EPS,
    Decoder,
    DVAEConfig,
    Encoder,
    logit_laplace_log_prob,
    map_pixels,
    reconstruct,
    split_stats,
    to_unit_range,
)

LIKELIHOODS = ("logit_laplace", "gaussian")


@dataclasses.dataclass(frozen=True)
class DVAEObjectiveConfig:
    beta_max: float = 6.6  # KL weight; the paper found it promotes codebook usage
    beta_steps: int = 5_000
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_steps: int = 150_000  # the paper found a linear (not cosine) annealing diverged
    straight_through: bool = False  # the paper does not use it
    likelihood: str = "logit_laplace"  # or "gaussian" (not in the paper; see the module doc)
    # Not in the paper: ln b is held above this floor (softly, see floor_log_scale); None leaves
    # the scale free, as the paper does.
    log_scale_floor: float | None = None
    # Not in the paper: the logit-Laplace NLL is blended with the Gaussian's, the Gaussian's weight
    # falling 1 -> 0 over these updates (cosine); see the module doc.
    gaussian_warmup_steps: int = 0
    gaussian_scale: float = 0.1  # the Gaussian's standard deviation, in mapped-pixel units

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; use one of {LIKELIHOODS}")

    def replace(self, **changes) -> DVAEObjectiveConfig:
        return dataclasses.replace(self, **changes)


def cosine_schedule(start: float, end: float, steps: int) -> Callable[[jax.Array], jax.Array]:
    """``step -> value``: half a cosine from ``start`` at step 0 to ``end`` at ``steps``, then
    constant (``end`` throughout when ``steps <= 0``)."""

    def schedule(step: jax.Array) -> jax.Array:
        if steps <= 0:
            return jnp.asarray(end, jnp.float32)
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def beta_schedule(config: DVAEObjectiveConfig) -> Callable[[jax.Array], jax.Array]:
    return cosine_schedule(0.0, config.beta_max, config.beta_steps)


def temperature_schedule(config: DVAEObjectiveConfig) -> Callable[[jax.Array], jax.Array]:
    start, end = config.temperature_start, config.temperature_end
    return cosine_schedule(start, end, config.temperature_steps)


def gaussian_weight_schedule(config: DVAEObjectiveConfig) -> Callable[[jax.Array], jax.Array]:
    """The Gaussian NLL's weight in the logit-Laplace's warm-up: 1 -> 0, then 0."""
    return cosine_schedule(1.0, 0.0, config.gaussian_warmup_steps)


def gumbel_softmax(
    rng: jax.Array,
    logits: jax.Array,
    temperature: jax.Array | float,
    *,
    straight_through: bool = False,
) -> jax.Array:
    """A relaxed one-hot sample softmax((logits + g) / temperature), g ~ Gumbel(0, 1), over the
    last axis. ``straight_through``: the forward value is the one-hot of the sample's argmax and
    the gradient that of the relaxed sample."""
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits.astype(jnp.float32) + gumbel) / temperature, axis=-1)
    if not straight_through:
        return soft
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform over the vocabulary), per position summed over all positions.

    Args: logits [b, ..., vocab]. Returns: [b], in nats.
    """
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])
    return kl.reshape(kl.shape[0], -1).sum(-1)


def floor_log_scale(log_b: jax.Array, floor: float | None) -> jax.Array:
    """``floor + softplus(log_b - floor)``: above ``floor`` everywhere, ``log_b`` where it is well
    above, with a nonzero gradient everywhere (``log_b`` itself when ``floor`` is None)."""
    if floor is None:
        return log_b
    return floor + jax.nn.softplus(log_b - floor)


def logit_laplace_nll(
    x: jax.Array,
    stats: jax.Array,
    log_scale_floor: float | None = None,
) -> jax.Array:
    """Negative log-likelihood of mapped pixels under the decoder's logit-Laplace distribution,
    its ln b passed through :func:`floor_log_scale`.

    Args: x mapped pixels [b, H, W, c] in (eps, 1 - eps); stats decoder output [b, H, W, 2c].
    Returns: [b], summed over pixels and channels, in nats.
    """
    mu, log_b = split_stats(stats)
    log_b = floor_log_scale(log_b, log_scale_floor)
    return -logit_laplace_log_prob(x, mu, log_b).reshape(x.shape[0], -1).sum(-1)


def gaussian_nll(x: jax.Array, stats: jax.Array, scale: float) -> jax.Array:
    """Negative log-likelihood of mapped pixels under N(sigmoid(mu), scale^2) (ln b is unused).

    Args: x mapped pixels [b, H, W, c]; stats decoder output [b, H, W, 2c].
    Returns: [b], summed over pixels and channels, in nats.
    """
    mu, _ = split_stats(stats)
    z = (jax.nn.sigmoid(mu) - x) / scale
    nll = 0.5 * jnp.square(z) + math.log(scale) + 0.5 * math.log(2 * math.pi)
    return nll.reshape(x.shape[0], -1).sum(-1)


def reconstruction_nll(objective: DVAEObjectiveConfig, x: jax.Array, stats: jax.Array) -> jax.Array:
    """The NLL [b] in nats of mapped pixels x [b, H, W, c] under ``objective.likelihood``."""
    if objective.likelihood == "gaussian":
        return gaussian_nll(x, stats, objective.gaussian_scale)
    return logit_laplace_nll(x, stats, objective.log_scale_floor)


def warmup_nll(
    objective: DVAEObjectiveConfig,
    x: jax.Array,
    stats: jax.Array,
    nll: jax.Array,
    gaussian_weight: jax.Array,
) -> jax.Array:
    """The NLL [b] trained on: ``nll``, the logit-Laplace's of mapped pixels x given ``stats``,
    blended with the Gaussian's, ``(1 - w) nll + w gaussian_nll`` (``nll`` as it is for the
    Gaussian likelihood or without a warm-up)."""
    if objective.likelihood != "logit_laplace" or objective.gaussian_warmup_steps <= 0:
        return nll
    gaussian = gaussian_nll(x, stats, objective.gaussian_scale)
    return (1 - gaussian_weight) * nll + gaussian_weight * gaussian


def bits_per_dim(nll: jax.Array, dims: int) -> jax.Array:
    """NLL in nats of mapped pixels, summed over ``dims`` subpixels -> bits per 8-bit subpixel:
    the density of [0, 1] pixels (the map's Jacobian put back) + 8 bits of discretisation."""
    log_jacobian = math.log(1.0 - 2.0 * LOGIT_LAPLACE_EPS)  # log |d map_pixels / dx|
    return (nll / dims - log_jacobian) / math.log(2.0) + 8.0


def psnr(images: jax.Array, targets: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per example: [b, ...] -> [b]."""
    mse = jnp.mean(jnp.square(images - targets).reshape(images.shape[0], -1), axis=-1)
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def codebook_usage(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of the vocabulary used) of token ids int [...].

    Perplexity is exp of the entropy of the code histogram over all the ids: the number of codes
    the batch effectively uses (at most ``min(vocab_size, ids.size)``).
    """
    counts = jnp.bincount(ids.ravel(), length=vocab_size).astype(jnp.float32)
    p = counts / ids.size
    return jnp.exp(jnp.sum(jax.scipy.special.entr(p))), jnp.mean(counts > 0)


def make_loss_fn(
    config: DVAEConfig, objective: DVAEObjectiveConfig | None = None
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(params, batch, rng, *, step) -> (loss, metrics)``; train it with
    ``make_train_step(..., pass_step=True)``.

    ``params = {"encoder": ..., "decoder": ...}`` (each half's ``"params"`` collection);
    ``batch = {"images": [b, H, W, c]}``, uint8 or float in [0, 1], H and W multiples of
    ``config.downsample``. Metrics: ``nll_bpd`` the reconstruction NLL (``objective.likelihood``)
    in bits per 8-bit subpixel (continuous density on [0, 1] + 8 bits of discretisation),
    ``kl_per_token`` in nats,
    ``psnr`` of the relaxed reconstruction, codebook ``perplexity`` and ``codes_used`` of the
    encoder's argmax tokens, and the scheduled ``beta``, ``temperature`` and ``gaussian_weight``
    (the Gaussian NLL's share of the NLL trained on, see :func:`warmup_nll`).
    """
    objective = objective or DVAEObjectiveConfig()
    encoder, decoder = Encoder(config), Decoder(config)
    beta_at, temperature_at = beta_schedule(objective), temperature_schedule(objective)
    gaussian_weight_at = gaussian_weight_schedule(objective)

    def loss_fn(params, batch, rng, *, step):
        images = to_unit_range(batch["images"])  # [b, H, W, c]
        if images.shape[1] % config.downsample or images.shape[2] % config.downsample:
            raise ValueError(
                f"image size {images.shape[1:3]} is not a multiple of {config.downsample}"
            )
        x = map_pixels(images)
        logits = encoder.apply({"params": params["encoder"]}, x)  # [b, h, w, vocab]
        beta, temperature = beta_at(step), temperature_at(step)
        codes = gumbel_softmax(
            rng, logits, temperature, straight_through=objective.straight_through
        )
        stats = decoder.apply({"params": params["decoder"]}, codes)  # [b, H, W, 2c]

        dims = math.prod(images.shape[1:])
        nll = reconstruction_nll(objective, x, stats)  # [b]
        kl = kl_to_uniform(logits)  # [b]
        gaussian_weight = gaussian_weight_at(step)
        trained_nll = warmup_nll(objective, x, stats, nll, gaussian_weight)
        loss = jnp.mean((trained_nll + beta * kl) / dims)  # the negative ELBO per dimension

        perplexity, codes_used = codebook_usage(jnp.argmax(logits, -1), config.vocab_size)
        metrics = {
            "nll_bpd": bits_per_dim(jnp.mean(nll), dims),
            "kl_per_token": jnp.mean(kl) / math.prod(logits.shape[1:-1]),
            "psnr": jnp.mean(psnr(reconstruct(stats), images)),
            "perplexity": perplexity,
            "codes_used": codes_used,
            "beta": beta,
            "temperature": temperature,
            "gaussian_weight": gaussian_weight,
        }
        return loss, metrics

    return loss_fn
