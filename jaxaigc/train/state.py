"""The training state and its sharded construction from logical annotations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxaigc import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {"batch_stats": ...}; {} for most models
    ema_params: Any  # exponential moving average of params, or None
    # The same average of model_state (BatchNorm statistics), so the EMA weights are evaluated
    # with statistics that match them (timm's ModelEmaV2 averages buffers too); None without EMA.
    ema_model_state: Any = None

    @property
    def eval_params(self) -> Any:
        """The parameters to evaluate and sample with: the EMA when kept, else ``params``."""
        return self.params if self.ema_params is None else self.ema_params

    @property
    def eval_variables(self) -> dict:
        """``{"params": ..., **model_state}`` to evaluate with: the EMA of both when kept."""
        if self.ema_params is None:
            return {"params": self.params, **self.model_state}
        return {"params": self.ema_params, **self.ema_model_state}


def init_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    use_ema: bool,
) -> TrainState:
    """Builds a state whose leaves may still be ``nn.Partitioned`` boxes (for spec derivation)."""
    variables = dict(init_fn(rng))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=variables,
        ema_params=params if use_ema else None,
        ema_model_state=variables if use_ema else None,
    )


def create_sharded_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: parallel.Rules,
    *,
    use_ema: bool = False,
    materialize: bool = True,
) -> tuple[TrainState | None, Any, Any]:
    """Returns ``(state, shardings, abstract_state)``.

    Shapes come from ``jax.eval_shape`` and shardings from the logical annotations, then the state
    is initialised directly into its shards by a jitted init: no unsharded copy exists at any point.
    ``abstract_state`` holds ``ShapeDtypeStruct``s with the shardings (a checkpoint restore target).
    With ``materialize=False`` no array is allocated and ``state`` is None (sizing, lowering).
    """

    def init_boxed(key: jax.Array) -> TrainState:
        return init_state(init_fn, tx, key, use_ema=use_ema)

    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_boxed, rng)
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(boxed),
        shardings,
    )
    if not materialize:
        return None, shardings, abstract

    def init_unboxed(key: jax.Array) -> TrainState:
        return nn.meta.unbox(init_boxed(key))

    # No mesh context here: out_shardings place the result, and Flax's DenseGeneral would apply its
    # [in, heads, kv] constraint to the kernel while it is still reshaped to 2-D.
    state = jax.jit(init_unboxed, out_shardings=shardings)(rng)
    return state, shardings, abstract
