"""2-D convolution, pooling and upsampling on NHWC images, with logically annotated parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxaigc.nn.layers import Initializer, partitioned

# N(0, 1 / fan_in), the initialisation of OpenAI's dVAE convolutions.
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """NHWC ``x`` convolved with an HWIO ``kernel`` [k, k, in, out], 'same' padding (k - 1) // 2.

    A 1x1 stride-1 kernel is differentiated as a matmul over ``[b * h * w, in]`` rows (see
    ``_pointwise_conv``); its value is XLA's convolution.
    """
    if kernel.shape[0] == 1 and stride == 1:
        return _pointwise_conv(x, kernel)
    return _convolution(x, kernel, stride)


def _convolution(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _pointwise_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[2:])
    return rows.reshape(*x.shape[:-1], kernel.shape[-1])


@jax.custom_jvp
def _pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 stride-1 convolution whose derivatives are matmuls.

    Differentiated as a convolution, XLA:CPU computes the kernel gradient by copying the input to a
    batch-minor layout, with the input's producers (BatchNorm, residual add, ReLU) fused into that
    strided copy and re-evaluated there; as a matmul the kernel gradient is a dot that reads the
    input in place (CLIP RN50 training step 4.2 -> 3.2 s on CPU; BUILD_NOTES, "CLIP benchmark").
    The value stays a convolution: in inference XLA:CPU's own 1x1 lowering with YNNPACK dots ran
    RN50 ``encode_image`` in 0.6x the time of the matmul. Same values up to fp rounding.
    """
    return _convolution(x, kernel, 1)


def _pointwise_conv_jvp(primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _pointwise_conv(x, kernel)
    terms = []
    if not isinstance(x_dot, SymbolicZero):
        terms.append(_pointwise_matmul(x_dot, kernel))
    if not isinstance(kernel_dot, SymbolicZero):
        terms.append(_pointwise_matmul(x, kernel_dot))
    return y, sum(terms[1:], start=terms[0])


_pointwise_conv.defjvp(_pointwise_conv_jvp, symbolic_zeros=True)


class Conv2d(nn.Module):
    """Convolution (``conv2d``) with 'same' padding (k - 1) // 2 and the given stride; kernel
    [k, k, in, out] (HWIO), and a bias unless ``use_bias=False``.

    ``axes`` names the kernel's (in, out) dimensions; its spatial dimensions are height, width.
    """

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = True
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
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)
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
