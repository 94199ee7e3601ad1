"""DALL-E's sparse attention masks (Ramesh et al. 2021, "Zero-shot text-to-image generation",
App. B.1 and Fig. 11) and attention that computes only the blocks they keep.

A sequence is ``text_len`` text tokens then an ``image_side x image_side`` grid of image tokens in
raster order. Text queries attend to earlier text (causal) and never to image keys; every image
query attends to all text; image -> image follows the layer's kind:

- ``row``: the previous ``image_side`` tokens and itself (``q - W <= k <= q`` in raster index);
- ``column``: the same column, at or above (in raster order);
- ``conv``: the causal half of a ``kernel x kernel`` neighbourhood in raster-offset form,
  ``q - k = dr * W + dc`` with ``0 <= dr <= kernel // 2``, ``|dc| <= kernel // 2``, ``k <= q``;
  offsets wrap at row edges as the row mask does (a key just left of the left edge is the end of
  an earlier row), not as a torus (ru-dalle) nor clipped at the edges: the paper gives the mask in
  raster-offset form and this keeps it a band of raster offsets;
- ``dense``: causal.

Four paths compute the same function: ``jax.nn.dot_product_attention`` with the mask (dense),
:func:`sparse_attention` (portable, block-sparse), :func:`splash_attention` (Pallas TPU kernel)
and :func:`jaxaigc.nn.sparse_triton.triton_sparse_attention` (Pallas GPU kernel);
:func:`block_sparse_attention` picks the platform's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("row", "column", "conv", "dense")
SPARSE_KERNELS = ("portable", "splash", "triton")


def layer_masks(n_layers: int) -> list[str]:
    """The paper's schedule: layer i (1-indexed) is ``conv`` if last, else ``column`` if
    ``(i - 2) % 4 == 0``, else ``row`` (row, column, row, row, ..., conv)."""
    return [
        "conv" if i == n_layers else "column" if (i - 2) % 4 == 0 else "row"
        for i in range(1, n_layers + 1)
    ]


def _check(kind: str, text_len: int, image_side: int, kernel: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; known: {KINDS}")
    if text_len < 1 or image_side < 1:
        raise ValueError(f"text_len {text_len} and image_side {image_side} must be at least 1")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"conv kernel {kernel} must be a positive odd number")


def _image_mask(kind: str, q, k, side: int, kernel: int):
    """Image -> image mask at raster indices ``q``, ``k`` (broadcastable NumPy or jax arrays)."""
    causal = k <= q
    if kind == "row":
        return causal & (k >= q - side)
    if kind == "column":
        return causal & (q % side == k % side)
    if kind == "conv":
        half, offset = kernel // 2, q - k
        near = False
        for dr in range(half + 1):  # a few static terms; several may hold when side <= 2 * half
            near = near | (abs(offset - dr * side) <= half)
        return causal & near
    return causal


@dataclasses.dataclass(frozen=True)
class DALLEMask:
    """``mask_fn(q_pos, k_pos) -> bool [q, k]`` (True = may attend) at sequence positions.

    Works on NumPy arrays and on traced jax arrays (the KV-cache path evaluates it at cache
    positions); a frozen dataclass, so equal masks compare and hash equal.
    """

    kind: str
    text_len: int
    image_side: int
    kernel: int = 11

    def __post_init__(self):
        _check(self.kind, self.text_len, self.image_side, self.kernel)

    @property
    def length(self) -> int:
        return self.text_len + self.image_side**2

    def __call__(self, q_pos, k_pos):
        q, k = q_pos[:, None], k_pos[None, :]
        t = self.text_len
        q_text, k_text = q < t, k < t
        image = _image_mask(self.kind, q - t, k - t, self.image_side, self.kernel)
        # text -> earlier text | image -> all text | image -> image by kind
        return (q_text & k_text & (k <= q)) | (~q_text & k_text) | (~q_text & ~k_text & image)


def dalle_mask(kind: str, text_len: int, image_side: int, kernel: int = 11) -> np.ndarray:
    """The mask as bool ``[N, N]``, ``N = text_len + image_side**2``, True where query i may
    attend key j."""
    mask = DALLEMask(kind, text_len, image_side, kernel)
    positions = np.arange(mask.length)
    return mask(positions, positions)


def dalle_mask_fn(kind: str, text_len: int, image_side: int, kernel: int = 11) -> DALLEMask:
    """The same mask as a builder ``mask_fn(q_pos, k_pos)`` usable under jit."""
    return DALLEMask(kind, text_len, image_side, kernel)


def column_order(text_len: int, image_side: int) -> np.ndarray:
    """Sequence order with the image grid transposed (text first, then column by column): the
    column mask becomes block-diagonal causal. ``x[:, order]`` permutes; ``argsort`` undoes it."""
    image = np.arange(image_side**2).reshape(image_side, image_side).T.ravel()
    return np.concatenate([np.arange(text_len), text_len + image])


def nonempty_blocks(mask: np.ndarray, block: int) -> int:
    """Number of ``block x block`` tiles of ``mask`` with at least one True (padded with False)."""
    n = math.ceil(mask.shape[0] / block) * block
    padded = np.zeros((n, n), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return int(padded.reshape(n // block, block, n // block, block).any((1, 3)).sum())


def _pad_to(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads axis 1 of [b, n, ...] to ``length``."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _transpose_grid(x: jax.Array, side: int) -> jax.Array:
    """[b, h, side * side, d] raster <-> column-major (its own inverse)."""
    b, h, _, d = x.shape
    return x.reshape(b, h, side, side, d).swapaxes(2, 3).reshape(x.shape)


def _reach(kind: str, side: int, kernel: int) -> int:
    """The largest raster offset ``q - k`` an image query may attend under ``kind``."""
    if kind == "row":
        return side
    if kind == "conv":
        return kernel // 2 * (side + 1)
    return 0  # column: runs on the transposed grid, where each block holds whole columns


def _query_blocks(side: int, block_size: int) -> tuple[int, int]:
    """``(blocks, queries per block)`` of the image queries: whole grid rows, at least one."""
    rows = max(1, min(side, block_size // side))
    return math.ceil(side / rows), rows * side


def scored_pairs(
    kind: str, text_len: int, image_side: int, kernel: int = 11, block_size: int = 128
) -> int:
    """The (query, key) scores :func:`sparse_attention` computes for a full sequence (the kept
    pairs and the masked ones inside its blocks): text queries against all text keys, each
    image query block against all text keys and its key window."""
    _check(kind, text_len, image_side, kernel)
    if kind == "dense":
        return (text_len + image_side**2) ** 2
    num_blocks, block = _query_blocks(image_side, block_size)
    window = block + _reach(kind, image_side, kernel)
    return text_len**2 + num_blocks * block * (text_len + window)


@jax.custom_vjp
def _softmax_attend(q, keys, values, masks):
    """One softmax over the union of the key sets, differentiated FlashAttention-style.

    q [..., h, q, d] (already scaled); keys / values: lists of [..., h, k_i, d]; masks: per key
    set a bool array broadcastable to [..., h, q, k_i], or None where every key is kept. Returns
    [..., h, q, d]. The backward pass keeps only each query's log-sum-exp and recomputes the
    probabilities (Dao et al. 2022), so no score-sized buffer lives from the forward pass to the
    backward one.
    """
    return _attend_forward(q, keys, values, masks)[0]


def _scores(q, keys, masks):
    """Masked scores [..., h, q, k_i] for each key set, kept apart (concatenating copies them)."""
    scores = []
    for k, mask in zip(keys, masks, strict=True):
        s = jnp.einsum("...hqd,...hkd->...hqk", q, k, preferred_element_type=jnp.float32)
        scores.append(s if mask is None else jnp.where(mask, s, jnp.finfo(jnp.float32).min))
    return scores


def _attend_forward(q, keys, values, masks):
    scores = _scores(q, keys, masks)
    top = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(-1, keepdims=True) for w in weights)
    # Normalising the [q, d] output costs less than normalising the [q, k] weights.
    unnormalised = sum(
        jnp.einsum(
            "...hqk,...hkd->...hqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        for w, v in zip(weights, values, strict=True)
    )
    out = (unnormalised / total).astype(values[0].dtype)
    return out, (q, keys, values, masks, out, top + jnp.log(total))


def _attend_backward(residuals, d_out):
    q, keys, values, masks, out, lse = residuals
    d_out = d_out.astype(values[0].dtype)
    # d scores = P * (dP - rowsum(dO * O)): the softmax Jacobian without a [q, k] reduction.
    row = jnp.einsum("...hqd,...hqd->...hq", d_out, out, preferred_element_type=jnp.float32)
    d_q, d_keys, d_values = 0, [], []
    for s, k, v in zip(_scores(q, keys, masks), keys, values, strict=True):
        probs = jnp.exp(s - lse)
        d_probs = jnp.einsum("...hqd,...hkd->...hqk", d_out, v, preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - row[..., None])).astype(q.dtype)
        d_q = d_q + jnp.einsum("...hqk,...hkd->...hqd", d_scores, k)
        d_keys.append(jnp.einsum("...hqk,...hqd->...hkd", d_scores, q))
        d_values.append(jnp.einsum("...hqk,...hqd->...hkd", probs.astype(v.dtype), d_out))
    return d_q, d_keys, d_values, None


_softmax_attend.defvjp(_attend_forward, _attend_backward)


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    text_len: int,
    image_side: int,
    kernel: int = 11,
    block_size: int = 128,
) -> jax.Array:
    """``jax.nn.dot_product_attention(q, k, v, mask=dalle_mask(...))`` without the [n, n] scores.

    Text queries attend causally over text. Image queries go in blocks of whole grid rows
    (``block_size // image_side`` of them, at least one): each block takes one softmax over all
    text keys and the image keys from the furthest its window reaches to its own end (row: one
    grid row back; conv: ``kernel // 2`` rows and columns back). Column runs on the transposed
    grid, where each column is contiguous and each block attends only to itself. ``dense`` is
    plain causal attention. The blocks run one after another (``lax.map``, heads-first arrays
    so that their matmuls need no transposes) and the backward pass recomputes their
    probabilities from the saved log-sum-exp (``_softmax_attend``), so one block's scores are
    the only score-sized buffer: time scales with the kept keys, memory with one block's. Any
    batch sharding.

    Args: q, k, v [b, n, h, d] with ``n <= text_len + image_side**2`` (a prefix of the sequence:
    all masks are causal, so padding the rest changes nothing). Returns [b, n, h, d].
    """
    _check(kind, text_len, image_side, kernel)
    t, side = text_len, image_side
    n, full = q.shape[1], text_len + image_side**2
    if n > full:
        raise ValueError(f"sequence length {n} exceeds text_len + image_side**2 = {full}")
    if kind == "dense":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (_pad_to(x, full) for x in (q, k, v))
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    # Heads first, once: every block's matmuls then batch over leading axes without transposes.
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # [b, h, n, d]
    text_k, text_v = k[:, :, :t], v[:, :, :t]
    text_out = _softmax_attend(q[:, :, :t], [text_k], [text_v], [np.tril(np.ones((t, t), bool))])

    image_q, image_k, image_v = q[:, :, t:], k[:, :, t:], v[:, :, t:]
    raster = np.arange(side**2)
    if kind == "column":  # on the transposed grid each column is contiguous
        image_q, image_k, image_v = (_transpose_grid(x, side) for x in (image_q, image_k, image_v))
        raster = raster.reshape(side, side).T.ravel()
    num_blocks, block = _query_blocks(side, block_size)
    reach = _reach(kind, side, kernel)
    # Each query block scores the keys from ``reach`` tokens before its start to its end: one
    # gather of a static [blocks, block + reach] index (out-of-grid indices are masked out).
    q_idx = np.arange(num_blocks)[:, None] * block + np.arange(block)[None]  # (blocks, block)
    k_idx = q_idx[:, :1] - reach + np.arange(block + reach)[None]  # (blocks, block + reach)
    in_grid = (k_idx >= 0) & (k_idx < side**2)
    b, h, d = q.shape[0], q.shape[1], q.shape[3]
    image_q = jnp.pad(image_q, [(0, 0), (0, 0), (0, num_blocks * block - side**2), (0, 0)])
    image_q = jnp.moveaxis(image_q.reshape(b, h, num_blocks, block, d), 2, 0)
    window_k, window_v = (
        jnp.moveaxis(x[:, :, np.clip(k_idx, 0, side**2 - 1)], 2, 0) for x in (image_k, image_v)
    )
    # The window's mask, evaluated by the same definition at raster indices.
    q_raster = raster[np.clip(q_idx, 0, side**2 - 1)][:, :, None]
    k_raster = raster[np.clip(k_idx, 0, side**2 - 1)][:, None, :]
    window = in_grid[:, None, :] & _image_mask(kind, q_raster, k_raster, side, kernel)

    def attend_block(xs):  # one query block: its scores are the only score-sized buffer
        q_block, k_window, v_window, window_mask = xs
        return _softmax_attend(q_block, [text_k, k_window], [text_v, v_window], [None, window_mask])

    image_out = jax.lax.map(attend_block, (image_q, window_k, window_v, window[:, None, None]))
    image_out = jnp.moveaxis(image_out, 0, 2).reshape(b, h, num_blocks * block, d)
    image_out = image_out[:, :, : side**2]
    if kind == "column":
        image_out = _transpose_grid(image_out, side)
    return jnp.concatenate([text_out, image_out], 2).swapaxes(1, 2)[:, :n]


@functools.lru_cache(maxsize=32)
def _splash_kernel(kind, text_len, image_side, kernel, heads, interpret):
    # Imported here: Pallas TPU modules are not needed by the other paths.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    mask = dalle_mask(kind, text_len, image_side, kernel)
    if kind == "column":
        order = column_order(text_len, image_side)
        mask = mask[np.ix_(order, order)]
    # The kernel's blocks are multiples of 128; padded queries attend only to themselves.
    n = math.ceil(mask.shape[0] / 128) * 128
    padded = np.eye(n, dtype=bool)
    padded[: mask.shape[0], : mask.shape[0]] = mask
    heads_mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(padded)] * heads)
    block = splash.BlockSizes(*(128,) * 8)
    return splash.make_splash_mha(
        heads_mask, head_shards=1, q_seq_shards=1, block_sizes=block, interpret=interpret
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    text_len: int,
    image_side: int,
    kernel: int = 11,
    interpret: bool | None = None,
) -> jax.Array:
    """The same function through Pallas splash attention, which skips the mask's empty 128-blocks
    (column on the transposed grid). ``interpret`` (default: not on TPU) runs the kernel's
    reference interpreter, slowly. The batch is a ``vmap``: on a batch sharded over several TPUs
    call it inside ``shard_map``. Args and returns as :func:`sparse_attention`.
    """
    _check(kind, text_len, image_side, kernel)
    n, full = q.shape[1], text_len + image_side**2
    if n > full:
        raise ValueError(f"sequence length {n} exceeds text_len + image_side**2 = {full}")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    splash = _splash_kernel(kind, text_len, image_side, kernel, q.shape[2], interpret)
    order = column_order(text_len, image_side) if kind == "column" else np.arange(full)
    padded = math.ceil(full / 128) * 128
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale

    def prepare(x):  # [b, n, h, d] -> [b, h, padded, d] in kernel order
        return _pad_to(_pad_to(x, full)[:, order], padded).transpose(0, 2, 1, 3)

    out = jax.vmap(splash)(prepare(q), prepare(k), prepare(v)).transpose(0, 2, 1, 3)
    if kind == "column":
        out = out[:, np.argsort(order)]
    return out[:, :n]


def platform_kernel(platform: str) -> str:
    """The block-sparse kernel for ``platform`` (``jax.default_backend()``): splash on TPU,
    Triton on GPU, the portable path elsewhere."""
    return {"tpu": "splash", "gpu": "triton", "cuda": "triton"}.get(platform, "portable")


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    text_len: int,
    image_side: int,
    kernel: int = 11,
    block_size: int = 128,
    implementation: str | None = None,
) -> jax.Array:
    """DALL-E's masked attention through ``implementation`` (one of ``SPARSE_KERNELS``). By
    default, on a GPU or TPU host the choice is staged out (``lax.platform_dependent``): that
    accelerator's kernel where the program is lowered for it, the portable path where it is
    lowered for the CPU (a FLOP count on abstract CPU arguments); elsewhere the portable path.
    ``block_size`` sizes the portable path's query blocks; the kernels keep their own tiles. Args
    and returns as :func:`sparse_attention`.
    """
    geometry = dict(kind=kind, text_len=text_len, image_side=image_side, kernel=kernel)

    def attend(name: str):
        if name == "portable":
            return functools.partial(sparse_attention, block_size=block_size, **geometry)
        if name == "splash":
            return functools.partial(splash_attention, **geometry)
        if name == "triton":
            from jaxaigc.nn.sparse_triton import triton_sparse_attention  # Pallas' Triton API

            return functools.partial(triton_sparse_attention, **geometry)
        raise ValueError(f"unknown sparse kernel {name!r}; known: {SPARSE_KERNELS}")

    if implementation is not None:
        return attend(implementation)(q, k, v)
    platform = jax.default_backend()
    accelerated = platform_kernel(platform)
    if accelerated == "portable":
        return attend("portable")(q, k, v)
    lowering_platforms = ("tpu",) if accelerated == "splash" else ("cuda", "rocm")
    branches = {name: attend(accelerated) for name in lowering_platforms}
    return jax.lax.platform_dependent(q, k, v, **branches, default=attend("portable"))
