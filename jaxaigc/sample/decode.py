"""Autoregressive sampling with the KV cache, for :class:`~jaxaigc.models.gpt.GPT` and the DALL-E
transformer (:class:`~jaxaigc.models.dalle.DALLE`).

One call prefills the cache with the whole prompt, then a ``lax.scan`` feeds back one token per
step; both run in a single ``jax.jit``, so each step costs one token's attention over the cache
instead of a pass over the whole sequence. Tokens are drawn from ``softmax(logits / temperature)``
restricted to the ``top_k`` most likely and to the smallest set holding ``top_p`` of the mass
(nucleus sampling); temperature 0 takes the argmax.

For RLHF rollouts (:func:`generate`): prompts of different lengths are left-padded and passed with
their ``valid`` flags (positions count real tokens only, pads are masked); a row stops at
``eos_id`` (later tokens are ``pad_id`` and masked, and the loop ends once every row has stopped);
each drawn token comes with its log-probability under ``softmax(logits / temperature)``, the
quantity PPO recomputes; with one key per row, a row's tokens do not depend on the other rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

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


def _fold_in(rng: jax.Array, i: int | jax.Array) -> jax.Array:
    """``fold_in`` of one key, or of each of a batch of row keys [b]."""
    if rng.ndim == 0:
        return jax.random.fold_in(rng, i)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, i)


def choose_tokens(
    logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """logits [b, vocab] -> tokens int32 [b]. ``key``: one key, or one per row [b] (a row's draw
    then depends only on its key); unused when greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    if key.ndim == 0:
        return jax.random.categorical(key, logits).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log softmax(logits / temperature) [..., vocab] at ``tokens`` [...]; temperature 0 (greedy)
    scores with the logits as they are. top-k / top-p do not enter: PPO's ratio compares this
    quantity under the old and the new policy."""
    scaled = logits.astype(jnp.float32) / (temperature or 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(scaled), tokens[..., None], -1)[..., 0]


class Samples(NamedTuple):
    """Drawn continuations, each [b, steps]."""

    tokens: jax.Array  # int32; pad_id after a row's EOS
    logprobs: jax.Array  # float32, :func:`token_logprobs` of each token; 0 where not drawn
    mask: jax.Array  # bool; True for drawn tokens, up to and including a row's EOS


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
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Samples:
    """Draws ``steps`` tokens, the first from ``logits`` [b, vocab] (the prefill's last position),
    each later one from ``forward`` of the previous. Step ``i`` draws with ``fold_in(rng, i)``
    (``rng``: one key, or one per row [b]). A row that draws ``eos_id`` stops: its later tokens
    are ``pad_id`` and masked, and the loop ends when every row has stopped. Call it inside a jit.
    """
    choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    batch = logits.shape[0]

    def draw(logits, i, done, samples):
        token = jnp.where(done, pad_id, choose(logits, _fold_in(rng, i)))  # (b,)
        logprob = jnp.where(done, 0.0, token_logprobs(logits, token, temperature))
        samples = Samples(
            samples.tokens.at[:, i].set(token),
            samples.logprobs.at[:, i].set(logprob),
            samples.mask.at[:, i].set(~done),
        )
        if eos_id is not None:
            done = done | (token == eos_id)
        return token, done, samples

    empty = Samples(
        jnp.full((batch, steps), pad_id, jnp.int32),
        jnp.zeros((batch, steps), jnp.float32),
        jnp.zeros((batch, steps), bool),
    )
    token, done, samples = draw(logits, 0, jnp.zeros(batch, bool), empty)

    if eos_id is None:  # every row draws every token: a loop of known trip count (XLA counts it)

        def body(i, carry):
            cache, token, done, samples = carry
            cache, logits = forward(cache, token[:, None])
            return cache, *draw(logits, i, done, samples)

        return jax.lax.fori_loop(1, steps, body, (cache, token, done, samples))[-1]

    def more(carry):
        i, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    def step(carry):
        i, cache, token, done, samples = carry
        cache, logits = forward(cache, token[:, None])
        token, done, samples = draw(logits, i, done, samples)
        return i + 1, cache, token, done, samples

    carry = (jnp.ones((), jnp.int32), cache, token, done, samples)
    return jax.lax.while_loop(more, step, carry)[-1]


def _empty_cache(model, *example) -> dict:
    """Zeros shaped like the model's cache for full-length ``example`` inputs (only shapes are
    traced; every cache entry starts at 0)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(
    model_config: GPTConfig,
    params,
    prompt: jax.Array,
    *,
    steps: int,
    rng: jax.Array,
    valid: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Samples:
    """Continues each prompt of a GPT by at most ``steps`` tokens (works inside a jit too).

    Args:
      model_config: the model's config (``decode`` is switched on here).
      params: the model's ``params`` collection.
      prompt: int32 [b, p], p >= 1, left-padded when prompts differ in length; prompt plus
        completion must fit in ``context_length``.
      steps: the most tokens to draw.
      rng: one key, or one per row [b]; step ``i`` draws with ``fold_in(rng, i)`` (unused when
        greedy). With row keys a row's draws do not depend on the other rows.
      valid: bool [b, p], True at real prompt tokens (at least one per row); default all.
      temperature, top_k, top_p: see the module docstring.
      eos_id: a row stops after drawing it; None draws ``steps`` tokens for every row.
      pad_id: the token written after a row's EOS.

    Returns:
      :class:`Samples` [b, steps]: tokens, their log-probabilities and the mask.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1], got shape {prompt.shape}")
    if valid is not None and valid.shape != prompt.shape:
        raise ValueError(f"valid has shape {valid.shape}; the prompt has {prompt.shape}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if prompt.shape[1] + steps > model_config.context_length:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + steps {steps} exceeds the context length "
            f"{model_config.context_length}"
        )
    if rng.ndim not in (0, 1) or rng.ndim == 1 and rng.shape[0] != prompt.shape[0]:
        raise ValueError(f"rng must be one key or one per row ({prompt.shape[0]}); got {rng.shape}")
    for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
        if token is not None and not 0 <= token < model_config.vocab_size:
            raise ValueError(
                f"{name} {token} is outside the vocabulary of {model_config.vocab_size}"
            )
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    valid = jnp.ones(prompt.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return _sample_gpt(
        model_config.replace(decode=True),
        params,
        prompt,
        valid,
        rng,
        steps=steps,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_id=None if eos_id is None else int(eos_id),
        pad_id=int(pad_id),
    )


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
    """int32 [b, steps]: :func:`generate`'s tokens for unpadded prompts, no EOS, greedy by
    default."""
    return generate(
        model_config,
        params,
        prompt,
        steps=steps,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    ).tokens


# No donation: the cache is created and consumed inside this one compiled function, so XLA updates
# it in place already; there is no input buffer to hand over.
@functools.partial(
    jax.jit,
    static_argnames=("config", "steps", "temperature", "top_k", "top_p", "eos_id", "pad_id"),
)
def _sample_gpt(
    config: GPTConfig,
    params,
    prompt,
    valid,
    rng,
    *,
    steps,
    temperature,
    top_k,
    top_p,
    eos_id,
    pad_id,
):
    model = GPT(config)
    # A cache of the prompt and the steps only: each step's attention reads every cached slot,
    # and a context-length cache (GPT-2: 1,024 slots) would be read in full at every token.
    full = jax.ShapeDtypeStruct((prompt.shape[0], prompt.shape[1] + steps), jnp.int32)
    cache = _empty_cache(model, full)

    def forward(cache, tokens, valid=None):
        """tokens [b, t] -> (cache with t more positions, last logits [b, vocab])."""
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, valid=valid, mutable=["cache"]
        )
        return variables["cache"], logits[:, -1]

    cache, logits = forward(cache, prompt, valid)  # prefill: p positions in one call
    return decode_loop(
        forward,
        cache,
        logits,
        rng,
        steps=steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        pad_id=pad_id,
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
    ).tokens
