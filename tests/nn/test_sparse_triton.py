"""The block-sparse Pallas GPU kernel: through Pallas' interpreter against dense masked attention
(outputs and gradients), its Triton lowering (run on the CPU: no GPU compiles it here), the block
tables' skipped tiles, and the platform dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.nn.sparse import (
    KINDS,
    block_sparse_attention,
    dalle_mask,
    nonempty_blocks,
    platform_kernel,
)
from jaxaigc.nn.sparse_triton import _layout, triton_sparse_attention
from tests.helpers import max_relative_difference
from tests.nn.test_sparse import _dense, _qkv, _value_and_grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "text_len, side, kernel, head_dim, n",
    [
        (8, 8, 5, 8, None),  # 72 tokens padded to 80: five 16-blocks, head size padded to 16
        (5, 7, 11, 16, 5 + 20),  # a prefix of the sequence; the kernel wider than the grid
    ],
)
def test_interpreted_kernel_equals_dense_masked_attention(
    kind, text_len, side, kernel, head_dim, n
):
    n = n or text_len + side * side
    q, k, v = _qkv(n, heads=2, head_dim=head_dim)
    geometry = dict(kind=kind, text_len=text_len, image_side=side, kernel=kernel)
    with jax.default_matmul_precision("highest"):
        kernel_out = _value_and_grads(
            lambda q, k, v: triton_sparse_attention(
                q, k, v, **geometry, block_size=16, interpret=True
            ),
            q,
            k,
            v,
        )
        dense = _value_and_grads(_dense(kind, text_len, side, kernel, n), q, k, v)
    assert max_relative_difference(kernel_out, dense) < 1e-5
    np.testing.assert_allclose(kernel_out[0], dense[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_lowers_to_triton_with_its_backward(kind):
    """The Pallas -> Triton lowering (block shapes, loads, dots, loops), in bfloat16 as trained.
    Triton's own compile to PTX needs a GPU."""
    x = jax.ShapeDtypeStruct((2, 16 + 144, 4, 48), jnp.bfloat16)  # head size 48 padded to 64

    def loss(q, k, v):
        out = triton_sparse_attention(
            q, k, v, kind=kind, text_len=16, image_side=12, block_size=32, interpret=False
        )
        return out.astype(jnp.float32).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grads.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk and dv


def test_tables_skip_empty_tiles_and_keep_every_pair():
    text_len, side, block = 64, 16, 32  # 320 tokens, 10 x 10 tiles
    dense_tiles = nonempty_blocks(dalle_mask("dense", text_len, side), block)
    for kind in KINDS:
        layout = _layout(kind, text_len, side, 11, block)
        mask = dalle_mask(kind, text_len, side, 11)[np.ix_(layout.order, layout.order)]
        count = int(layout.rows_count.sum())
        assert count == int(layout.cols_count.sum()) == nonempty_blocks(mask, block)
        assert count < dense_tiles or kind == "dense"
        # Rebuilt from the tables, the mask (in kernel order) is the definition's.
        rebuilt = np.zeros((layout.length, layout.length), bool)
        tiles = layout.tiles.reshape(-1, block, block).astype(bool)
        for i in range(layout.length // block):
            for j in range(layout.rows_count[i, 0]):
                kb, tile = layout.rows_block[i, j], layout.rows_tile[i, j]
                rebuilt[i * block : (i + 1) * block, kb * block : (kb + 1) * block] = tiles[tile]
        np.testing.assert_array_equal(rebuilt, mask)


def test_dispatch_by_platform():
    assert [platform_kernel(p) for p in ("tpu", "gpu", "cpu")] == ["splash", "triton", "portable"]
    q, k, v = _qkv(4 + 16, heads=2, head_dim=8)
    geometry = dict(kind="conv", text_len=4, image_side=4, kernel=3)
    portable = block_sparse_attention(q, k, v, **geometry)  # the CPU's
    with jax.default_matmul_precision("highest"):
        triton = block_sparse_attention(q, k, v, **geometry, implementation="triton")
    np.testing.assert_allclose(triton, portable, atol=1e-5)
    with pytest.raises(ValueError, match="unknown sparse kernel 'flash'"):
        block_sparse_attention(q, k, v, **geometry, implementation="flash")
    with pytest.raises(ValueError, match="block_size 24 must be a power of two"):
        triton_sparse_attention(q, k, v, **geometry, block_size=24)


def test_on_a_gpu_host_the_kernel_is_chosen_when_lowering(monkeypatch):
    """On a GPU host (mocked) the default is staged out: the Triton kernel where the program is
    lowered for CUDA, the portable path where it is lowered for the CPU, gradients included."""
    q, k, v = _qkv(4 + 16, heads=2, head_dim=16)
    geometry = dict(kind="row", text_len=4, image_side=4, kernel=3)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, **geometry)

    expected = _value_and_grads(attend, q, k, v)  # a CPU host's: the portable path
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert max_relative_difference(_value_and_grads(attend, q, k, v), expected) < 1e-6
    grads = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2)))
    for platform, triton_calls in (("cpu", 0), ("cuda", 3)):
        hlo = grads.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
        assert hlo.count("__gpu$xla.gpu.triton") == triton_calls
