"""``conv2d``'s 1x1 matmul path against XLA's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.nn.conv import conv2d


def lax_conv(x, kernel, stride):
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@pytest.mark.parametrize(("kernel_size", "stride"), [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_conv2d_matches_lax_convolution(kernel_size, stride):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 6, 6, 5))
    kernel = jax.random.normal(kw, (kernel_size, kernel_size, 5, 7))
    y_ref, vjp_ref = jax.vjp(lambda a, b: lax_conv(a, b, stride), x, kernel)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, stride), x, kernel)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv2d_1x1_is_a_matmul_in_the_compiled_program():
    x = jnp.ones((2, 4, 4, 8))
    kernel = jnp.ones((1, 1, 8, 3))
    hlo = jax.jit(jax.grad(lambda k: conv2d(x, k).sum())).lower(kernel).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo
