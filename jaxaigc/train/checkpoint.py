"""Orbax checkpoints of the train state, the data iterator's position and the run config.

Saves are asynchronous: the step loop continues while arrays are written. Restores take an abstract
target (``ShapeDtypeStruct``s with shardings), so a checkpoint written on one mesh loads onto any
other. A latest checkpoint that fails to restore (corrupt, partial) is reported, moved aside into
``<directory>/../corrupt_checkpoints`` (never deleted), and the previous one is tried.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax does not re-export it

from jaxaigc import parallel

log = logging.getLogger(__name__)

# Orbax writes a replicated array in parallel, one slice per replica, and each slice is an eagerly
# compiled program (one per shape and replica): ~260 compiles, ~10 s, at the first save of the
# quick CLIP on 8 devices, repeated by every process. A slice under 1 MiB gains nothing from a
# parallel write, so such an array is written whole by one replica. (Orbax reads its handlers
# from this process-wide registry; the rest of its default array handler is kept.)
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns of every override, at every command's start
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                array_metadata_store=array_metadata_store.Store(),
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
            ),
            override=True,
        )
    finally:
        absl_log.setLevel(level)


_register_array_handler()


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """A ``CheckpointManager`` with items ``state`` (arrays), ``data`` and ``config`` (JSON)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "data", "config")
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(
        self, step: int, state: Any, *, data_state: dict, config: dict, force: bool = False
    ) -> bool:
        """Starts an asynchronous save; returns whether one was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``(state, data_state)`` at ``step`` onto the shardings in ``abstract_state``."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, as ``(step, state, data_state)``, or None.

        Raises CheckpointError if checkpoints exist but none restores.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as error:  # orbax raises many types for damaged files
                self._quarantine(step, error)
                continue
            return step, state, data_state
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be restored; "
                "they were moved to corrupt_checkpoints/"
            )
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        message = (
            f"checkpoint at step {step} in {self.directory} is corrupt or partial and was skipped "
            f"({type(error).__name__}: {str(error)[:300]})"
        )
        log.error(message)
        print(f"WARNING: {message}", flush=True)
        if jax.process_index() == 0:
            aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), aside)
            print(f"WARNING: moved it to {aside}", flush=True)
        ocp.multihost.sync_global_processes(f"jaxaigc_quarantine_{step}")
        self.manager.close()
        self.manager = self._open()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_trained(
    workdir: str | Path,
    init_fn: Callable[[dict], Callable[[jax.Array], Any]],
    *,
    step: int | None = None,
    device: jax.Device | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: parallel.Rules = (),
) -> tuple[dict, dict, int]:
    """The variables to evaluate a finished run with, read from its checkpoint onto one device
    or sharded over a mesh.

    Only the evaluation variables are read (a partial restore: the optimiser state is not): the
    EMA of the parameters and of the model state when the run kept one, else the live ones.

    Args:
      workdir: the run's directory, holding ``checkpoints/<step>``.
      init_fn: ``init_fn(run_config) -> init(rng)``, the run's ``Task.init`` for the saved config
        (only traced for shapes).
      step: which checkpoint; the latest by default.
      device: where the arrays go; the first local device by default.
      mesh, rules: instead of ``device``, each array sharded over ``mesh`` by its logical axes
        (a model that fits no single device, read onto its training mesh).

    Returns:
      ``(run_config, {"params": ..., **model_state}, step)``.
    """
    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; it holds {steps}")
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        config = manager.restore(step, args=args)["config"]
        ema = config["train"]["ema_decay"] > 0
        with nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(init_fn(config), jax.random.key(0))
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: sharding, nn.meta.unbox(boxed))
        else:
            shardings = parallel.logical_shardings(boxed, mesh, rules)
        variables = jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            dict(nn.meta.unbox(boxed)),
            dict(shardings),
        )
        target = {"ema_params" if ema else "params": variables.pop("params")}
        if variables:  # BatchNorm statistics and other non-parameter collections
            target["ema_model_state" if ema else "model_state"] = variables
        state = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )["state"]
    finally:
        manager.close()
    params, model_state = (state.get(key, {}) for key in ("params", "model_state"))
    if ema:
        params, model_state = (state.get(key, {}) for key in ("ema_params", "ema_model_state"))
    return config, {"params": params, **model_state}, step


class TrainedModel(NamedTuple):
    """A model read back from its run by :func:`load_model`."""

    model: Any
    variables: dict  # {"params": ..., **model_state}
    step: int
    run_config: dict  # the saved run config (JSON)


def load_model(
    workdir: str | Path,
    model_of: Callable[[dict], Any],
    init_of: Callable[[Any], Callable[[jax.Array], Any]],
    *,
    what: str,
    train_command: str,
    step: int | None = None,
    device: jax.Device | None = None,
) -> TrainedModel:
    """:func:`load_trained` with the model rebuilt from the saved run config, and a missing
    checkpoint named with the command that trains it.

    Args:
      model_of: ``model_of(run_config) -> model``; init_of: ``init_of(model) -> init(rng)``.
      what, train_command: name the missing checkpoint and the command that trains it.
    """
    try:
        run_config, variables, step = load_trained(
            workdir, lambda config: init_of(model_of(config)), step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {what} checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`{train_command}`"
        ) from error
    return TrainedModel(model_of(run_config), variables, step, run_config)
