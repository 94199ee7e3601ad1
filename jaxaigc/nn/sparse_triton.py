"""DALL-E's sparse attention (:mod:`jaxaigc.nn.sparse`) as a block-sparse Pallas kernel for GPUs
(the Triton lowering), the GPU counterpart of the TPU splash kernel.

The sequence, in kernel order (column masks on the transposed grid, as splash does), is cut into
``block x block`` tiles of the mask. Each query block loops over the key blocks whose tile keeps
at least one pair and skips the rest, applying each tile from a table of the mask's distinct
tiles (int8; DALL-E's masks repeat a few band patterns). The kernel knows no mask kind: the
tables, built once in NumPy from :func:`jaxaigc.nn.sparse.dalle_mask`, are the mask. The
forward pass is FlashAttention's online softmax (Dao et al. 2022) in base 2; the backward pass
recomputes the probabilities from the saved log-sum-exp, one kernel for dq over each query
block's key blocks and one for dk, dv over each key block's query blocks.

Triton needs power-of-two tile shapes: the sequence is padded to a multiple of ``block`` (padded
queries attend only to themselves, so no row is empty), head sizes to a power of two (zeros,
which change no score), and the tables to power-of-two lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxaigc.nn.sparse import _check, _pad_to, column_order, dalle_mask

# A finite "minus infinity": a row whose first tiles are all masked gets weight exp2(0) there,
# erased by the rescaling exp2(MASKED - m) = 0 once the row meets a kept key (every row has one).
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_LOG2_E = math.log2(math.e)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The mask as block tables. ``rows`` index query blocks (forward, dq), ``cols`` key blocks
    (dk, dv): ``*_count[i, 0]`` nonempty tiles, ``*_block[i, j]`` the other side's block of the
    j-th, ``*_tile[i, j]`` its tile in ``tiles`` ([tiles * block, block] int8, 1 = keep)."""

    order: np.ndarray
    length: int  # padded sequence length, a multiple of block
    rows_count: np.ndarray
    rows_block: np.ndarray
    rows_tile: np.ndarray
    cols_count: np.ndarray
    cols_block: np.ndarray
    cols_tile: np.ndarray
    tiles: np.ndarray


def _tables(nonempty: np.ndarray, tile_ids: np.ndarray):
    """Per row of ``nonempty`` [blocks, blocks]: count [blocks_pow2, 1], the nonempty columns and
    their tile ids [blocks_pow2, width_pow2] (padding entries point at block 0, tile 0, unread)."""
    blocks = nonempty.shape[0]
    rows, width = _next_power_of_2(blocks), _next_power_of_2(int(nonempty.sum(1).max()))
    count = np.zeros((rows, 1), np.int32)
    block = np.zeros((rows, width), np.int32)
    tile = np.zeros((rows, width), np.int32)
    for i in range(blocks):
        (columns,) = np.nonzero(nonempty[i])
        count[i, 0] = len(columns)
        block[i, : len(columns)] = columns
        tile[i, : len(columns)] = tile_ids[i, columns]
    return count, block, tile


@functools.lru_cache(maxsize=32)
def _layout(kind: str, text_len: int, image_side: int, kernel: int, block: int) -> _Layout:
    mask = dalle_mask(kind, text_len, image_side, kernel)
    order = column_order(text_len, image_side) if kind == "column" else np.arange(len(mask))
    mask = mask[np.ix_(order, order)]
    n = math.ceil(len(mask) / block) * block
    padded = np.eye(n, dtype=bool)
    padded[: len(mask), : len(mask)] = mask
    blocks = n // block
    grid = padded.reshape(blocks, block, blocks, block).transpose(0, 2, 1, 3)  # (qb, kb, q, k)
    nonempty = grid.any((2, 3))
    # The distinct tiles, the full one first.
    distinct = [np.ones(block * block, bool)]
    lookup = {distinct[0].tobytes(): 0}
    tile_ids = np.zeros(blocks * blocks, np.int32)
    for index, tile in enumerate(grid.reshape(blocks * blocks, block * block)):
        tile_ids[index] = lookup.setdefault(tile.tobytes(), len(distinct))
        if tile_ids[index] == len(distinct):
            distinct.append(tile)
    tile_ids = tile_ids.reshape(blocks, blocks)
    tiles = np.zeros((_next_power_of_2(len(distinct)) * block, block), np.int8)
    tiles[: len(distinct) * block] = np.stack(distinct).reshape(-1, block)
    rows = _tables(nonempty, tile_ids)
    cols = _tables(nonempty.T, tile_ids.T)
    return _Layout(order, n, *rows, *cols, tiles)


def _tile(tiles_ref, tile_ref, j: jax.Array, block: int) -> jax.Array:
    """The j-th tile of this program's row of the table, bool [block, block] (query x key)."""
    return tiles_ref[pl.ds(tile_ref[j] * block, block), :] != 0


def _scores(q: jax.Array, k: jax.Array, keep: jax.Array, scale: float) -> jax.Array:
    """Masked scores in base 2 (``log2(e)`` folded into the scale), float32 [q, k]."""
    s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2_E)
    return jnp.where(keep, s, _MASKED)


def _forward_kernel(
    count_ref, block_ref, tile_ref, tiles_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block, scale
):
    q = q_ref[...]  # (block, d)

    def step(j, carry):  # one nonempty key block: FlashAttention's online softmax
        acc, top, total = carry
        keys = pl.ds(block_ref[j] * block, block)
        v = v_ref[keys, :]
        s = _scores(q, k_ref[keys, :], _tile(tiles_ref, tile_ref, j, block), scale)
        new_top = jnp.maximum(top, s.max(-1))
        rescale = jnp.exp2(top - new_top)
        p = jnp.exp2(s - new_top[:, None])
        acc = acc * rescale[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, new_top, total * rescale + p.sum(-1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block,), -jnp.inf, jnp.float32),
        jnp.zeros((block,), jnp.float32),
    )
    acc, top, total = jax.lax.fori_loop(0, count_ref[0], step, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = top + jnp.log2(total)


def _dq_kernel(
    count_ref,
    block_ref,
    tile_ref,
    tiles_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    block,
    scale,
):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def step(j, dq):
        keys = pl.ds(block_ref[j] * block, block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = jnp.exp2(_scores(q, k, _tile(tiles_ref, tile_ref, j, block), scale) - lse[:, None])
        # d scores = P * (dP - rowsum(dO * O)), as in the portable path's backward.
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, count_ref[0], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    count_ref,
    block_ref,
    tile_ref,
    tiles_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    block,
    scale,
):
    k, v = k_ref[...], v_ref[...]

    def step(j, carry):  # one query block that attends this key block
        dk, dv = carry
        queries = pl.ds(block_ref[j] * block, block)
        q, do = q_ref[queries, :], do_ref[queries, :]
        lse, delta = lse_ref[queries], delta_ref[queries]
        p = jnp.exp2(_scores(q, k, _tile(tiles_ref, tile_ref, j, block), scale) - lse[:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, count_ref[0], step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, name, tables, inputs, outputs, *, geometry, scale, interpret):
    """``pallas_call`` over (blocks, batch, heads). ``tables``: (count, block, tile) of the
    program's side; ``inputs`` / ``outputs``: (array or shape, "block" | "all") pairs, "block"
    taking the program's ``block`` rows of a [b, n, h, d] or [b, h, n] array, "all" every row."""
    layout = _layout(*geometry)
    block = geometry[-1]
    batch, _, heads, d = inputs[0][0].shape

    def spec(x, rows: str) -> pl.BlockSpec:
        mine = rows == "block"
        size = block if mine else layout.length
        if len(x.shape) == 3:  # [b, h, n]
            return pl.BlockSpec((None, None, size), lambda i, b, h: (b, h, i if mine else 0))
        return pl.BlockSpec((None, size, None, d), lambda i, b, h: (b, i if mine else 0, h, 0))

    def table_spec(x) -> pl.BlockSpec:
        return pl.BlockSpec((None, x.shape[1]), lambda i, b, h: (i, 0))

    tiles = layout.tiles
    in_specs = [table_spec(t) for t in tables]
    in_specs += [pl.BlockSpec(tiles.shape, lambda i, b, h: (0, 0))]
    in_specs += [spec(x, rows) for x, rows in inputs]
    return pl.pallas_call(
        functools.partial(kernel, block=block, scale=scale),
        grid=(layout.length // block, batch, heads),
        in_specs=in_specs,
        out_specs=[spec(x, rows) for x, rows in outputs],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x, _ in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=interpret,
        name=name,
    )(*(jnp.asarray(t) for t in tables), jnp.asarray(tiles), *(x for x, _ in inputs))


def _forward(q, k, v, geometry, scale, interpret):
    layout = _layout(*geometry)
    batch, n, heads, _ = q.shape
    lse = jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)
    rows = (layout.rows_count, layout.rows_block, layout.rows_tile)
    return _call(
        _forward_kernel,
        "dalle_sparse_forward",
        rows,
        [(q, "block"), (k, "all"), (v, "all")],
        [(q, "block"), (lse, "block")],
        geometry=geometry,
        scale=scale,
        interpret=interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, geometry, scale, interpret):
    """q, k, v [b, n, h, d] in kernel order, n and d padded -> [b, n, h, d]."""
    return _forward(q, k, v, geometry, scale, interpret)[0]


def _attention_forward(q, k, v, geometry, scale, interpret):
    out, lse = _forward(q, k, v, geometry, scale, interpret)
    return out, (q, k, v, out, lse)


def _attention_backward(geometry, scale, interpret, residuals, d_out):
    q, k, v, out, lse = residuals
    layout = _layout(*geometry)
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), d_out.astype(jnp.float32))
    common = [(q, "all"), (k, "all"), (v, "all"), (d_out, "all"), (lse, "all"), (delta, "all")]
    kwargs = dict(geometry=geometry, scale=scale, interpret=interpret)
    rows = (layout.rows_count, layout.rows_block, layout.rows_tile)
    cols = (layout.cols_count, layout.cols_block, layout.cols_tile)
    by_query = [(q, "block"), common[1], common[2], (d_out, "block"), (lse, "block")]
    (d_q,) = _call(
        _dq_kernel, "dalle_sparse_dq", rows, [*by_query, (delta, "block")], [(q, "block")], **kwargs
    )
    by_key = [common[0], (k, "block"), (v, "block"), *common[3:]]
    d_k, d_v = _call(
        _dkv_kernel, "dalle_sparse_dkv", cols, by_key, [(k, "block"), (v, "block")], **kwargs
    )
    return d_q, d_k, d_v


_attention.defvjp(_attention_forward, _attention_backward)


def triton_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    text_len: int,
    image_side: int,
    kernel: int = 11,
    block_size: int = 64,
    interpret: bool | None = None,
) -> jax.Array:
    """``jax.nn.dot_product_attention(q, k, v, mask=dalle_mask(...))`` through the block-sparse
    Pallas kernel, which skips the mask's empty ``block_size`` tiles (a power of two, at least
    16). ``interpret`` (default: not on a GPU) runs Pallas' interpreter, slowly. The batch is a
    grid axis: on a batch sharded over several GPUs call it inside ``shard_map``. Args and
    returns as :func:`jaxaigc.nn.sparse.sparse_attention`.
    """
    _check(kind, text_len, image_side, kernel)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two, at least 16")
    n, full = q.shape[1], text_len + image_side**2
    if n > full:
        raise ValueError(f"sequence length {n} exceeds text_len + image_side**2 = {full}")
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    layout = _layout(kind, text_len, image_side, kernel, block_size)
    d = q.shape[-1]
    padded_d = max(16, _next_power_of_2(d))  # Triton's dot takes power-of-two sides >= 16

    def prepare(x):  # [b, n, h, d] -> [b, length, h, padded_d] in kernel order
        x = _pad_to(_pad_to(x, full)[:, layout.order], layout.length)
        return jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, padded_d - d)])

    geometry = (kind, text_len, image_side, kernel, block_size)
    out = _attention(prepare(q), prepare(k), prepare(v), geometry, d**-0.5, interpret)
    out = out[:, :full, :, :d]
    if kind == "column":
        out = out[:, np.argsort(layout.order)]
    return out[:, :n]
