"""ADM UNet blocks: the timestep embedding, scale-shift residual blocks, attention with context
tokens, the trunk's shapes and errors, logical axes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.nn.conv import conv2d
from jaxaigc.nn.unet import AttentionBlock, ResBlock, UNet, timestep_embedding
from tests.helpers import assert_logical_axes

KEY = jax.random.key(0)
SMALL = dict(
    model_channels=16,
    out_channels=6,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_ds=(2,),
    head_channels=8,
    groups=4,
)


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def perturbed(params, seed=1):
    """Every parameter moved off its initial value (zero-initialised layers included)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), params)


def test_timestep_embedding_matches_guided_diffusion():
    t = np.array([0, 1, 17, 999])
    dim, half = 9, 4
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, 1))], -1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim), expected, atol=1e-4)


@pytest.mark.parametrize("kind, side", [("none", 8), ("up", 16), ("down", 4)])
def test_res_block_starts_as_the_identity_and_resamples(kind, side):
    x, emb = normal(0, (2, 8, 8, 8)), normal(1, (2, 32))
    block = ResBlock(8, groups=4, resample=kind)
    params = block.init(KEY, x, emb)
    out = jax.jit(block.apply)(params, x, emb)
    assert out.shape == (2, side, side, 8)
    if kind == "none":  # zero-initialised out_conv
        np.testing.assert_array_equal(out, x)


def test_res_block_modulates_the_norm_by_the_embedding():
    """skip(x) + out_conv(silu(out_norm(h) * (1 + scale) + shift)), (scale, shift) =
    emb_proj(silu(emb)), recomputed by hand from the block's own in_conv output h."""
    x, emb = normal(0, (2, 8, 8, 8)), normal(1, (2, 32))
    block = ResBlock(12, groups=4)
    variables = perturbed(nn.meta.unbox(block.init(KEY, x, emb)))
    out, state = block.apply(variables, x, emb, capture_intermediates=True)
    p = variables["params"]
    h = np.asarray(state["intermediates"]["in_conv"]["__call__"][0], np.float64)
    e = jax.nn.silu(emb) @ p["emb_proj"]["kernel"] + p["emb_proj"]["bias"]
    scale, shift = e[:, None, None, :12], e[:, None, None, 12:]
    groups = h.reshape(2, 8, 8, 4, 3)  # 4 groups of 3 channels
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    normed = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(2, 8, 8, 12)
    normed = normed * p["out_norm"]["scale"] + p["out_norm"]["bias"]
    h = jax.nn.silu(jnp.asarray(normed * (1 + scale) + shift, jnp.float32))
    expected = (
        conv2d(h, p["out_conv"]["kernel"]) + p["out_conv"]["bias"]
        + conv2d(x, p["skip"]["kernel"]) + p["skip"]["bias"]
    )  # fmt: skip
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_attention_attends_the_context_tokens():
    x, context = normal(0, (2, 4, 4, 16)), normal(1, (2, 3, 24))
    block = AttentionBlock(8, groups=4)
    params = block.init(KEY, x, context)
    apply = jax.jit(block.apply)
    np.testing.assert_array_equal(apply(params, x, context), x)  # zero-initialised out
    params = perturbed(nn.meta.unbox(params))
    base = apply(params, x, context)
    moved = apply(params, x, context + np.eye(3, dtype=np.float32)[1][None, :, None])
    assert np.abs(np.asarray(base - moved)).max() > 1e-3
    # Without context the block is plain self-attention over the pixels.
    assert apply(nn.meta.unbox(block.init(KEY, x)), x).shape == x.shape


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_unet_output_has_the_input_shape(resblock_updown):
    unet = UNet(**SMALL, resblock_updown=resblock_updown)
    x, emb, context = normal(0, (2, 8, 8, 3)), normal(1, (2, 64)), normal(2, (2, 5, 32))
    # Random values in init's shapes: compiling init would cost as much as the forward pass.
    variables = jax.eval_shape(unet.init, KEY, x, emb, context)
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), nn.meta.unbox(variables))
    out = jax.jit(unet.apply)(perturbed(params), x, emb, context)
    assert out.shape == (2, 8, 8, 6) and np.all(np.isfinite(out))
    # Attention only where the map was downsampled by 2 (and in the middle).
    names = set(variables["params"])
    assert {"down_1_0_attn", "up_1_0_attn", "up_1_1_attn", "middle_attn"} <= names
    assert not any(n.startswith(("down_0", "up_0")) and n.endswith("attn") for n in names)


def test_unet_rejects_a_size_it_cannot_halve():
    unet = UNet(**{**SMALL, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match=r"image size 6x6 cannot be halved 2 times .* by 4"):
        unet.init(KEY, jnp.zeros((1, 6, 6, 3)), jnp.zeros((1, 64)))


def test_every_unet_parameter_has_logical_axis_names():
    unet = UNet(**SMALL)
    abstract = jax.eval_shape(
        unet.init, KEY, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 64)), jnp.zeros((1, 5, 32))
    )["params"]
    assert_logical_axes(abstract)
