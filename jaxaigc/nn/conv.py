"""2-D convolution, pooling and upsampling on NHWC images, with logically annotated parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.layers import Initializer, linear, partitioned

# N(0, 1 / fan_in), the initialisation of OpenAI's dVAE convolutions.
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int = 1, writes_residual: bool = False
) -> jax.Array:
    """NHWC ``x`` convolved with an HWIO ``kernel`` [k, k, in, out], 'same' padding (k - 1) // 2.

    ``writes_residual`` (the output feeds a residual stream) computes a 1x1 stride-1 kernel as
    ``layers.linear``, a contraction over channels whose kernel gradient transposes this layer's
    input rather than the stream's gradient: as a convolution or a plain dot, XLA:CPU fused the
    stream's chain of gradient adds and BatchNorm backward into that transpose (CLIP RN50 step
    1.10 -> 0.91 of PyTorch's time; BUILD_NOTES, "CLIP benchmark").
    """
    k = kernel.shape[0]
    if writes_residual and k == 1 and stride == 1:
        return linear(x, kernel[0, 0])
    pad = (k - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class Conv2d(nn.Module):
    """Convolution with 'same' padding (k - 1) // 2 and the given stride; kernel [k, k, in, out]
    (HWIO), and a bias unless ``use_bias=False``. ``writes_residual``: see ``conv2d``.

    ``axes`` names the kernel's (in, out) dimensions; its spatial dimensions are height, width.
    """

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = True
    writes_residual: bool = False
    axes: tuple[str, str] = ("conv_in", "conv_out")
    kernel_init: Initializer = fan_in_normal
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            partitioned(self.kernel_init, ("height", "width", *self.axes)),
            (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        y = conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.writes_residual
        )
        if not self.use_bias:
            return y
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), jnp.float32
        )
        return y + bias.astype(self.dtype)


def max_pool2d(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (an odd last row or column is dropped, as in PyTorch)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def upsample_nearest2d(x: jax.Array) -> jax.Array:
    """[b, h, w, c] -> [b, 2h, 2w, c], each pixel repeated in a 2x2 block."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
