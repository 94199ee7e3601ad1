"""Autoregressive sampling from :class:`~jaxaigc.models.gpt.GPT` with the KV cache.

One call prefills the cache with the whole prompt, then a ``lax.scan`` feeds back one token per
step; both run in a single ``jax.jit``, so each step costs one token's attention over the cache
instead of a pass over the whole sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxaigc.models.gpt import GPT, GPTConfig


def sample(
    model_config: GPTConfig,
    params,
    prompt: jax.Array,
    *,
    steps: int,
    rng: jax.Array,
    temperature: float = 0.0,
) -> jax.Array:
    """Continues each prompt by ``steps`` tokens.

    Args:
      model_config: the model's config (``decode`` is switched on here).
      params: the model's ``params`` collection.
      prompt: int32 [b, p], p >= 1; prompt plus completion must fit in ``context_length``.
      steps: number of tokens to generate.
      rng: key; step ``i`` draws with ``fold_in(rng, i)`` (unused when greedy).
      temperature: 0 takes the argmax; otherwise draws from ``softmax(logits / temperature)``.

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
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return _sample(
        model_config.replace(decode=True),
        params,
        prompt,
        rng,
        steps=steps,
        temperature=float(temperature),
    )


# No donation: the cache is created and consumed inside this one compiled function, so XLA updates
# it in place already; there is no input buffer to hand over.
@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature"))
def _sample(
    config: GPTConfig,
    params,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    steps: int,
    temperature: float,
) -> jax.Array:
    model = GPT(config)
    batch = prompt.shape[0]
    # A full-length input sizes the cache; only shapes are traced (every cache entry starts at 0).
    full = jax.ShapeDtypeStruct((batch, config.context_length), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), full)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def forward(cache, tokens: jax.Array):
        """tokens [b, t] -> (cache with t more positions, last logits [b, vocab])."""
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, mutable=["cache"]
        )
        return variables["cache"], logits[:, -1]

    def choose(logits: jax.Array, i: jax.Array) -> jax.Array:
        """logits [b, vocab] -> tokens int32 [b]."""
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        key = jax.random.fold_in(rng, i)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    cache, logits = forward(cache, prompt)  # prefill: p positions in one call
    first = choose(logits, 0)  # (b,)

    def step(carry, i):
        cache, token = carry
        cache, logits = forward(cache, token[:, None])
        token = choose(logits, i)
        return (cache, token), token

    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(1, steps))  # rest: (steps - 1, b)
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # (b, steps)
