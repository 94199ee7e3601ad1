"""Basic layers with logically annotated parameters: LayerNorm, Dense, MLP and activations."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() default
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def layer_norm(*, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """LayerNorm with an explicit epsilon (CLIP and GPT-2 use 1e-5; Flax's default is 1e-6).

    Statistics are computed in float32 with the two-pass variance, as PyTorch does.
    """
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """``x [..., *in] . kernel [*in, *out] -> [..., *out]``, contracting ``in_dims`` dimensions.

    For layers that write into a residual stream. The backward pass is written out
    (``dx = g . kernel^T``, ``dkernel = x^T . g``) rather than derived: JAX's rule takes the
    kernel gradient as ``g^T . x``, so XLA:CPU transposes ``g``, and when ``g`` is the residual
    stream's gradient it fuses that whole chain of adds into the transpose at every layer,
    re-evaluating it per layer (backward time quadratic in depth). Here ``x`` (this layer's input)
    is the operand transposed. Layers that read from the stream (whose ``x`` is the chain) keep
    JAX's rule. Same values on any backend; no forward-mode differentiation.
    """
    return _contract(x, kernel, in_dims)


def _contract(x: jax.Array, kernel: jax.Array, in_dims: int) -> jax.Array:
    x_dims = tuple(range(x.ndim - in_dims, x.ndim))
    return jax.lax.dot_general(x, kernel, ((x_dims, tuple(range(in_dims))), ((), ())))


def _linear_fwd(x, kernel, in_dims):
    return _contract(x, kernel, in_dims), (x, kernel)


def _linear_bwd(in_dims, residuals, g):
    x, kernel = residuals
    lead = x.ndim - in_dims
    out_dims = tuple(range(in_dims, kernel.ndim))
    dx = jax.lax.dot_general(g, kernel, ((tuple(range(lead, g.ndim)), out_dims), ((), ())))
    dkernel = jax.lax.dot_general(x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``nn.Dense``'s contraction (last axis of ``lhs``, first of ``rhs``) via ``linear``."""
    del dimension_numbers, precision, preferred_element_type  # always Dense's; default precision
    return linear(lhs, rhs, 1)


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
    residual_output: bool = False,
    name: str | None = None,
):
    """``nn.Dense`` whose kernel is annotated ``axes = (in, out)`` and bias ``(out,)``.

    ``residual_output``: the layer writes into a residual stream, so its kernel gradient is taken
    with ``linear`` (see there).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dot_general=_dense_dot_general if residual_output else None,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(kernel_init or nn.initializers.lecun_normal(), axes),
        bias_init=partitioned(nn.initializers.zeros, axes[1:]),
        name=name,
    )


class MLP(nn.Module):
    """Transformer feed-forward block: c_fc (width -> hidden) -> activation -> c_proj.

    ``out_init_scale`` multiplies the LeCun-normal standard deviation of the c_proj kernel.
    """

    hidden: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="c_fc")(x)
        h = activation(self.activation)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        scale = self.out_init_scale**2
        init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
        h = dense(
            width,
            ("mlp", "embed"),
            kernel_init=init,
            dtype=self.dtype,
            residual_output=True,
            name="c_proj",
        )(h)
        return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
