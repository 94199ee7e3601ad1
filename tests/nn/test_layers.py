"""The hand-written VJP of ``linear`` against autodiff of the same contraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.nn.layers import linear


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape", "in_dims", "spec"),
    [
        ((3, 5, 4), (4, 6), 1, "btd,df->btf"),
        ((2, 5, 3, 4), (3, 4, 7), 2, "bthk,hkd->btd"),
        ((6, 4), (4, 2, 3), 1, "nd,dhk->nhk"),
    ],
)
def test_linear_matches_autodiff(x_shape, kernel_shape, in_dims, spec):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kw, kernel_shape)
    y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, kernel)
    y, vjp = jax.vjp(lambda a, b: linear(a, b, in_dims), x, kernel)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
