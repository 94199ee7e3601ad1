"""Multi-head attention with a dense path and a KV-cache decode path.

Masks are boolean (True = may attend) and come in two kinds that combine with a logical AND:
- a *mask builder* ``mask_fn(q_pos, k_pos) -> bool [q, k]``, a module attribute for the structure
  that depends only on positions (causal, DALL-E's sparse patterns); in decode mode it is evaluated
  at the cache positions, so one definition serves training and sampling;
- a data-dependent ``mask`` array broadcastable to ``[b, heads, q, k]`` (padding), a call argument.

Padding may also be given as lengths (:class:`SeqLengths`): the form cuDNN's fused attention
takes. An ``attention_fn(q, k, v)`` may replace the dense computation on the non-decode path: a
kernel that skips what ``mask_fn`` masks (``jaxaigc.nn.sparse``). Several mask builders (and
matching kernels) may be given as alternatives, one chosen per call by an index: DALL-E's
per-layer masks inside one scanned block.

:func:`select_attention` picks ``jax.nn.dot_product_attention``'s implementation: cuDNN's flash
attention on a CUDA GPU when the mask is causal and / or lengths and the dtype half precision,
XLA's otherwise (CPU, TPU, an arbitrary mask, float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.layers import linear, partitioned

MaskFn = Callable[[jax.Array, jax.Array], jax.Array]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# cuDNN's flash attention takes half-precision inputs and head sizes that are multiples of 8, up
# to 128 before Hopper and 256 from it (jax._src.cudnn.fused_attention_stablehlo); 128 is the
# bound every CUDA GPU that runs it accepts.
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128


class SeqLengths(NamedTuple):
    """Right padding as lengths, the form cuDNN takes: row i's first ``query[i]`` queries and
    ``key[i]`` keys are real (int32 [b] each; None: all). Padded queries' outputs are zeros."""

    query: jax.Array | None = None
    key: jax.Array | None = None

    def as_mask(self, q_len: int, k_len: int) -> jax.Array:
        """The same padding as a bool mask [b, 1, q, k] (True = may attend)."""
        lengths = [x for x in (self.query, self.key) if x is not None]
        if not lengths:
            raise ValueError("SeqLengths needs query or key lengths")
        ones = jnp.ones((lengths[0].shape[0], 1), bool)
        real_q = ones if self.query is None else jnp.arange(q_len) < self.query[:, None]
        real_k = ones if self.key is None else jnp.arange(k_len) < self.key[:, None]
        return (real_q[:, :, None] & real_k[:, None, :])[:, None]


def check_attention_impl(impl: str) -> None:
    """Raises ValueError naming ``impl`` unless it is in ``ATTENTION_IMPLS``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; known: {ATTENTION_IMPLS}")


def cudnn_refusal(
    *, platform: str, dtype, head_dim: int, q_len: int, k_len: int, causal: bool, masked: bool
) -> str | None:
    """Why cuDNN's fused attention cannot compute this attention, or None if it can.

    ``platform``: ``jax.default_backend()``; ``masked``: an arbitrary bool mask is given (cuDNN
    would take it only as a materialised [b, h, q, k] bias, losing what it skips).
    """
    if platform not in ("gpu", "cuda"):
        return f"cuDNN runs on a CUDA GPU, not on {platform!r}"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"head size {head_dim} is not a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}"
    if masked:
        return "the mask is neither causal nor lengths"
    if causal and q_len != k_len:
        return f"a causal mask over {q_len} queries and {k_len} keys is not square"
    return None


def select_attention(impl: str, **case) -> str:
    """``"xla"`` or ``"cudnn"``: the implementation of ``jax.nn.dot_product_attention`` for
    ``impl`` (one of ``ATTENTION_IMPLS``) and the attention ``case`` (the keywords of
    :func:`cudnn_refusal`). ``"auto"`` takes cuDNN where it can; ``"cudnn"`` where it cannot
    raises ValueError saying why."""
    check_attention_impl(impl)
    if impl == "xla":
        return "xla"
    refusal = cudnn_refusal(**case)
    if refusal is None:
        return "cudnn"
    if impl == "cudnn":
        raise ValueError(f"attention_impl 'cudnn' cannot compute this attention: {refusal}")
    return "xla"


@jax.custom_vjp
def _half_precision_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scores float32 [b, h, q, k] of half-precision q [b, q, h, d], k [b, k, h, d]. The backward
    pass casts the scores' gradient to q's dtype first: differentiated as it is, a float32
    gradient meets half-precision operands and both of its matmuls run in float32."""
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def _half_precision_scores_forward(q, k):
    return _half_precision_scores(q, k), (q, k)


def _half_precision_scores_backward(residuals, d_scores):
    q, k = residuals
    d_scores = d_scores.astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", d_scores, k), jnp.einsum("bhqk,bqhd->bkhd", d_scores, q)


_half_precision_scores.defvjp(_half_precision_scores_forward, _half_precision_scores_backward)


def _half_precision_attention(q, k, v, mask, causal: bool, lengths: SeqLengths) -> jax.Array:
    """XLA's attention as ``jax.nn.dot_product_attention`` computes it (float32 scores and
    softmax, probabilities cast to v's dtype), with every matmul of the backward pass in q's
    dtype (:func:`_half_precision_scores`)."""
    q_len, k_len = q.shape[1], k.shape[1]
    scores = _half_precision_scores(q, k) * jnp.float32(q.shape[-1] ** -0.5)
    keep = combine_masks(
        mask,
        causal_mask(jnp.arange(q_len), jnp.arange(k_len))[None, None] if causal else None,
        None if lengths.query is None and lengths.key is None else lengths.as_mask(q_len, k_len),
    )
    if keep is not None:
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if lengths.query is not None:  # padded queries give zeros, as with cuDNN
        out = jnp.where((jnp.arange(q_len) < lengths.query[:, None])[:, :, None, None], out, 0)
    return out


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    lengths: SeqLengths | None = None,
    impl: str = "auto",
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the implementation :func:`select_attention` picks;
    XLA's in half precision as :func:`_half_precision_attention`.

    On a GPU host ``"auto"`` stages the choice out (``lax.platform_dependent``): cuDNN where the
    program is lowered for CUDA, XLA where it is lowered for the CPU (a FLOP count on abstract CPU
    arguments). Both branches are traced; where a scan saves residuals (no full remat) it saves
    slots for the larger branch's.

    Args: q [b, q, h, d], k and v [b, k, h, d]; ``mask`` bool broadcastable to [b, h, q, k];
    ``causal``: keys at or before each query's position; ``lengths`` as :class:`SeqLengths`; the
    three combine with a logical AND. Returns [b, q, h, d].
    """
    case = dict(
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=q.shape[1],
        k_len=k.shape[1],
        causal=causal,
        masked=mask is not None,
    )
    lengths = SeqLengths(*(None if x is None else jnp.asarray(x, jnp.int32) for x in lengths or ()))

    def attend(implementation: str):
        return lambda q, k, v: _attend(q, k, v, mask, causal, lengths, implementation)

    platform = jax.default_backend()
    if impl == "auto" and platform == "gpu" and cudnn_refusal(platform="gpu", **case) is None:
        return jax.lax.platform_dependent(q, k, v, cuda=attend("cudnn"), default=attend("xla"))
    return attend(select_attention(impl, platform=platform, **case))(q, k, v)


def _attend(q, k, v, mask, causal: bool, lengths: SeqLengths, implementation: str) -> jax.Array:
    if implementation == "xla" and jnp.dtype(q.dtype) in _CUDNN_DTYPES:
        return _half_precision_attention(q, k, v, mask, causal, lengths)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=causal,
        query_seq_lengths=lengths.query,
        key_value_seq_lengths=lengths.key,
        implementation=implementation,
    )


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

    ``attention_impl`` (one of ``ATTENTION_IMPLS``) chooses the dense path's implementation
    (:func:`select_attention`): a ``mask_fn`` that is :func:`causal_mask` goes as ``is_causal``
    and a :class:`SeqLengths` mask as lengths, which cuDNN takes; any other mask goes to XLA.
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
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | SeqLengths | None = None,
        *,
        pattern: int | jax.Array = 0,
    ) -> jax.Array:
        """Args: x [b, q, d]; context [b, k, d] for cross-attention (default x); mask as above, or
        :class:`SeqLengths` (not in decode mode); pattern: which of several ``mask_fn`` /
        ``attention_fn`` alternatives (int, maybe traced).
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
        lengths = mask if isinstance(mask, SeqLengths) else None
        if lengths is not None:
            if self.decode:
                raise ValueError("SeqLengths padding is not for decode mode; pass a bool mask")
            mask = None if q_len > 1 else lengths.as_mask(q_len, k_len)
        q_pos, k_pos = jnp.arange(q_len), jnp.arange(k_len)
        if self.decode:
            k, v, q_pos, k_pos, filled = self._update_cache(k, v)
            mask = combine_masks(mask, filled[None, None, None, :])
        # A square causal mask goes as is_causal, which cuDNN takes without materialising it.
        causal = mask_fns == (causal_mask,) and not self.decode and q_len == k_len > 1
        if mask_fns and not use_kernel and not causal:
            mask = combine_masks(mask, choose(mask_fns, pattern, q_pos, k_pos)[None, None])

        if use_kernel:
            out = choose(attention_fns, pattern, q, k, v)
        elif q_len == 1:
            out = single_query_attention(q, k, v, mask)
        else:  # (b, q, h, k)
            out = dot_product_attention(
                q, k, v, mask=mask, causal=causal, lengths=lengths, impl=self.attention_impl
            )
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
