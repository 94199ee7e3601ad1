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


@pytest.mark.parametrize("wrt", ["x", "kernel", "both"])
def test_conv2d_1x1_forward_mode_matches_lax_convolution(wrt):
    kx, kw, kdx, kdw = jax.random.split(jax.random.key(1), 4)
    primals = (jax.random.normal(kx, (2, 5, 4, 6)), jax.random.normal(kw, (1, 1, 6, 3)))
    tangents = (jax.random.normal(kdx, (2, 5, 4, 6)), jax.random.normal(kdw, (1, 1, 6, 3)))
    tangents = tuple(
        t if wrt in (name, "both") else jnp.zeros_like(t)
        for name, t in zip(("x", "kernel"), tangents, strict=True)
    )
    y, y_dot = jax.jvp(conv2d, primals, tangents)
    y_ref, y_dot_ref = jax.jvp(lambda a, b: lax_conv(a, b, 1), primals, tangents)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_dot, y_dot_ref, rtol=1e-5, atol=1e-5)
    # Only one argument differentiated: the other's tangent is a symbolic zero.
    only_x = jax.grad(lambda a: conv2d(a, primals[1]).sum())(primals[0])
    only_x_ref = jax.grad(lambda a: lax_conv(a, primals[1], 1).sum())(primals[0])
    np.testing.assert_allclose(only_x, only_x_ref, rtol=1e-5, atol=1e-5)


def test_conv2d_1x1_is_differentiated_as_a_matmul():
    x = jnp.ones((2, 4, 4, 8))
    kernel = jnp.ones((1, 1, 8, 3))
    _, tangent = jax.linearize(conv2d, x, kernel)
    pullback = jax.linear_transpose(tangent, x, kernel)
    backward = str(jax.make_jaxpr(pullback)(jnp.ones((2, 4, 4, 3))))
    assert "conv_general_dilated" not in backward and "dot_general" in backward
    # The value itself stays XLA's convolution (faster in inference on CPU).
    assert "conv_general_dilated" in str(jax.make_jaxpr(conv2d)(x, kernel))
