"""Multi-head attention with a dense path and a KV-cache decode path.

Masks are boolean (True = may attend) and come in two kinds that combine with a logical AND:
- a *mask builder* ``mask_fn(q_pos, k_pos) -> bool [q, k]``, a module attribute for the structure
  that depends only on positions (causal, DALL-E's sparse patterns); in decode mode it is evaluated
  at the cache positions, so one definition serves training and sampling;
- a data-dependent ``mask`` array broadcastable to ``[b, heads, q, k]`` (padding), a call argument.

An ``attention_fn(q, k, v)`` may replace the dense computation on the non-decode path: a kernel
that skips what ``mask_fn`` masks (``jaxaigc.nn.sparse``). Several mask builders (and matching
kernels) may be given as alternatives, one chosen per call by an index: DALL-E's per-layer masks
inside one scanned block.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.layers import linear, partitioned

MaskFn = Callable[[jax.Array, jax.Array], jax.Array]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def choose(fns: tuple[Callable, ...], index: int | jax.Array, *args):
    """``fns[index](*args)``: a Python index picks at trace time, a traced one (a scanned layer's
    pattern) through ``lax.switch``, which compiles every alternative once."""
    if len(fns) == 1 or isinstance(index, int):
        return fns[0 if len(fns) == 1 else index](*args)
    return jax.lax.switch(index, fns, *args)


def _as_tuple(fns) -> tuple:
    return () if fns is None else tuple(fns) if isinstance(fns, (tuple, list)) else (fns,)


def decode_positions(module: nn.Module, length: int, decode: bool) -> jax.Array:
    """Positions int [length] of a call's tokens: ``0..length - 1``, or in decode mode the next
    ones after the tokens already cached (a ``cache/position`` counter of ``module``; the call
    that creates the cache only sizes it)."""
    positions = jnp.arange(length)
    if decode:
        initialized = module.has_variable("cache", "position")
        offset = module.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        if initialized:
            positions = positions + offset.value
            offset.value = offset.value + length
    return positions


def causal_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Each query attends to keys at its own position or earlier. Returns bool [q, k]."""
    return k_pos[None, :] <= q_pos[:, None]


def single_query_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """``jax.nn.dot_product_attention`` for one query position (q [b, 1, h, d]; mask broadcastable
    to [b, h, 1, k]) as matrix-vector products over the query axis squeezed away. The general
    form's gradient contracts over that length-1 axis, and XLA:CPU's YNNPACK dot fusions abort on
    it in bfloat16 (a reshape the fusion emitter requires to be a bitcast)."""
    logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k, preferred_element_type=jnp.float32)
    logits = logits * q.shape[-1] ** -0.5
    if mask is not None:
        logits = jnp.where(mask[..., 0, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits).astype(v.dtype)
    return jnp.einsum("bhk,bkhd->bhd", probs, v)[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


class HeadsDense(nn.Module):
    """Projection into heads (``[b, t, d] -> [b, t, h, k]``, kernel ``[embed, heads, kv]``) or
    out of them (``[b, t, h, k] -> [b, t, d]``, kernel ``[heads, kv, embed]``).

    Explicit parameters rather than ``nn.DenseGeneral``, whose flattened-kernel init trips over
    multi-axis logical constraints under a mesh.
    """

    features: tuple[int, ...]
    direction: str  # "in" or "out"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    init_scale: float = 1.0  # multiplies the LeCun-normal standard deviation of the kernel

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.direction == "in":
            shape, axes, n_in = (x.shape[-1], *self.features), ("embed", "heads", "kv"), 1
            in_axis, out_axis, spec = 0, (1, 2), "btd,dhk->bthk"
        else:
            shape, axes, n_in = (*x.shape[-2:], *self.features), ("heads", "kv", "embed"), 2
            in_axis, out_axis, spec = (0, 1), 2, "bthk,hkd->btd"
        init = nn.initializers.variance_scaling(
            self.init_scale**2, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
        )
        kernel = self.param("kernel", partitioned(init, axes), shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        # The out projection writes into the residual stream: see ``linear``.
        y = jnp.einsum(spec, x, kernel) if self.direction == "in" else linear(x, kernel, n_in)
        if self.use_bias:
            bias_axes = axes[n_in:]
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, bias_axes), shape[n_in:], jnp.float32
            )
            y = y + bias.astype(self.dtype)
        return y


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with separate q/k/v projections.

    Parameters: query/key/value kernels ``[embed, heads, kv]``, out kernel ``[heads, kv, embed]``;
    biases on query, value and out (a key bias would not change the output: see below).
    ``out_features`` (default: the input width) sizes the output, e.g. CLIP's attention pooling;
    ``out_init_scale`` scales the out kernel's initial standard deviation.
    With ``decode=True`` keys and values are written to a ``cache`` collection sized by the input
    given to ``init``; each call then appends its tokens at the cache index (prefill or one step).

    ``attention_fn(q, k, v) -> out`` ([b, t, h, k] each) replaces ``dot_product_attention`` with the
    mask of ``mask_fn`` on the non-decode path and must compute the same function; it takes no
    ``mask`` argument. The decode path always evaluates ``mask_fn`` at the cache positions.
    ``mask_fn`` and ``attention_fn`` may be tuples of alternatives (``attention_fn[i]`` matching
    ``mask_fn[i]``), chosen by the call's ``pattern`` index.
    """

    num_heads: int
    mask_fn: MaskFn | tuple[MaskFn, ...] | None = None
    attention_fn: AttentionFn | tuple[AttentionFn, ...] | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False
    dtype: jnp.dtype = jnp.float32
    out_features: int | None = None
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        pattern: int | jax.Array = 0,
    ) -> jax.Array:
        """Args: x [b, q, d]; context [b, k, d] for cross-attention (default x); mask as above;
        pattern: which of several ``mask_fn`` / ``attention_fn`` alternatives (int, maybe traced).
        """
        mask_fns, attention_fns = _as_tuple(self.mask_fn), _as_tuple(self.attention_fn)
        if attention_fns and len(attention_fns) != len(mask_fns):
            raise ValueError(
                f"{len(attention_fns)} attention_fn alternatives for {len(mask_fns)} mask_fn"
            )
        use_kernel = bool(attention_fns) and not self.decode
        if use_kernel and mask is not None:
            raise ValueError("an attention_fn takes no data-dependent mask; pass mask=None")
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        context = x if context is None else context

        def projection(name: str, inputs: jax.Array, use_bias: bool) -> jax.Array:
            return HeadsDense((self.num_heads, head_dim), "in", use_bias, self.dtype, name=name)(
                inputs
            )

        # No key bias: it adds q.b to every score of a query, which softmax ignores. Its gradient
        # is zero up to rounding, which Adam would amplify into random drift.
        q = projection("query", x, self.use_bias)  # (b, q, h, k)
        k = projection("key", context, False)
        v = projection("value", context, self.use_bias)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

        q_len, k_len = q.shape[1], k.shape[1]
        q_pos, k_pos = jnp.arange(q_len), jnp.arange(k_len)
        if self.decode:
            k, v, q_pos, k_pos, filled = self._update_cache(k, v)
            mask = combine_masks(mask, filled[None, None, None, :])
        if mask_fns and not use_kernel:
            mask = combine_masks(mask, choose(mask_fns, pattern, q_pos, k_pos)[None, None])

        if use_kernel:
            out = choose(attention_fns, pattern, q, k, v)
        elif q_len == 1:
            out = single_query_attention(q, k, v, mask)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # (b, q, h, k)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = HeadsDense(
            (self.out_features or width,),
            "out",
            self.use_bias,
            self.dtype,
            self.out_init_scale,
            name="out",
        )(out)
        return nn.Dropout(self.dropout_rate)(out, deterministic=self.deterministic)

    def _update_cache(self, k: jax.Array, v: jax.Array):
        """Writes k, v at the cache index; returns full caches, positions and the filled mask."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        max_len = cached_key.value.shape[1]
        if not initialized:  # init: the input only sizes the cache
            return k, v, jnp.arange(k.shape[1]), jnp.arange(max_len), jnp.ones(max_len, bool)
        step = k.shape[1]
        start = index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
        index.value = start + step
        k_pos = jnp.arange(max_len)
        return (
            cached_key.value,
            cached_value.value,
            start + jnp.arange(step),
            k_pos,
            k_pos < start + step,
        )
