"""Autoregressive sampling with the KV cache, for :class:`~jaxaigc.models.gpt.GPT` and the DALL-E
transformer (:class:`~jaxaigc.models.dalle.DALLE`).

One call prefills the cache with the whole prompt, then a ``lax.scan`` feeds back one token per
step; both run in a single ``jax.jit``, so each step costs one token's attention over the cache
instead of a pass over the whole sequence. Tokens are drawn from ``softmax(logits / temperature)``
restricted to the ``top_k`` most likely and to the smallest set holding ``top_p`` of the mass
(nucleus sampling); temperature 0 takes the argmax.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.gpt import GPT, GPTConfig

# forward(cache, tokens [b, 1]) -> (cache, logits [b, vocab]) of the position after the tokens.
Forward = Callable[[dict, jax.Array], tuple[dict, jax.Array]]


def check_sampling(*, temperature: float, top_k: int, top_p: float) -> None:
    """Raises ``ValueError`` naming the bad value (before anything is compiled)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., vocab] with every token outside the top ``top_k`` (0: no limit) and outside
    the nucleus of probability ``top_p`` set to -inf. The most likely token is always kept."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token if the mass strictly before it is below top_p; its logit is the threshold.
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def choose_tokens(
    logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """logits [b, vocab] -> tokens int32 [b]; ``key`` is unused when greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def decode_loop(
    forward: Forward,
    cache: dict,
    logits: jax.Array,
    rng: jax.Array,
    *,
    steps: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> jax.Array:
    """Draws ``steps`` tokens, the first from ``logits`` [b, vocab] (the prefill's last position),
    each later one from ``forward`` of the previous. Step ``i`` draws with ``fold_in(rng, i)``.
    Returns int32 [b, steps]. Call it inside a jit."""
    choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    first = choose(logits, jax.random.fold_in(rng, 0))  # (b,)

    def step(carry, i):
        cache, token = carry
        cache, logits = forward(cache, token[:, None])
        token = choose(logits, jax.random.fold_in(rng, i))
        return (cache, token), token

    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(1, steps))  # rest: (steps - 1, b)
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # (b, steps)


def _empty_cache(model, *example) -> dict:
    """Zeros shaped like the model's cache for full-length ``example`` inputs (only shapes are
    traced; every cache entry starts at 0)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample(
    model_config: GPTConfig,
    params,
    prompt: jax.Array,
    *,
    steps: int,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Continues each prompt of a GPT by ``steps`` tokens.

    Args:
      model_config: the model's config (``decode`` is switched on here).
      params: the model's ``params`` collection.
      prompt: int32 [b, p], p >= 1; prompt plus completion must fit in ``context_length``.
      steps: number of tokens to generate.
      rng: key; step ``i`` draws with ``fold_in(rng, i)`` (unused when greedy).
      temperature, top_k, top_p: see the module docstring.

    Returns:
      int32 [b, steps], the generated tokens (the prompt not included).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1], got shape {prompt.shape}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if prompt.shape[1] + steps > model_config.context_length:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + steps {steps} exceeds the context length "
            f"{model_config.context_length}"
        )
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample_gpt(
        model_config.replace(decode=True),
        params,
        prompt,
        rng,
        steps=steps,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )


# No donation: the cache is created and consumed inside this one compiled function, so XLA updates
# it in place already; there is no input buffer to hand over.
@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature", "top_k", "top_p"))
def _sample_gpt(config: GPTConfig, params, prompt, rng, *, steps, temperature, top_k, top_p):
    model = GPT(config)
    full = jax.ShapeDtypeStruct((prompt.shape[0], config.context_length), jnp.int32)
    cache = _empty_cache(model, full)

    def forward(cache, tokens):
        """tokens [b, t] -> (cache with t more positions, last logits [b, vocab])."""
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, mutable=["cache"]
        )
        return variables["cache"], logits[:, -1]

    cache, logits = forward(cache, prompt)  # prefill: p positions in one call
    return decode_loop(
        forward,
        cache,
        logits,
        rng,
        steps=steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


def sample_image_tokens(
    model_config: DALLEConfig,
    params,
    text: jax.Array,
    *,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Draws the ``image_side**2`` image tokens of a DALL-E transformer for each caption.

    Args:
      model_config: the model's config (``decode`` is switched on here; the attention path does
        not matter: decoding evaluates each layer's mask at the cache positions).
      params: the model's ``params``.
      text: int [b, <= text_len] caption tokens (repeat a caption for several candidates: rows
        draw independently).
      rng: key; image token ``i`` is drawn with ``fold_in(rng, i)``.
      temperature, top_k, top_p: see the module docstring.

    Returns:
      int32 [b, image_side**2] in raster order.
    """
    text = jnp.asarray(text, jnp.int32)
    if text.ndim != 2 or text.shape[1] > model_config.text_len:
        raise ValueError(
            f"caption tokens must be [batch, <= text_len = {model_config.text_len}], got shape "
            f"{text.shape}"
        )
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample_dalle(
        model_config.replace(decode=True, attention="dense"),
        params,
        text,
        rng,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )


@functools.partial(jax.jit, static_argnames=("config", "temperature", "top_k", "top_p"))
def _sample_dalle(config: DALLEConfig, params, text, rng, *, temperature, top_k, top_p):
    model = DALLE(config)
    batch = text.shape[0]
    full_text = jax.ShapeDtypeStruct((batch, config.text_len), jnp.int32)
    full_image = jax.ShapeDtypeStruct((batch, config.image_len), jnp.int32)
    cache = _empty_cache(model, full_text, full_image)

    def apply(cache, text, image):
        (_, image_logits), variables = model.apply(
            {"params": params, "cache": cache}, text, image, mutable=["cache"]
        )
        return variables["cache"], image_logits[:, -1]

    # Prefill: the caption and an empty image; its last logits predict image token 0.
    cache, logits = apply(cache, text, jnp.zeros((batch, 0), jnp.int32))
    return decode_loop(
        lambda cache, tokens: apply(cache, None, tokens),
        cache,
        logits,
        rng,
        steps=config.image_len,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
