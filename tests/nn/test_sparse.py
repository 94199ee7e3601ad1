"""DALL-E's masks against a loop over (query, key), the block counts the paper's layout gives, and
the block-sparse and splash paths against dense masked attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc import parallel
from jaxaigc.nn.sparse import (
    KINDS,
    column_order,
    dalle_mask,
    dalle_mask_fn,
    layer_masks,
    nonempty_blocks,
    scored_pairs,
    sparse_attention,
    splash_attention,
)
from tests.helpers import max_relative_difference


def brute_force_mask(kind, text_len, side, kernel):
    """The mask written out one (query, key) pair at a time, on (row, column) coordinates."""
    n = text_len + side * side
    mask = np.zeros((n, n), bool)
    half = kernel // 2
    for q in range(n):
        for k in range(n):
            if q < text_len:
                mask[q, k] = k < text_len and k <= q
            elif k < text_len:
                mask[q, k] = True
            else:
                qi, ki = q - text_len, k - text_len
                (qr, qc), (kr, kc) = divmod(qi, side), divmod(ki, side)
                if kind == "dense":
                    allowed = ki <= qi
                elif kind == "row":
                    allowed = qi - side <= ki <= qi
                elif kind == "column":
                    allowed = qc == kc and kr <= qr
                else:  # raster offset dr * side + dc, wrapping at row edges
                    allowed = ki <= qi and any(
                        qi - ki == dr * side + dc
                        for dr in range(half + 1)
                        for dc in range(-half, half + 1)
                    )
                mask[q, k] = allowed
    return mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text_len, side, kernel", [(3, 5, 3), (4, 7, 11), (1, 4, 5), (2, 12, 5)])
def test_masks_match_the_brute_force_definition(kind, text_len, side, kernel):
    expected = brute_force_mask(kind, text_len, side, kernel)
    np.testing.assert_array_equal(dalle_mask(kind, text_len, side, kernel), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_fn_evaluates_the_same_mask_at_traced_positions(kind):
    full = dalle_mask(kind, 4, 5, 3)
    mask_fn = dalle_mask_fn(kind, 4, 5, 3)
    q_pos, k_pos = np.array([0, 3, 4, 11, 28]), np.arange(29)
    traced = jax.jit(mask_fn)(jnp.asarray(q_pos), jnp.asarray(k_pos))
    np.testing.assert_array_equal(np.asarray(traced), full[q_pos])


def test_layer_schedule_is_the_papers():
    assert layer_masks(5) == ["row", "column", "row", "row", "conv"]
    schedule = layer_masks(64)
    assert schedule[-1] == "conv" and schedule.count("conv") == 1
    assert [i + 1 for i, kind in enumerate(schedule) if kind == "column"] == list(range(2, 64, 4))
    assert layer_masks(1) == ["conv"]


def test_block_counts_at_128_blocks_match_the_reference():
    """T = 256 text tokens and 32 x 32 image tokens in 128-blocks (a 10 x 10 grid)."""
    counts = {kind: nonempty_blocks(dalle_mask(kind, 256, 32), 128) for kind in KINDS}
    order = column_order(256, 32)
    transposed = nonempty_blocks(dalle_mask("column", 256, 32)[np.ix_(order, order)], 128)
    assert (counts["dense"], counts["row"], transposed, counts["conv"]) == (55, 34, 27, 40)
    assert counts["column"] == 55  # in raster order the column mask touches every causal block


def _qkv(n, batch=2, heads=3, head_dim=4):
    return tuple(
        jax.random.normal(jax.random.key(i), (batch, n, heads, head_dim)) for i in range(3)
    )


def _value_and_grads(attention, q, k, v):
    """The output and the gradients of sum(sin(output)) (not that sum itself: it cancels)."""
    grads = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v))), argnums=(0, 1, 2))
    return jax.jit(lambda q, k, v: (attention(q, k, v), grads(q, k, v)))(q, k, v)


def _dense(kind, text_len, side, kernel, n):
    mask = jnp.asarray(dalle_mask(kind, text_len, side, kernel)[:n, :n])
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "text_len, side, kernel, block_size, n",
    [
        (5, 7, 5, 7, None),  # one grid row per block: the windows cross blocks
        (5, 7, 11, 14, None),  # the 11 x 11 kernel is wider than the grid
        (3, 9, 5, 128, None),  # the whole grid in one block
        (5, 7, 5, 14, 5 + 20),  # a prefix of the sequence (a partial image)
    ],
)
def test_sparse_attention_equals_dense_masked_attention(
    kind, text_len, side, kernel, block_size, n
):
    n = n or text_len + side * side
    q, k, v = _qkv(n)
    geometry = dict(kind=kind, text_len=text_len, image_side=side, kernel=kernel)
    sparse = _value_and_grads(
        lambda q, k, v: sparse_attention(q, k, v, **geometry, block_size=block_size), q, k, v
    )
    dense = _value_and_grads(_dense(kind, text_len, side, kernel, n), q, k, v)
    assert max_relative_difference(sparse, dense) < 1e-5


def test_sparse_attention_on_a_sharded_batch(mesh_2x2x2):
    q, k, v = _qkv(5 + 49, batch=8)
    geometry = dict(kind="conv", text_len=5, image_side=7, kernel=5)
    expected = sparse_attention(q, k, v, **geometry, block_size=14)
    sharding = parallel.batch_sharding(mesh_2x2x2, 4)
    q, k, v = jax.device_put((q, k, v), sharding)
    with jax.set_mesh(mesh_2x2x2):
        out = jax.jit(lambda q, k, v: sparse_attention(q, k, v, **geometry, block_size=14))(q, k, v)
    assert out.sharding.is_equivalent_to(sharding, 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_sequence_longer_than_the_layout_is_named():
    q, k, v = _qkv(3 + 16 + 1)
    with pytest.raises(ValueError, match="sequence length 20 exceeds text_len"):
        sparse_attention(q, k, v, kind="row", text_len=3, image_side=4)
    with pytest.raises(ValueError, match="unknown mask kind 'diagonal'"):
        dalle_mask("diagonal", 3, 4)
    with pytest.raises(ValueError, match="conv kernel 4 must be a positive odd"):
        dalle_mask("conv", 3, 4, kernel=4)


@pytest.mark.parametrize("kind", KINDS)
def test_splash_attention_in_interpret_mode_equals_dense(kind):
    """The Pallas TPU kernel through its CPU interpreter (sequence padded to one 128-block)."""
    text_len, side, kernel = 6, 9, 5  # 87 tokens
    q, k, v = _qkv(text_len + side * side, batch=1, heads=2, head_dim=8)
    geometry = dict(kind=kind, text_len=text_len, image_side=side, kernel=kernel)
    splash = _value_and_grads(
        lambda q, k, v: splash_attention(q, k, v, **geometry, interpret=True), q, k, v
    )
    dense = _value_and_grads(_dense(kind, text_len, side, kernel, q.shape[1]), q, k, v)
    assert max_relative_difference(splash, dense) < 1e-5


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_scored_pairs_cover_the_mask_and_stay_below_dense(kind):
    text_len, side = 256, 32
    kept = int(dalle_mask(kind, text_len, side).sum())
    dense = scored_pairs("dense", text_len, side)
    assert dense == (text_len + side**2) ** 2
    for block_size in (32, 64, 128):
        assert kept <= scored_pairs(kind, text_len, side, block_size=block_size) < dense / 2
