"""2-D convolution, pooling and upsampling on NHWC images, with logically annotated parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.layers import Initializer, partitioned

# N(0, 1 / fan_in), the initialisation of OpenAI's dVAE convolutions.
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class Conv2d(nn.Module):
    """Stride-1 convolution with 'same' padding (k - 1) // 2; kernel [k, k, in, out] (HWIO).

    ``axes`` names the kernel's (in, out) dimensions; its spatial dimensions are height, width.
    """

    features: int
    kernel_size: int
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
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), jnp.float32
        )
        pad = (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
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
