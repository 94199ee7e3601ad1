"""Diffusion sampling loops: ancestral DDPM (Ho et al. 2020; learned-range variances of Nichol &
Dhariwal 2021) and DDIM (Song et al. 2021) for a :class:`~jaxaigc.diffusion.schedules.Diffusion`,
each one ``lax.scan`` inside one ``jax.jit``, with classifier-free guidance (Ho & Salimans 2021)
and static or dynamic (Imagen, Saharia et al. 2022, Sec. 2.3) thresholding of the x0 estimate;
then the unCLIP stages' samplers on top of them (Ramesh et al. 2022): :func:`sample_prior` (best
of ``candidates`` DDIM samples by z_i . z_t) and :func:`sample_decoder`.

The model. ``model_fn(x, t) -> output`` with x [b, ...] and t int32 [b] the model's (original)
timesteps; ``output`` [b, ...] predicts ``prediction`` ("eps", "x0" or "v"), followed on the last
axis by as many variance channels (in [-1, 1]) when ``variance="learned_range"``. It is a jit
argument, not a constant: pass ``jax.tree_util.Partial(apply_fn, params)`` and new parameters
reuse the compiled sampler; a plain function compiles once per function object.

Guidance. With ``guidance_scale=s`` the model is ``model_fn(x, t, conditional)``, conditional
bool [b] (False: drop the conditioning, as in training with conditioning dropout); both halves
run as one batch of 2b and the prediction channels are mixed as

    out = uncond + s (cond - uncond) = (1 + w) cond - w uncond,   s = 1 + w,

s (GLIDE's and REFERENCE's scale, diffusers' ``guidance_scale``) = 1 is the conditional model,
w (Ho & Salimans, Imagen) = 0. Mixing eps, x0 or v predictions is the same mixture: at fixed x_t
each is an affine function of the others. Variance channels are the conditional ones.

Steps. ``steps=n`` respaces the process to ``n`` evenly spaced timesteps (``spaced_timesteps``,
first and last included); without it the given process runs whole (respace it yourself for
other spacings). A step's noise is ``normal(fold_in(rng, t))``; x_T is drawn from
``fold_in(rng, T)`` unless given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxaigc.diffusion.schedules import VARIANCES, Diffusion, check_prediction, spaced_timesteps
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig, latent_to_embedding

ModelFn = Callable[..., jax.Array]


def static_clip(x0: jax.Array) -> jax.Array:
    """x0 clipped to the data range [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0: jax.Array, *, percentile: float = 0.995) -> jax.Array:
    """Imagen's dynamic thresholding: per example s = max(quantile(|x0|, percentile), 1), then
    clip to [-s, s] and divide by s (saturated pixels are pushed inwards, not piled at +-1).

    Args: x0 [b, ...]; percentile in (0, 1]. Returns: [b, ...] in [-1, 1].
    """
    _check_percentile(percentile)
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=-1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def _check_percentile(percentile: float) -> None:
    if not 0 < percentile <= 1:
        raise ValueError(f"the dynamic-threshold percentile must be in (0, 1], got {percentile}")


def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: jax.Array) -> jax.Array:
    """uncond + scale (cond - uncond), i.e. (1 + w) cond - w uncond with w = scale - 1."""
    return uncond + scale * (cond - uncond)


def guided(model_fn: ModelFn, scale: jax.Array | float) -> ModelFn:
    """``model_fn(x, t, conditional)`` -> ``fn(x, t)``, the guided prediction of one 2b batch
    (conditional rows first); channels beyond x's (learned variances) are the conditional ones."""

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        conditional = jnp.arange(2 * b) < b
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), conditional)
        cond, uncond = out[:b], out[b:]
        mixed = classifier_free_guidance(cond[..., :c], uncond[..., :c], scale)
        return jnp.concatenate([mixed, cond[..., c:]], axis=-1)

    return fn


def predict(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    dynamic_percentile: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One model call at step t -> (x0, eps, frac), float32.

    x0 is thresholded (dynamic, else static if ``clip_x0``) and eps then re-derived from it, as
    guided-diffusion does; frac [b, ...] is the learned variance (None unless "learned_range").
    """
    out = model_fn(x, diffusion.model_timesteps(t)).astype(jnp.float32)
    frac = None
    if variance == "learned_range":
        out, frac = jnp.split(out, 2, axis=-1)
    x0, eps = diffusion.split_prediction(out, x, t, prediction=prediction)
    if dynamic_percentile is not None:
        x0 = dynamic_threshold(x0, percentile=dynamic_percentile)
    elif clip_x0:
        x0 = static_clip(x0)
    if dynamic_percentile is not None or clip_x0:
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps, frac


def sample_ddpm(
    diffusion: Diffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    steps: int | None = None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    guidance_scale: float | None = None,
    clip_x0: bool = False,
    dynamic_percentile: float | None = None,
    initial_noise: jax.Array | None = None,
) -> jax.Array:
    """Ancestral sampling: x_T ~ N(0, I), then ``ddpm_step`` down to t = 0.

    Args:
      diffusion: the trained process (``steps`` respaces it).
      model_fn, guidance_scale, steps: see the module docstring.
      shape: (b, ...) of the samples.
      rng: key for x_T and each step's noise.
      prediction: what the model predicts: "eps", "x0" or "v".
      variance: "fixed_small", "fixed_large" or "learned_range" (see ``Diffusion.log_variance``).
      clip_x0: clip the x0 estimate to [-1, 1] (data in that range).
      dynamic_percentile: Imagen's dynamic thresholding at this percentile (instead of clipping).
      initial_noise: x_T [shape], default drawn from ``rng``.

    Returns:
      float32 [shape], the samples.
    """
    return _sample(
        "ddpm", diffusion, model_fn, shape, rng, steps=steps, eta=1.0, prediction=prediction,
        variance=variance, guidance_scale=guidance_scale, clip_x0=clip_x0,
        dynamic_percentile=dynamic_percentile, initial_noise=initial_noise,
    )  # fmt: skip


def sample_ddim(
    diffusion: Diffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    guidance_scale: float | None = None,
    clip_x0: bool = False,
    dynamic_percentile: float | None = None,
    initial_noise: jax.Array | None = None,
) -> jax.Array:
    """DDIM sampling: x_T ~ N(0, I), then ``ddim_step`` from each step to the previous one.

    ``eta`` >= 0: 0 is deterministic given x_T, 1 matches DDPM's posterior variance. ``variance``
    only says whether the model outputs variance channels ("learned_range"), which DDIM ignores.
    Other arguments and the result: as ``sample_ddpm``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _sample(
        "ddim", diffusion, model_fn, shape, rng, steps=steps, eta=float(eta),
        prediction=prediction, variance=variance, guidance_scale=guidance_scale, clip_x0=clip_x0,
        dynamic_percentile=dynamic_percentile, initial_noise=initial_noise,
    )  # fmt: skip


def _sample(method, diffusion, model_fn, shape, rng, *, steps, guidance_scale, **options):
    """Checks the options before tracing, respaces, and runs the jitted loop."""
    check_prediction(options["prediction"])
    if options["variance"] not in VARIANCES:
        raise ValueError(f"unknown variance {options['variance']!r}; use one of {VARIANCES}")
    if options["dynamic_percentile"] is not None:
        _check_percentile(options["dynamic_percentile"])
    shape = tuple(int(n) for n in shape)
    noise = options.pop("initial_noise")
    if noise is not None and noise.shape != shape:
        raise ValueError(f"initial_noise has shape {noise.shape}, the samples {shape}")
    if steps is not None:
        diffusion = diffusion.respace(spaced_timesteps(diffusion.num_timesteps, steps))
    if not isinstance(model_fn, jax.tree_util.Partial):
        model_fn = jax.tree_util.Partial(model_fn)
    scale = None if guidance_scale is None else jnp.float32(guidance_scale)
    return _sample_loop(
        diffusion, model_fn, rng, noise, scale, method=method, shape=shape, **options
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "diffusion", "method", "shape", "eta", "prediction", "variance", "clip_x0",
        "dynamic_percentile",
    ),
)  # fmt: skip
def _sample_loop(
    diffusion: Diffusion,
    model_fn: jax.tree_util.Partial,
    rng: jax.Array,
    noise: jax.Array | None,
    scale: jax.Array | None,
    *,
    method: str,
    shape: tuple[int, ...],
    eta: float,
    **options,
) -> jax.Array:
    fn = model_fn if scale is None else guided(model_fn, scale)
    steps = diffusion.num_timesteps
    x = jax.random.normal(jax.random.fold_in(rng, steps), shape) if noise is None else noise

    def step(x, t_now):
        t = jnp.full((shape[0],), t_now, jnp.int32)
        x0, eps, frac = predict(diffusion, fn, x, t, **options)
        z = jax.random.normal(jax.random.fold_in(rng, t_now), shape)
        if method == "ddpm":
            return diffusion.ddpm_step(x, t, x0, z, variance=options["variance"], frac=frac), None
        return diffusion.ddim_step(x, eps, t, t - 1, eta=eta, noise=z if eta else None, x0=x0), None

    x, _ = jax.lax.scan(step, x.astype(jnp.float32), jnp.arange(steps - 1, -1, -1))
    return x


Caption = tuple[jax.Array, jax.Array, jax.Array]  # CLIP text tokens, embedding, token mask


def with_empty_caption(
    caption: Caption, empty: Caption | None, conditional: jax.Array | None
) -> tuple[Caption, jax.Array | None]:
    """The unconditional rows (``conditional`` False) of a model without a learned null caption
    (Karlo's) get the empty caption's CLIP features ``empty`` (each [1, ...]), as its guidance
    does; returns the caption and the ``conditional`` left for the model (None once used)."""
    if empty is None or conditional is None:
        return caption, conditional
    rows = []
    for c, e in zip(caption, empty, strict=True):
        if c is None:  # no mask given: every token a caption token
            c = jnp.ones((conditional.shape[0], *e.shape[1:]), e.dtype)
        rows.append(jnp.where(conditional.reshape(-1, *[1] * (c.ndim - 1)), c, e))
    return tuple(rows), None


def _check_empty_caption(guidance_scale: float, empty: Caption | None, what: str) -> None:
    if guidance_scale != 1 and empty is None:
        raise ValueError(
            f"guidance_scale {guidance_scale}: this {what} has no learned null caption; give "
            "empty_caption, the empty caption's CLIP (text_tokens, text_embedding, text_mask)"
        )


@functools.cache
def _prior_fn(config: PriorConfig):
    """``fn(params, text_tokens, text_embedding, text_mask, empty, x, t, conditional=None)``; the
    conditioning is tiled to x's batch (guidance runs cond and uncond as one batch), ``empty``
    the empty caption (:func:`with_empty_caption`) or None. Cached per config so that the
    sampler's jit sees the same function and reuses its compilation."""
    model = Prior(config)

    def fn(params, text_tokens, text_embedding, text_mask, empty, x, t, conditional=None):
        reps = x.shape[0] // text_embedding.shape[0]

        def tile(a):
            return None if a is None else jnp.concatenate([a] * reps)

        caption = (tile(text_tokens), tile(text_embedding), tile(text_mask))
        (tokens, embedding, mask), conditional = with_empty_caption(caption, empty, conditional)
        return model.apply(
            {"params": params}, x, t, tokens, embedding, text_mask=mask, conditional=conditional
        )

    return fn


def check_guidance(guidance_scale: float, drop: float, name: str) -> None:
    """Guidance needs a model trained with conditioning dropout."""
    if guidance_scale != 1 and drop == 0:
        raise ValueError(
            f"guidance_scale {guidance_scale} needs a model trained with conditioning dropout, "
            f"but the config's {name} is 0; use guidance_scale=1"
        )


def sample_prior(
    model: Prior,
    params,
    diffusion: Diffusion,
    text_tokens: jax.Array,
    text_embedding: jax.Array,
    rng: jax.Array,
    *,
    text_mask: jax.Array | None = None,
    steps: int | None = 64,
    guidance_scale: float = 1.0,
    candidates: int = 2,
    eta: float = 0.0,
    empty_caption: Caption | None = None,
) -> jax.Array:
    """CLIP image embeddings for captions: ``candidates`` DDIM samples per caption, the one with
    the highest dot product with its text embedding kept (paper: 2 candidates, 64 steps).

    Args:
      model, params: the trained prior.
      diffusion: the process it was trained on (``steps`` respaces it; None runs it whole).
      text_tokens [b, text_len, text_width], text_embedding [b, embed_dim], text_mask [b,
        text_len]: as ``Prior``.
      rng: key of the samples.
      guidance_scale: classifier-free guidance (1: the conditional model).
      candidates: samples drawn per caption.
      eta: DDIM's noise (0: deterministic given x_T).
      empty_caption: for a prior without a learned null caption (``null_caption`` False,
        Karlo), the empty caption's CLIP features [1, ...], guidance's unconditional branch.

    Returns:
      float32 [b, embed_dim]: the chosen embeddings, unscaled (divided by ``scale``, or
      unstandardised with ``clip_stats``), not renormalised.
    """
    cfg = model.config
    if cfg.null_caption:
        check_guidance(guidance_scale, cfg.text_drop, "text_drop")
    else:
        _check_empty_caption(guidance_scale, empty_caption, "prior")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    b = text_embedding.shape[0]

    def tile(a):
        return None if a is None else jnp.concatenate([a] * candidates)

    fn = jax.tree_util.Partial(
        _prior_fn(cfg), params, tile(text_tokens), tile(text_embedding), tile(text_mask),
        None if cfg.null_caption else empty_caption,
    )  # fmt: skip
    x = sample_ddim(
        diffusion, fn, (candidates * b, cfg.embed_dim), rng, steps=steps, eta=eta,
        prediction="x0", guidance_scale=None if guidance_scale == 1 else guidance_scale,
    )  # fmt: skip
    x = latent_to_embedding(cfg, params, x.reshape(candidates, b, cfg.embed_dim))
    score = jnp.einsum("cbd,bd->cb", x, text_embedding.astype(jnp.float32))
    return jnp.take_along_axis(x, jnp.argmax(score, axis=0)[None, :, None], axis=0)[0]


@functools.cache
def _decoder_fn(config: DecoderConfig):
    """``fn(params, image_embedding, text, caption, empty, x, t, conditional=None)``, the
    conditioning tiled to x's batch (``caption``: CLIP's, for a decoder with
    ``clip_text_width``; ``empty``: :func:`with_empty_caption`'s); cached per config so the
    sampler's compilation is reused."""
    model = Decoder(config)

    def fn(params, image_embedding, text, caption, empty, x, t, conditional=None):
        reps = x.shape[0] // image_embedding.shape[0]

        def tile(a):
            return None if a is None else jnp.concatenate([a] * reps)

        features = {}
        if caption is not None:  # the null image embedding still follows conditional
            caption, _ = with_empty_caption(tuple(map(tile, caption)), empty, conditional)
            names = ("text_tokens", "text_embedding", "text_mask")
            features = dict(zip(names, caption, strict=True))
        return model.apply(
            {"params": params}, x, t, tile(image_embedding), tile(text), **features,
            conditional=conditional,
        )  # fmt: skip

    return fn


def sample_decoder(
    model: Decoder,
    params,
    diffusion: Diffusion,
    image_embedding: jax.Array,
    rng: jax.Array,
    *,
    text: jax.Array | None = None,
    caption: Caption | None = None,
    empty_caption: Caption | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    method: str = "ddpm",
    eta: float = 0.0,
) -> jax.Array:
    """Images for CLIP image embeddings [b, clip_dim] (and captions int [b, <= text_len], or
    for a decoder with ``clip_text_width`` (Karlo) ``caption``: CLIP's text_tokens, text_embedding
    and text_mask [b, ...], with ``empty_caption`` [1, ...] the unconditional branch of guidance):
    ancestral DDPM ("ddpm") or DDIM ("ddim", with ``eta``) over ``steps`` strided steps (None:
    the whole process), x0 clipped to [-1, 1], classifier-free guidance at ``guidance_scale``.

    Returns: float32 [b, image_size, image_size, in_channels] in [-1, 1].
    """
    cfg = model.config
    # The unconditional half drops both, which training saw only if both were dropped.
    for name in ("image_drop", "text_drop") if cfg.text_layers else ("image_drop",):
        check_guidance(guidance_scale, getattr(cfg, name), name)
    if cfg.clip_text_width:
        _check_empty_caption(guidance_scale, empty_caption, "decoder")
    if cfg.text_layers and text is None:
        raise ValueError(
            f"this decoder reads captions ({cfg.text_layers} text layers): give text "
            f"int [batch, <= {cfg.text_len}]"
        )
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown method {method!r}; use 'ddpm' or 'ddim'")
    fn = jax.tree_util.Partial(
        _decoder_fn(cfg), params, image_embedding, text, caption, empty_caption
    )
    shape = (image_embedding.shape[0], cfg.image_size, cfg.image_size, cfg.in_channels)
    options = dict(
        steps=steps,
        prediction=cfg.prediction,
        variance=cfg.variance,
        guidance_scale=None if guidance_scale == 1 else guidance_scale,
        clip_x0=True,
    )
    if method == "ddim":
        return sample_ddim(diffusion, fn, shape, rng, eta=eta, **options)
    return sample_ddpm(diffusion, fn, shape, rng, **options)
