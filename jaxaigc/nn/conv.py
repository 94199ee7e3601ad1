"""2-D convolution, pooling and upsampling on NHWC images, with logically annotated parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.layers import Initializer, partitioned

# N(0, 1 / fan_in), the initialisation of OpenAI's dVAE convolutions.
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """NHWC ``x`` convolved with an HWIO ``kernel`` [k, k, in, out], 'same' padding (k - 1) // 2.

    A 1x1 stride-1 kernel is a matmul over ``[b * h * w, in]`` rows. As a convolution, XLA:CPU
    computes its kernel gradient by copying the input to a batch-minor layout, with the input's
    producers (BatchNorm, residual adds, ReLU) fused into that strided copy and re-evaluated there;
    as a matmul the gradient is a dot that reads the input in place (CLIP RN50 training step 4.3 ->
    3.2 s on CPU; BUILD_NOTES, "CLIP benchmark"). Same values up to fp rounding on any backend.
    """
    k = kernel.shape[0]
    if k == 1 and stride == 1:
        rows = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[2:])
        return rows.reshape(*x.shape[:-1], kernel.shape[-1])
    pad = (k - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


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
