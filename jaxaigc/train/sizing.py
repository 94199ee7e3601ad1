"""Pod sizing without allocating: programs compiled on abstract inputs over this process's
(emulated) devices, and XLA's per-device memory and cost analyses of them.

A train step is sized as training runs it: the step :func:`jit_train_step` returns, lowered on
``jax.ShapeDtypeStruct``s (the state from ``create_sharded_state(..., materialize=False)``) under
its mesh and partitioner, with its compiler options. A process emulates a pod's N devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts, hence
:func:`run_child`: one subprocess per mesh. XLA:CPU assigns buffers like the accelerator backends
but fuses differently, so its figures are an order of magnitude for a pod, not a promise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from jaxaigc import compile_options, parallel
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import StepFn, jit_train_step

GIB = 2**30
# Per-example (shape, dtype) of each batch entry, e.g. {"tokens": ((256,), jnp.int32)}.
Example = Mapping[str, tuple[Sequence[int], Any]]


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=16,tensor=2"`` -> ``{"fsdp": 16, "tensor": 2}`` (for ``parallel.make_mesh``; a
    size of -1 takes the remaining devices there)."""
    spec = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        try:
            spec[axis.strip()] = int(size)
        except ValueError:
            raise ValueError(
                f"mesh {text!r}: {part!r} is not axis=size (e.g. 'fsdp=16,tensor=2')"
            ) from None
    return spec


def abstract_batch(example: Example, global_batch: int, mesh: Mesh) -> dict[str, Any]:
    """``global_batch`` rows of ``example``: ``jax.ShapeDtypeStruct``s sharded on the batch axes."""
    return {
        name: jax.ShapeDtypeStruct(
            (global_batch, *shape), dtype, sharding=parallel.batch_sharding(mesh, 1 + len(shape))
        )
        for name, (shape, dtype) in example.items()
    }


def compiled_figures(compiled: jax.stages.Compiled) -> dict[str, float]:
    """XLA's per-device bytes of a compiled program: ``argument``, ``output``, ``alias`` (donated
    arguments reused as outputs), ``temp`` and ``peak``; and its per-device ``flops`` (NaN where
    the backend gives no cost analysis; a loop's body is counted once)."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    figures = dict(
        argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes,
        alias=memory.alias_size_in_bytes,
        temp=memory.temp_size_in_bytes,
    )
    # XLA:CPU's own peak_memory_in_bytes counts the arguments only.
    figures["peak"] = figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    figures["flops"] = cost.get("flops", math.nan) if cost else math.nan
    return figures


def size_train_step(
    step: StepFn,
    init: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    example: Example,
    mesh: Mesh,
    rules: parallel.Rules,
    *,
    global_batch: int,
) -> dict[str, Any]:
    """Lowers and compiles ``jit_train_step(step, ...)`` on the abstract state of ``init`` and
    ``tx`` and an abstract global batch of ``example`` rows; nothing is allocated.

    Returns JSON-able figures: ``mesh``, ``devices``, ``global_batch``, ``rules``; ``params`` and
    ``params_per_device`` (the parameter elements one device holds); ``lower_s`` (abstract state
    and lowering) and ``compile_s``; and :func:`compiled_figures`.
    """
    parallel.check_global_batch(global_batch, mesh)
    start = time.perf_counter()
    _, shardings, state = create_sharded_state(
        init, tx, jax.random.key(0), mesh, rules, materialize=False
    )
    batch = abstract_batch(example, global_batch, mesh)
    lowered = jit_train_step(step, mesh, rules, shardings, batch).lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    params = jax.tree.leaves(state.params)
    return dict(
        mesh=dict(mesh.shape),
        devices=mesh.devices.size,
        global_batch=global_batch,
        rules=dict(rules),
        params=sum(math.prod(x.shape) for x in params),
        params_per_device=sum(math.prod(x.sharding.shard_shape(x.shape)) for x in params),
        lower_s=lower_s,
        compile_s=compile_s,
        **compiled_figures(compiled),
    )


def size_inference(
    fn: Callable, args: Sequence[Any], mesh: Mesh, rules: parallel.Rules
) -> dict[str, float]:
    """Compiles ``fn`` as ``compile_options.jit_inference`` does, under ``rules`` on ``mesh``, for
    abstract ``args`` (shardings from their ``jax.ShapeDtypeStruct``s). Returns ``compile_s``
    (with lowering) and :func:`compiled_figures`."""

    def with_rules(*args):
        with nn.logical_axis_rules(rules):
            return fn(*args)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = compile_options.jit_inference(with_rules).lower(*args).compile()
    return dict(compile_s=time.perf_counter() - start, **compiled_figures(compiled))


def run_child(
    script: str,
    mesh: str,
    *,
    accum: int,
    global_batch: int,
    timeout: float,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs ``script --one MESH --accum ACCUM --global-batch GLOBAL_BATCH *extra`` on as many
    emulated CPU devices as ``mesh`` (``"fsdp=16,tensor=2"``) has, and returns the last JSON line
    it prints, with ``wall_s``; on failure or timeout, ``mesh``, ``accum`` and ``error``."""
    devices = math.prod(parse_mesh(mesh).values())
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, script, "--one", mesh, "--accum", str(accum)]
    command += ["--global-batch", str(global_batch), *extra]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(mesh=mesh, accum=accum, error=f"timed out after {timeout} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return dict(mesh=mesh, accum=accum, error=f"exit {done.returncode}: {' | '.join(tail)}")
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - start}


def markdown_row(result: dict[str, Any], limit_gib: float) -> str:
    """One sized step (:func:`size_train_step`'s figures with ``accum``, or :func:`run_child`'s
    error) as ``| mesh (devices) | accumulation (examples/device/microbatch) | params/device |
    arguments | temporaries | peak | compile s | fits |``, in GiB; fits is peak <= ``limit_gib``."""
    r = result
    if "error" in r:
        return f"| {r['mesh']} | {r['accum']} | - | - | - | - | - | {r['error']} |"
    mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items() if size > 1)
    micro = r["global_batch"] // r["accum"] // (r["mesh"]["data"] * r["mesh"]["fsdp"])
    fits = "yes" if r["peak"] <= limit_gib * GIB else "no"
    return (
        f"| {mesh} ({r['devices']}) | {r['accum']} ({micro}/device) | "
        f"{r['params_per_device'] / 1e9:.3f}B | {r['argument'] / GIB:.2f} | {r['temp'] / GIB:.2f}"
        f" | {r['peak'] / GIB:.2f} | {r['compile_s']:.0f} (+{r['lower_s']:.0f} lowering) "
        f"| {fits} |"
    )
