"""ResNet pieces of CLIP's ModifiedResNet (Radford et al. 2021): BatchNorm, the anti-aliased
Bottleneck and attention pooling. Images are NHWC, convolution kernels HWIO.

Anti-aliasing (Zhang 2019, "Making convolutional networks shift-invariant again"): every
downsampling low-pass filters before it subsamples. ``blur="avg"`` is OpenAI's ``AvgPool2d(stride)``
(what the released weights expect); ``blur="binomial"`` is Zhang's BlurPool, a fixed
[1, 2, 1] x [1, 2, 1] / 16 filter with reflect padding, evaluated at every ``stride``-th pixel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.attention import MultiHeadAttention
from jaxaigc.nn.conv import Conv2d
from jaxaigc.nn.layers import partitioned

BLURS = ("avg", "binomial")
EXPANSION = 4  # a Bottleneck's output has 4x the channels of its inner convolutions


def batch_norm(
    *, train: bool, zero_init: bool = False, dtype: jnp.dtype = jnp.float32, name: str | None = None
):
    """BatchNorm with PyTorch's defaults: eps 1e-5, running averages updated with momentum 0.1
    (Flax's ``momentum`` is the weight of the old value: 0.9). ``train=False`` normalises with the
    running averages; ``train=True`` with batch statistics (global over a sharded batch under
    ``jit``) and updates the averages in the mutable ``batch_stats`` collection.
    ``zero_init`` starts the scale at 0, so a residual branch begins as the identity.
    """
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(scale_init, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
):
    """Bias-free convolution (a BatchNorm follows), padding (k - 1) // 2, He-normal init, kernel
    ``[k, k, in, out]``."""
    return Conv2d(
        features,
        kernel_size,
        stride=stride,
        use_bias=False,
        kernel_init=nn.initializers.he_normal(),
        dtype=dtype,
        name=name,
    )


def blur_pool(x: jax.Array, stride: int, blur: str = "avg") -> jax.Array:
    """Low-pass filters then subsamples ``x`` [b, h, w, c] by ``stride`` (identity for stride 1)."""
    if blur not in BLURS:
        raise ValueError(f"unknown blur {blur!r}; known: {BLURS}")
    if stride == 1:
        return x
    if blur == "avg":
        return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")
    # The separable binomial filter: [1, 2, 1] / 4 along height, then along width.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    x = (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4
    x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4
    return x[:, ::stride, ::stride]


class Bottleneck(nn.Module):
    """CLIP's ResNet bottleneck; every convolution has stride 1 and downsampling is a blur pool.

    Main path: conv1 1x1 -> bn1 -> ReLU -> conv2 3x3 -> bn2 -> ReLU -> blur_pool(stride) ->
    conv3 1x1 (4x channels) -> bn3 (scale initialised to 0). Shortcut, when the stride or the
    channel count changes: blur_pool(stride) -> downsample_conv 1x1 -> downsample_bn.
    """

    planes: int
    stride: int = 1
    blur: str = "avg"
    train: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, h, w, c] -> [b, h / stride, w / stride, 4 * planes]."""
        x = nn.with_logical_constraint(x, ("batch", "height", "width", None))
        features = self.planes * EXPANSION
        norm = dict(train=self.train, dtype=self.dtype)
        h = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        h = nn.relu(batch_norm(**norm, name="bn1")(h))
        h = conv(self.planes, 3, dtype=self.dtype, name="conv2")(h)
        h = nn.relu(batch_norm(**norm, name="bn2")(h))
        h = blur_pool(h, self.stride, self.blur)
        h = conv(features, 1, dtype=self.dtype, name="conv3")(h)
        h = batch_norm(**norm, zero_init=True, name="bn3")(h)
        if self.stride > 1 or x.shape[-1] != features:
            x = blur_pool(x, self.stride, self.blur)
            x = conv(features, 1, dtype=self.dtype, name="downsample_conv")(x)
            x = batch_norm(**norm, name="downsample_bn")(x)
        return nn.relu(h + x)


class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map: the spatial mean token queries all tokens.

    Tokens are [mean, pixels...] plus a learned positional embedding; one multi-head attention
    with the mean token as the only query; its out projection maps to ``out_features``.
    """

    num_heads: int
    out_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, h, w, c] -> [b, out_features]."""
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # (b, hw + 1, c)
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(c**-0.5), ("length", "embed")),
            (h * w + 1, c),
            jnp.float32,
        )
        x = x + positional_embedding.astype(x.dtype)
        out = MultiHeadAttention(
            self.num_heads, out_features=self.out_features, dtype=self.dtype, name="attn"
        )(x[:, :1], context=x)
        return out[:, 0]
