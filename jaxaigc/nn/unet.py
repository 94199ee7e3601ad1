"""ADM-style UNet (Dhariwal & Nichol 2021, "Diffusion models beat GANs"; openai/guided-diffusion
``unet.py``) as used by GLIDE and the unCLIP decoder: residual blocks whose GroupNorm is modulated
by the conditioning embedding (scale-shift norm), optional up/down sampling inside residual
blocks (``resblock_updown``), self-attention at low resolutions that also attends a sequence of
context tokens (GLIDE's ``encoder_kv``), skip connections from every input block to the matching
output block. Images are NHWC, convolution kernels HWIO.

Zero-initialised layers, as in ADM: the last convolution of each residual block, the out
projection of each attention block and the UNet's output convolution, so every block starts as
the identity and the untrained UNet predicts 0.

Rematerialisation (``remat_policy``, the names of ``nn.transformer.REMAT_POLICIES``) wraps every
residual and attention block in ``nn.remat``: the backward pass recomputes a block's activations
from its input instead of storing them, which a 64 px UNet of 512 base channels needs to fit a
training step in an accelerator's memory. Parameters and outputs are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.attention import HeadsDense, dot_product_attention
from jaxaigc.nn.conv import Conv2d, upsample_nearest2d
from jaxaigc.nn.layers import dense, partitioned
from jaxaigc.nn.transformer import REMAT_POLICIES, check_remat_policy

RESAMPLES = ("none", "up", "down")


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, guided-diffusion's order:
    [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ...], f_i = max_period^(-i / h), h = dim // 2
    (an odd ``dim`` gets a zero last component).

    Args: t [b]. Returns: float32 [b, dim].
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def group_norm(groups: int, *, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """GroupNorm with statistics in float32 (ADM's ``GroupNorm32``), eps 1e-5 as PyTorch."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def resample(x: jax.Array, kind: str) -> jax.Array:
    """[b, h, w, c] -> nearest 2x upsampling ("up"), 2x2 average pooling ("down") or itself."""
    if kind == "up":
        return upsample_nearest2d(x)
    if kind == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


def conv3x3(features: int, *, zero: bool = False, dtype: jnp.dtype, name: str) -> Conv2d:
    """A 3x3 convolution with PyTorch's default init (what ADM has), or zeros."""
    init = (
        nn.initializers.zeros
        if zero
        else nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    )
    return Conv2d(features, 3, kernel_init=init, dtype=dtype, name=name)


class ResBlock(nn.Module):
    """ADM's residual block with scale-shift norm; x [b, h, w, c], emb [b, e] -> [b, h', w',
    out_channels] (h' = 2h, h / 2 or h by ``resample``):

        h = conv(resample(silu(norm(x))))
        scale, shift = dense(silu(emb))
        h = conv_zero(dropout(silu(norm(h) * (1 + scale) + shift)))
        out = skip(resample(x)) + h        (skip: a 1x1 convolution if the channels change)

    Without ``scale_shift`` (ADM's ``use_scale_shift_norm=False``) the embedding is added
    instead: ``h = conv_zero(dropout(silu(norm(h + dense(silu(emb))))))``.
    """

    out_channels: int
    groups: int = 32
    scale_shift: bool = True
    resample: str = "none"
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        if self.resample not in RESAMPLES:
            raise ValueError(f"unknown resample {self.resample!r}; known: {RESAMPLES}")
        x = nn.with_logical_constraint(x, ("batch", "height", "width", None))
        h = nn.silu(group_norm(self.groups, dtype=self.dtype, name="in_norm")(x))
        h = resample(h, self.resample)
        x = resample(x, self.resample)
        h = conv3x3(self.out_channels, dtype=self.dtype, name="in_conv")(h)
        features = (2 if self.scale_shift else 1) * self.out_channels
        e = dense(features, ("embed", "conv_out"), dtype=self.dtype, name="emb_proj")(nn.silu(emb))
        norm = group_norm(self.groups, dtype=self.dtype, name="out_norm")
        if self.scale_shift:
            scale, shift = jnp.split(e[:, None, None, :], 2, axis=-1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + e[:, None, None, :])
        h = nn.Dropout(self.dropout_rate)(nn.silu(h), deterministic=self.deterministic)
        h = conv3x3(self.out_channels, zero=True, dtype=self.dtype, name="out_conv")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map, with optional context tokens prepended to
    the keys and values (GLIDE's ``encoder_kv``: their own key / value projections, no query):

        h = norm(x) [b, hw, c];  q, k, v = proj(h);  k, v = [proj_kv(context); k, v]
        out = x + proj_out_zero(attention(q, k, v))

    x [b, h, w, c], context [b, n, d] or None, context_mask bool [b, n] or None (False: a padded
    context token no pixel attends) -> [b, h, w, c]. Heads of ``head_channels``.
    """

    head_channels: int = 64
    groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
    ) -> jax.Array:
        b, height, width, c = x.shape
        if c % self.head_channels:
            raise ValueError(f"{c} channels are not divisible into heads of {self.head_channels}")
        heads = (c // self.head_channels, self.head_channels)
        h = group_norm(self.groups, dtype=self.dtype, name="norm")(x).reshape(b, height * width, c)

        def project(name: str, inputs: jax.Array) -> jax.Array:
            return HeadsDense(heads, "in", dtype=self.dtype, name=name)(inputs)

        q, k, v = project("query", h), project("key", h), project("value", h)  # (b, hw, h, k)
        mask = None
        if context is not None:
            context = context.astype(self.dtype)
            k = jnp.concatenate([project("context_key", context), k], axis=1)
            v = jnp.concatenate([project("context_value", context), v], axis=1)
            if context_mask is not None:  # the pixels' own keys always attended
                keys = jnp.pad(context_mask, ((0, 0), (0, height * width)), constant_values=True)
                mask = keys[:, None, None, :]  # (b, 1, 1, n + hw)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        out = dot_product_attention(q, k, v, mask=mask)  # (b, hw, h, k); cuDNN without a mask
        out = HeadsDense((c,), "out", dtype=self.dtype, init_scale=0.0, name="out")(out)
        return x + out.reshape(b, height, width, c)


class UNet(nn.Module):
    """ADM's UNet trunk: x [b, r, r, c_in], emb [b, e] (timestep and conditioning), context
    [b, n, d] or None, context_mask bool [b, n] or None -> [b, r, r, out_channels].

    Levels ``channel_mult`` (channels ``model_channels * mult``), ``num_res_blocks`` residual
    blocks per level going down and one more going up; between levels the resolution halves
    (a ``ResBlock(resample="down")`` with ``resblock_updown``, else a stride-2 convolution) and
    doubles on the way up. Attention after each residual block whose feature map has been
    downsampled by a factor in ``attention_ds`` (1 = full resolution), and in the middle unless
    not ``middle_attention``. ``scale_shift``: see :class:`ResBlock`.
    ``r`` must be divisible by 2^(levels - 1). ``remat_policy`` rematerialises each residual and
    attention block (see the module docstring).
    """

    model_channels: int
    out_channels: int
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_ds: Sequence[int] = (2, 4, 8)
    head_channels: int = 64
    groups: int = 32
    resblock_updown: bool = True
    scale_shift: bool = True
    middle_attention: bool = True
    dropout_rate: float = 0.0
    deterministic: bool = True
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        emb: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        check_remat_policy(self.remat_policy)
        res_block, attention_block = ResBlock, AttentionBlock
        if self.remat_policy != "none":
            policy = REMAT_POLICIES[self.remat_policy]
            res_block = nn.remat(ResBlock, policy=policy)
            attention_block = nn.remat(AttentionBlock, policy=policy)
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} cannot be halved {levels - 1} times "
                f"({levels} levels of channel_mult): it must be divisible by {factor}"
            )
        common = dict(groups=self.groups, dtype=self.dtype)
        block = dict(
            scale_shift=self.scale_shift,
            dropout_rate=self.dropout_rate,
            deterministic=self.deterministic,
            **common,
        )

        def attend(h: jax.Array, ds: int, name: str) -> jax.Array:
            if ds not in self.attention_ds:
                return h
            return attention_block(self.head_channels, **common, name=name)(
                h, context, context_mask
            )

        def downsample(h: jax.Array, name: str) -> jax.Array:
            if self.resblock_updown:
                return res_block(h.shape[-1], resample="down", **block, name=name)(h, emb)
            return Conv2d(h.shape[-1], 3, stride=2, dtype=self.dtype, name=name)(h)

        def upsample(h: jax.Array, name: str) -> jax.Array:
            if self.resblock_updown:
                return res_block(h.shape[-1], resample="up", **block, name=name)(h, emb)
            h = upsample_nearest2d(h)
            return conv3x3(h.shape[-1], dtype=self.dtype, name=name)(h)

        h = conv3x3(self.model_channels * self.channel_mult[0], dtype=self.dtype, name="in_conv")(
            x.astype(self.dtype)
        )
        skips, ds = [h], 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                name = f"down_{level}_{i}"
                h = res_block(self.model_channels * mult, **block, name=name)(h, emb)
                h = attend(h, ds, f"{name}_attn")
                skips.append(h)
            if level < levels - 1:
                h = downsample(h, f"down_{level}_resample")
                ds *= 2
                skips.append(h)

        h = res_block(h.shape[-1], **block, name="middle_0")(h, emb)
        if self.middle_attention:
            h = attention_block(self.head_channels, **common, name="middle_attn")(
                h, context, context_mask
            )
        h = res_block(h.shape[-1], **block, name="middle_1")(h, emb)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                name = f"up_{level}_{i}"
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(self.model_channels * mult, **block, name=name)(h, emb)
                h = attend(h, ds, f"{name}_attn")
            if level > 0:
                h = upsample(h, f"up_{level}_resample")
                ds //= 2

        h = nn.silu(group_norm(self.groups, dtype=self.dtype, name="out_norm")(h))
        return conv3x3(self.out_channels, zero=True, dtype=self.dtype, name="out_conv")(h)
