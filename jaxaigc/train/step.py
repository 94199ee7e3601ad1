"""The train step for any objective, and the one place it is jitted.

Objectives are pure functions. The plain form is ``loss_fn(params, batch, rng) -> (loss, metrics)``.
Models with non-parameter state (BatchNorm statistics) use the stateful form
``loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))``.
``metrics`` is a flat dict of scalars; the step prefixes its keys with ``train/``.
An objective whose loss is a mean over a batch-dependent number of terms (tokens of a padded
batch) reports that number as ``metrics[LOSS_WEIGHT]``; gradient accumulation then weights each
microbatch by it, so the accumulated gradient is the big batch's. Without it, microbatches weigh
equally (right for losses that are means over examples).
Objectives with step-dependent schedules (the dVAE's beta and temperature) take a keyword
``step`` (the int32 update count) as well, given with ``make_train_step(..., pass_step=True)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxaigc import compile_options, parallel
from jaxaigc.train.state import TrainState

StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
LOSS_WEIGHT = "loss_weight"


def _as_stateful(loss_fn: Callable, has_model_state: bool) -> Callable:
    if has_model_state:
        return loss_fn

    def stateful(params, model_state, batch, rng):
        loss, metrics = loss_fn(params, batch, rng)
        return loss, (metrics, model_state)

    return stateful


def _split_microbatches(batch: Any, accum_steps: int) -> Any:
    """[B, ...] -> [accum, B / accum, ...] taking rows with stride ``accum_steps``.

    Strided rows keep every microbatch spread evenly over the data-parallel shards, so no
    resharding is needed (contiguous chunks would each live on a few devices).
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}"
            )
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    has_model_state: bool = False,
    accum_steps: int = 1,
    ema_decay: float | None = None,
    schedule: optax.Schedule | None = None,
    pass_step: bool = False,
    constrain_params: Callable[[Any], Any] | None = None,
    norm_groups: Sequence[str] = (),
) -> StepFn:
    """Returns a pure ``step(state, batch) -> (state, metrics)``.

    The step's key is ``fold_in(rng, state.step)``: a resumed run draws the same randomness.
    With ``ema_decay`` the parameters and the model state (BatchNorm statistics) are averaged.
    With ``accum_steps > 1`` gradients are averaged over microbatches in a ``lax.scan``, weighted by
    ``metrics[LOSS_WEIGHT]`` where the objective reports it.
    With ``pass_step`` the objective is called with ``step=state.step`` (the updates applied so
    far) as a keyword argument. ``constrain_params(params) -> params`` runs after every update
    (a projection onto the allowed set, e.g. CLIP's temperature range). For each name in
    ``norm_groups`` (top-level keys of the parameters) the gradient norm of that subtree is logged
    too, as ``train/grad_norm/NAME``.
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        objective = functools.partial(loss_fn, step=state.step) if pass_step else loss_fn
        grad_fn = jax.value_and_grad(_as_stateful(objective, has_model_state), has_aux=True)
        step_rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, step_rng
            )
        else:

            def accumulate(carry, micro):
                index, model_state, grad_sum = carry
                (loss, (metrics, model_state)), grads = grad_fn(
                    state.params, model_state, micro, jax.random.fold_in(step_rng, index)
                )
                weight = metrics.get(LOSS_WEIGHT, jnp.ones((), jnp.float32))
                grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
                return (index + 1, model_state, grad_sum), (loss, metrics, weight)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (_, model_state, grad_sum), (losses, metrics, weights) = jax.lax.scan(
                accumulate,
                (jnp.zeros((), jnp.int32), state.model_state, zeros),
                _split_microbatches(batch, accum_steps),
            )
            # sum_m w_m mean_m / sum_m w_m: the mean over all the big batch's terms.
            total = weights.sum()
            safe_total = jnp.where(total > 0, total, 1.0)
            grads = jax.tree.map(lambda g: g / safe_total, grad_sum)
            loss = (weights * losses).sum() / safe_total
            metrics = {k: (weights * v).sum() / safe_total for k, v in metrics.items()}
            if LOSS_WEIGHT in metrics:
                metrics[LOSS_WEIGHT] = total

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if constrain_params is not None:
            params = constrain_params(params)
        ema_params, ema_model_state = state.ema_params, state.ema_model_state
        if ema_decay is not None:

            def average(e: jax.Array, x: jax.Array) -> jax.Array:
                if not jnp.issubdtype(x.dtype, jnp.floating):  # counters stay as they are
                    return x
                return ema_decay * e + (1.0 - ema_decay) * x

            ema_params = jax.tree.map(average, ema_params, params)
            ema_model_state = jax.tree.map(average, ema_model_state, model_state)
            if isinstance(model_state, dict) and "frozen" in model_state:
                # Frozen models are never updated: their own weights, not an average that drifts
                # in the last place.
                ema_model_state = {**ema_model_state, "frozen": model_state["frozen"]}
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        metrics |= {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/update_norm": optax.tree.norm(updates),
            "train/param_norm": optax.tree.norm(params),
        }
        metrics |= {f"train/grad_norm/{name}": optax.tree.norm(grads[name]) for name in norm_groups}
        if schedule is not None:
            metrics["train/lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=model_state,
            ema_params=ema_params,
            ema_model_state=ema_model_state,
        )
        return new_state, metrics

    return step


class TrainStep:
    """A train step jitted by :func:`jit_train_step`, used as the ``jax.jit`` function it holds.

    Calling it, ``trace``, ``lower`` and ``eval_shape`` run under the step's mesh and partitioner
    (``jax.set_mesh``, ``parallel.partitioner``), and so do the methods of the ``jax.stages``
    objects they return (``Lowered.compile``: JAX hands the partitioner to XLA's compile options
    too). So the program lowered and compiled on ``jax.ShapeDtypeStruct``s (sizing) is the one
    training runs, and a call after ``lower(...).compile()`` reuses that compilation.
    """

    def __init__(self, jitted: Any, mesh: Mesh, rules: parallel.Rules):
        self._jitted, self._mesh, self._rules = jitted, mesh, rules

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with jax.set_mesh(self._mesh), parallel.partitioner(self._mesh, self._rules):
            yield

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        return _run_in(self._context, self._jitted, state, batch)

    def trace(self, state: Any, batch: Any) -> Any:
        """``jax.stages.Traced`` of the step for these (possibly abstract) arguments."""
        return _run_in(self._context, self._jitted.trace, state, batch)

    def lower(self, state: Any, batch: Any) -> Any:
        """``jax.stages.Lowered`` of the step for these (possibly abstract) arguments."""
        return _run_in(self._context, self._jitted.lower, state, batch)

    def eval_shape(self, state: Any, batch: Any) -> Any:
        """The step's outputs as ``jax.ShapeDtypeStruct``s."""
        return _run_in(self._context, self._jitted.eval_shape, state, batch)


def _run_in(
    context: Callable[[], contextlib.AbstractContextManager], fn: Callable, *args, **kwargs
) -> Any:
    """``fn(*args, **kwargs)`` under ``context()``; a ``Traced`` or ``Lowered`` result keeps
    ``context`` for its own methods. A ``Compiled`` needs none: running it reads no partitioner."""
    with context():
        out = fn(*args, **kwargs)
    if isinstance(out, jax.stages.Traced | jax.stages.Lowered):
        return _InContext(out, context)
    return out


class _InContext:
    """A ``jax.stages.Traced`` or ``Lowered`` whose methods run under ``context()``."""

    def __init__(self, stage: Any, context: Callable[[], contextlib.AbstractContextManager]):
        self._stage, self._context = stage, context

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._stage, name)
        return functools.partial(_run_in, self._context, attr) if callable(attr) else attr


def jit_train_step(
    step: StepFn,
    mesh: Mesh,
    rules: parallel.Rules,
    state_shardings: Any,
    batch_example: Any,
    *,
    compiler_options: dict[str, str] | None = None,
) -> TrainStep:
    """Jits ``step`` with the state's shardings in and out, the batch sharded over the batch axes
    and the old state donated (its buffers are reused for the new one), partitioned by
    ``parallel.partitioner(mesh, rules)``; ``batch_example`` may be abstract (only ranks are
    read). ``compiler_options`` default to ``compile_options.training_options(mesh)``; ``{}``
    compiles with XLA's defaults. Returns a :class:`TrainStep`."""
    batch_shardings = jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim), batch_example)

    def train_step(state, batch):
        with nn.logical_axis_rules(rules):
            return step(state, batch)

    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
        compiler_options=(
            compile_options.training_options(mesh) if compiler_options is None else compiler_options
        ),
    )
    return TrainStep(jitted, mesh, rules)
