"""Basic layers with logically annotated parameters: LayerNorm, Dense, MLP and activations."""

from __future__ import annotations

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


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
):
    """``nn.Dense`` whose kernel is annotated ``axes = (in, out)`` and bias ``(out,)``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
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
        h = dense(width, ("mlp", "embed"), kernel_init=init, dtype=self.dtype, name="c_proj")(h)
        return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
