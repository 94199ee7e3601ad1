"""The generic training loop: any objective, any mesh, resumable and preemption-safe.

Flow: config -> mesh and logical rules -> sharded state (fresh, or restored from the latest good
checkpoint together with the data iterator's position) -> one jitted step -> metrics, progress bar
and asynchronous checkpoints. Same config and seed give the same run, across kills and resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxaigc import parallel
from jaxaigc.train.checkpoint import Checkpointer
from jaxaigc.train.metrics import MetricsWriter
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import TrainState, create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient, update or new parameters became NaN or infinite; the run stopped
    without saving the bad state."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop trains: variables from ``init(rng)`` (logically annotated) and an objective.

    ``loss_fn`` has the plain or, with ``has_model_state``, the stateful signature of
    :mod:`jaxaigc.train.step`; with ``pass_step`` it also takes the keyword ``step``.
    ``constrain_params(params) -> params``, if given, runs after every update.
    A step that is more than one gradient update (PPO: a rollout, then epochs of minibatch
    updates of ``loss_fn``) comes from ``make_step(tx, *, rng, schedule) -> step(state, batch)
    -> (state, metrics)`` instead of :func:`make_train_step`; the learning-rate schedule then
    spans ``steps * updates_per_step`` updates. ``lr_scales`` (``{name: scale}`` over the
    top-level keys of the parameters) gives each of those subtrees its own gradient clipping and
    AdamW at the configured rate times its scale (:func:`~jaxaigc.train.optim.make_optimizer`).
    """

    init: Callable[[jax.Array], Any]
    loss_fn: Callable
    has_model_state: bool = False
    pass_step: bool = False
    constrain_params: Callable[[Any], Any] | None = None
    make_step: Callable[..., Callable] | None = None
    updates_per_step: int = 1
    lr_scales: Mapping[str, float] | None = None


class Batches(Protocol):
    """This process's rows of each global batch, with a position that can be saved and restored
    in global terms, so any number of processes resumes it (e.g.
    :class:`jaxaigc.data.pipeline.BatchIterator`)."""

    def select_rows(self, rows: np.ndarray) -> None: ...
    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


# A hook runs after every step: hook(step, state, metrics). Metrics are device arrays.
Hook = Callable[[int, TrainState, dict], None]


def default_train_config() -> ml_collections.ConfigDict:
    """The ``seed``, ``mesh``, ``optim`` and ``train`` sections every experiment starts from."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}, "rules": {}})
    c.optim = ml_collections.ConfigDict(
        dict(
            peak_lr=1e-3,
            warmup_steps=10,
            end_lr_ratio=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=1.0,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=100,
            batch_size=32,  # global, over all processes
            accum_steps=1,
            ema_decay=0.0,  # 0 disables the parameter EMA
            log_every=10,
            checkpoint_every=50,
            keep_checkpoints=3,
            async_checkpoint=True,
        )
    )
    return c


class _Preemption:
    """SIGTERM to any process as a step at which every process stops, saves and exits.

    One process: the signal sets a flag the loop polls. Several: JAX's preemption service (which
    catches SIGTERM itself; a Python handler would take the signal from it) tells every process
    the same sync step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._shared = jax.distributed.is_initialized()

    def __enter__(self):
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def stop_at(self, step: int) -> bool:
        """Whether to save ``step`` and stop; call it on every process at every step."""
        if self._shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# Metrics of a step that must all be finite for its new state to be worth keeping: a finite loss
# (computed before the update) can still come with a NaN gradient, update or parameter.
FINITE_METRICS = ("train/loss", "train/grad_norm", "train/update_norm", "train/param_norm")


def _check_finite(metrics: dict, step: int, checkpointer: Checkpointer) -> None:
    values = {name: float(metrics[name]) for name in FINITE_METRICS}
    if all(np.isfinite(v) for v in values.values()):
        return
    checkpointer.wait()
    good = checkpointer.all_steps()
    shown = ", ".join(f"{name.removeprefix('train/')} {value}" for name, value in values.items())
    raise NonFiniteLossError(
        f"non-finite training state at step {step} ({shown}); stopped without saving. "
        f"Last good checkpoint: {good[-1] if good else 'none'} in {checkpointer.directory}"
    )


def optimizer(task: Task, config: ml_collections.ConfigDict):
    """``(tx, schedule)`` of ``config.optim``, the schedule spanning the run's updates."""
    oc = config.optim
    return make_optimizer(
        peak_lr=oc.peak_lr,
        total_steps=config.train.steps * task.updates_per_step,
        warmup_steps=oc.warmup_steps,
        end_lr_ratio=oc.end_lr_ratio,
        b1=oc.b1,
        b2=oc.b2,
        eps=oc.eps,
        weight_decay=oc.weight_decay,
        clip_norm=oc.clip_norm,
        lr_scales=task.lr_scales,
    )


def step_function(
    task: Task, config: ml_collections.ConfigDict, tx, schedule, rng: jax.Array
) -> Callable:
    """The un-jitted ``step(state, batch) -> (state, metrics)`` :func:`train` jits (and
    :mod:`jaxaigc.plan` sizes): :func:`make_train_step` of the task's loss, or its own
    ``make_step``."""
    tc = config.train
    use_ema = tc.ema_decay > 0
    if task.make_step is None:
        return make_train_step(
            task.loss_fn,
            tx,
            rng=rng,
            has_model_state=task.has_model_state,
            accum_steps=tc.accum_steps,
            ema_decay=tc.ema_decay if use_ema else None,
            schedule=schedule,
            pass_step=task.pass_step,
            constrain_params=task.constrain_params,
        )
    if tc.accum_steps != 1 or use_ema:
        raise ValueError(
            f"accum_steps={tc.accum_steps} and ema_decay={tc.ema_decay} are make_train_step's; "
            "a task with its own make_step takes accum_steps=1 and ema_decay=0"
        )
    return task.make_step(tx, rng=rng, schedule=schedule)


def train(
    task: Task,
    batches: Batches,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    hooks: Sequence[Hook] = (),
    mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
    """Trains ``task`` for ``config.train.steps`` updates in ``workdir``, resuming if possible."""
    workdir = Path(workdir)
    tc = config.train
    mesh = mesh or parallel.make_mesh(config.mesh.shape.to_dict())
    rules = parallel.make_rules(config.mesh.rules.to_dict())
    batches.select_rows(parallel.process_rows(mesh, tc.batch_size))
    tx, schedule = optimizer(task, config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    use_ema = tc.ema_decay > 0
    _, shardings, abstract = create_sharded_state(
        task.init, tx, init_rng, mesh, rules, use_ema=use_ema, materialize=False
    )
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        save_every=tc.checkpoint_every,
        max_to_keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
    )
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
        state, _, _ = create_sharded_state(task.init, tx, init_rng, mesh, rules, use_ema=use_ema)
        start = 0
    else:
        start, state, data_state = restored
        batches.set_state(data_state)
        print(f"resumed from step {start} ({checkpointer.directory})", flush=True)

    step_fn = step_function(task, config, tx, schedule, step_rng)
    writer = MetricsWriter(workdir)
    config_json = config.to_dict()
    jitted = None
    # The previous step's finiteness metrics, checked one step late.
    pending: tuple[int, dict] | None = None
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=jax.process_index() != 0)
    try:
        with _Preemption() as preemption:
            for step in range(start + 1, tc.steps + 1):
                batch = parallel.shard_batch(next(batches), mesh)
                if jitted is None:
                    jitted = jit_train_step(step_fn, mesh, rules, shardings, batch)
                state, metrics = jitted(state, batch)
                window_steps += 1
                # Checking the previous step keeps one step in flight: no per-step host sync.
                if pending is not None:
                    _check_finite(pending[1], pending[0], checkpointer)
                pending = (step, {name: metrics[name] for name in FINITE_METRICS})

                if step % tc.log_every == 0 or step == tc.steps:
                    host = jax.device_get(metrics)
                    elapsed = time.perf_counter() - window_start
                    host["train/steps_per_sec"] = window_steps / elapsed
                    skipped = getattr(batches, "skipped_records", None)
                    if skipped is not None:  # this process's, since it started
                        host["data/skipped_records"] = skipped
                    writer.write(step, host)
                    bar.set_postfix(loss=f"{host['train/loss']:.4f}", refresh=False)
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)

                stop = preemption.stop_at(step)
                if checkpointer.should_save(step) or step == tc.steps or stop:
                    _check_finite(metrics, step, checkpointer)
                    checkpointer.save(
                        step,
                        state,
                        data_state=batches.get_state(),
                        config=config_json,
                        force=True,
                    )
                for hook in hooks:
                    hook(step, state, metrics)
                if stop:
                    print(f"SIGTERM: saved step {step} and stopped", flush=True)
                    break
            else:
                if pending is not None:
                    _check_finite(pending[1], pending[0], checkpointer)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return state
