"""Device meshes, logical-axis rules and shardings, from one CPU to multi-host pods.

Every mesh and axis decision of the project lives here. Models annotate parameters with *logical*
axis names (``embed``, ``mlp``, ``heads`` ...); the rules below map them onto the physical mesh axes
``data``, ``fsdp`` and ``tensor``. Meshes use ``AxisType.Auto`` (GSPMD propagation), the mode
Linen's logical constraints assume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaigc import jax_internals

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every data-parallel axis: plain data parallelism and FSDP.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical -> mesh axis rules (T5X / MaxText style). The first rule whose mesh axes are still free
# in a given array wins, so "embed" falls back to replication where fsdp is already used.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("height", None),
    ("width", None),
    ("norm", None),
)

log = logging.getLogger(__name__)


def parse_mesh_spec(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves a mesh spec such as ``{"data": -1, "fsdp": 2}`` to sizes for all mesh axes.

    Missing axes get size 1; one axis may be -1 and takes the remaining devices.
    """
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {dict(spec)} has more than one -1 axis: {fill}")
    bad = {axis: size for axis, size in sizes.items() if size < 1 and size != -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh spec {dict(spec)}: the fixed axes take {known} devices, which does not "
                f"divide the {num_devices} devices available"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh spec {dict(spec)} needs {known} devices but {num_devices} are available; "
            "use -1 for one axis to take the rest"
        )
    return sizes


def make_mesh(spec: Mapping[str, int], *, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh from a spec; see :func:`parse_mesh_spec`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def make_rules(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None) -> Rules:
    """Default rules with ``overrides`` (logical name -> mesh axes) taking precedence."""
    overrides = dict(overrides or {})
    normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    rest = tuple((name, axes) for name, axes in DEFAULT_RULES if name not in normalised)
    return tuple(normalised.items()) + rest


def _axis_names(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """A rule's or spec entry's mesh axes as a tuple: one name, several, or none."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        kept = []
        for name in _axis_names(axes):
            if dim % (mesh.shape[name] * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(name)
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding``s for a tree of (possibly ``nn.Partitioned``-boxed) abstract arrays.

    Works on ``jax.eval_shape`` output, so no unsharded copy is ever allocated. Leaves without a
    logical annotation are replicated; a mesh axis that does not divide a dimension is dropped.
    """
    logical = nn.get_partition_spec(abstract_tree)
    unboxed = nn.meta.unbox(abstract_tree)

    def to_sharding(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        return NamedSharding(mesh, _fit_spec(mesh_spec, np.shape(leaf), mesh))

    return jax.tree.map(
        to_sharding, logical, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def partitioner(mesh: Mesh, rules: Rules) -> contextlib.AbstractContextManager:
    """The SPMD partitioner to compile a training step with: GSPMD where ``rules`` shard
    convolution kernels' input channels (``conv_in``) over a mesh axis of size > 1, else the
    default (Shardy).

    jax 0.10.2's Shardy computes wrong gradients there: on a 2x2x2 mesh, a 1x1 then a 3x3
    convolution on 4x4 images (batch and kernel input channels on ``fsdp``, biases on ``tensor``)
    gave a first-kernel gradient 16% off the one-device one, GSPMD's 2e-7
    (``experiments/repro/shardy_conv_grad.py``). The setting is part of jit's cache key, so it
    applies per call.
    """
    axes = next((axes for name, axes in rules if name == "conv_in"), None)
    if any(mesh.shape.get(name, 1) > 1 for name in _axis_names(axes)):
        return jax_internals.use_shardy_partitioner(False)
    return contextlib.nullcontext()


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading axis is the global batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def _local_batch_shards(mesh: Mesh) -> list[int]:
    """Which of the ``data x fsdp`` batch shards this process's devices hold, ascending."""
    dp = data_parallel_size(mesh)
    indices = batch_sharding(mesh).addressable_devices_indices_map((dp,))
    return sorted({index[0].start or 0 for index in indices.values()})


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in the order
    ``jax.make_array_from_process_local_data`` (:func:`shard_batch`) takes them.

    Processes whose devices share batch shards (a ``tensor`` axis across hosts) get the same rows.
    """
    check_global_batch(global_batch, mesh)
    size = global_batch // data_parallel_size(mesh)
    return np.concatenate([np.arange(k * size, (k + 1) * size) for k in _local_batch_shards(mesh)])


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's rows of the batch into global arrays sharded over the batch axes.

    ``local_batch`` holds this process's rows of the global batch (numpy arrays): those of
    :func:`process_rows`, in that order; on one process, the whole batch.
    """
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        raise ValueError("empty batch")
    local_rows = {np.shape(x)[0] for x in leaves}
    if len(local_rows) != 1:
        raise ValueError(f"batch leaves disagree on the batch size: {sorted(local_rows)}")
    rows, shards, dp = local_rows.pop(), len(_local_batch_shards(mesh)), data_parallel_size(mesh)
    if shards == dp:  # this process holds every batch shard: the whole batch
        global_batch = rows
    elif rows % shards:
        raise ValueError(f"{rows} rows on this process do not split over its {shards} batch shards")
    else:
        global_batch = rows // shards * dp
    check_global_batch(global_batch, mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, x.ndim), x, (global_batch, *x.shape[1:])
        )

    return jax.tree.map(put, local_batch)


def initialize_distributed(**kwargs: Any) -> None:
    """Joins a multi-host run (``jax.distributed.initialize``); a no-op for a single process.

    On TPU pods and SLURM / Open MPI / GKE clusters JAX discovers the coordinator itself; elsewhere
    pass ``coordinator_address``, ``num_processes`` and ``process_id`` (or set JAX's environment).
    CPU processes exchange collectives over gloo, jax 0.10.2's default
    ``jax_cpu_collectives_implementation`` (set it to ``"mpi"`` for MPI).
    """
    if jax.distributed.is_initialized():
        return
    if not kwargs and not _cluster_detected():
        return
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d joined", jax.process_index(), jax.process_count())


def _cluster_detected() -> bool:
    """True where JAX can find the coordinator itself (TPU pod, SLURM, Open MPI, k8s, env vars)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:  # JAX keeps its cluster auto-detection private
        return jax_internals.cluster_detected()
    except jax_internals.JaxInternalsError as error:
        log.warning("%s; assuming a single process", error)
        return False
