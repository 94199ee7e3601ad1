"""Pod sizing of DALL-E's 12B transformer (``paper-12b``) without allocating it.

    python experiments/bench/dalle_sizing.py [--meshes "fsdp=16 fsdp=32 fsdp=16,tensor=2"]
        [--accum 1,4,16] [--global-batch 512] [--timeout 1800] [--flops]

For each mesh (and gradient-accumulation count) a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` builds the abstract train state with
``create_sharded_state(..., materialize=False)`` (``jax.eval_shape``: no parameter is allocated;
shardings from the logical names and ``parallel.make_rules()``), then lowers and compiles the
whole AdamW train step (``make_train_step(dalle_loss_fn(model), ...)``, jitted with the state's
shardings in and out and the state donated, as ``jit_train_step`` does) for a global batch of
``--global-batch`` captions of 256 tokens and 32 x 32 image tokens. The preset computes in bf16 with
one scanned block and full remat. Prints a markdown row per mesh: XLA's per-device memory of the
compiled step (arguments, temporaries, peak) and compile seconds.

``--flops`` also counts the FLOPs of one sequence's forward and backward pass from XLA's cost
analysis of the *unscanned* lowered program (the cost analysis counts a ``while`` body once, so
the scanned program would report about one layer), with and without remat, beside the 6N rule.

The memory estimate comes from the CPU backend, which assigns buffers like the accelerator backends
but fuses differently: an order of magnitude for a pod. It overstates activations: XLA:CPU converts
the scan's stacked bf16 block inputs (``bf16[64, b, 1280, 3968]`` per device, the only residuals
full remat keeps) to a second, f32 stack as a whole, so each sequence of a microbatch costs ~2.3
GiB per device here (64 x 1280 x 3968 bf16 is 0.61 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

GIB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=16,tensor=2"`` -> ``{"fsdp": 16, "tensor": 2}``."""
    return {axis: int(size) for axis, size in (part.split("=") for part in text.split(","))}


def paper_optimizer():
    from jaxaigc.train.optim import make_optimizer

    # The paper's AdamW (App. B.2): betas (0.9, 0.96), weight decay 4.5e-2, clipping at 4.
    tx, _ = make_optimizer(
        peak_lr=4.5e-4,
        total_steps=430_000,
        warmup_steps=5_000,
        b1=0.9,
        b2=0.96,
        weight_decay=4.5e-2,
        clip_norm=4.0,
    )
    return tx


def size_one(mesh_spec: dict[str, int], global_batch: int, accum: int) -> dict:
    """Compiles ``paper-12b``'s train step on this process's (emulated) devices."""
    import jax.numpy as jnp

    from jaxaigc.models.dalle import DALLE, DALLEConfig
    from jaxaigc.objectives.dalle import dalle_loss_fn

    config = DALLEConfig.from_name("paper-12b")
    model = DALLE(config)
    return compile_train_step(
        # Inside eval_shape these zeros are abstract: nothing is allocated.
        lambda rng: model.init(
            rng,
            jnp.zeros((1, config.text_len), jnp.int32),
            jnp.zeros((1, config.image_len), jnp.int32),
        ),
        dalle_loss_fn(model),
        {"text": ((config.text_len,), jnp.int32), "image": ((config.image_len,), jnp.int32)},
        paper_optimizer(),
        mesh_spec,
        global_batch=global_batch,
        accum=accum,
    )


def compile_train_step(
    init,
    loss_fn,
    example: dict,
    tx,
    mesh_spec: dict[str, int],
    *,
    global_batch: int,
    accum: int,
    make_step=None,
    rules: dict | None = None,
) -> dict:
    """Lowers and compiles the train step of ``loss_fn`` on a mesh of this process's (emulated)
    devices, from abstract inputs: the state of ``init`` (``create_sharded_state(...,
    materialize=False)``) and a global batch whose entries have the per-example ``(shape, dtype)``
    of ``example``, sharded on the batch axes. ``make_step``: a task's own step builder
    (``Task.make_step``, e.g. a PPO iteration) in place of ``make_train_step(loss_fn, ...)``, as
    the loop uses it (``accum`` 1). ``rules``: logical -> mesh axis overrides of the default
    rules (``parallel.make_rules``), as a run's ``config.mesh.rules``. Returns XLA's per-device
    memory figures."""
    import flax.linen as nn
    import jax

    from jaxaigc import parallel
    from jaxaigc.train.state import create_sharded_state
    from jaxaigc.train.step import make_train_step

    mesh = parallel.make_mesh(mesh_spec)
    rules = parallel.make_rules(rules)
    parallel.check_global_batch(global_batch, mesh)
    start = time.perf_counter()
    _, shardings, state = create_sharded_state(
        init, tx, jax.random.key(0), mesh, rules, materialize=False
    )
    batch = {
        name: jax.ShapeDtypeStruct(
            (global_batch, *shape),
            dtype,
            sharding=parallel.batch_sharding(mesh, 1 + len(shape)),
        )
        for name, (shape, dtype) in example.items()
    }
    if make_step is None:
        step = make_train_step(loss_fn, tx, rng=jax.random.key(1), accum_steps=accum)
    elif accum != 1:
        raise ValueError(f"accum={accum}: a task's own make_step takes accumulation 1")
    else:
        step = make_step(tx, rng=jax.random.key(1))

    def train_step(state, batch):
        with nn.logical_axis_rules(rules):
            return step(state, batch)

    # jit_train_step's jit (shardings in and out, state donated), lowered on abstract inputs.
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, batch)),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    with jax.set_mesh(mesh), parallel.partitioner(mesh, rules):
        lowered = jitted.lower(state, batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    params = jax.tree.leaves(state.params)
    per_device_params = sum(
        math.prod(x.sharding.shard_shape(x.shape)) for x in params
    )  # parameter elements one device holds
    return dict(
        mesh=dict(mesh.shape),
        devices=jax.device_count(),
        accum=accum,
        global_batch=global_batch,
        rules=dict(rules),
        params=sum(math.prod(x.shape) for x in params),
        params_per_device=per_device_params,
        lower_s=lower_s,
        compile_s=compile_s,
        argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes,
        alias=memory.alias_size_in_bytes,
        temp=memory.temp_size_in_bytes,
        # XLA:CPU's own peak_memory_in_bytes counted the arguments only; the peak is derived as
        # arguments + outputs + temporaries - donated (aliased) bytes, as clip_sizing does.
    )


def count_flops() -> dict:
    """FLOPs of one sequence's forward + backward from the unscanned lowered program."""
    import jax
    import jax.numpy as jnp

    from jaxaigc.models.dalle import DALLE, DALLEConfig
    from jaxaigc.objectives.dalle import dalle_loss_fn

    result = {}
    for remat in ("none", "full"):
        config = DALLEConfig.from_name("paper-12b", scan_layers=False, remat_policy=remat)
        model = DALLE(config)
        text = jax.ShapeDtypeStruct((1, config.text_len), jnp.int32)
        image = jax.ShapeDtypeStruct((1, config.image_len), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), text, image)["params"]
        loss_fn = dalle_loss_fn(model)
        grad = jax.grad(lambda p, b, loss_fn=loss_fn: loss_fn(p, b, jax.random.key(0))[0])
        start = time.perf_counter()
        lowered = jax.jit(grad).lower(params, {"text": text, "image": image})
        result[f"flops_{remat}"] = lowered.cost_analysis()["flops"]
        result[f"lower_{remat}_s"] = time.perf_counter() - start
        result["params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        result["tokens"] = config.length
    return result


def run_child(mesh: str, accum: int, args, *, script: str = __file__, extra=()) -> dict:
    """Runs ``script --one mesh ... *extra`` with as many emulated devices as the mesh has; its
    last JSON line."""
    devices = math.prod(parse_mesh(mesh).values())
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    command = [
        sys.executable,
        script,
        "--one",
        mesh,
        "--accum",
        str(accum),
        "--global-batch",
        str(args.global_batch),
        *extra,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return dict(mesh=mesh, accum=accum, error=f"timed out after {args.timeout} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return dict(mesh=mesh, accum=accum, error=f"exit {done.returncode}: {' | '.join(tail)}")
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def markdown_row(r: dict, limit_gib: float) -> str:
    if "error" in r:
        return f"| {r['mesh']} | {r['accum']} | - | - | - | - | - | {r['error']} |"
    mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items() if size > 1)
    micro = r["global_batch"] // r["accum"] // (r["mesh"]["data"] * r["mesh"]["fsdp"])
    peak = r["argument"] + r["output"] + r["temp"] - r["alias"]
    fits = "yes" if peak <= limit_gib * GIB else "no"
    return (
        f"| {mesh} ({r['devices']}) | {r['accum']} ({micro}/device) | "
        f"{r['params_per_device'] / 1e9:.3f}B | {r['argument'] / GIB:.2f} | {r['temp'] / GIB:.2f}"
        f" | {peak / GIB:.2f} | {r['compile_s']:.0f} (+{r['lower_s']:.0f} lowering) "
        f"| {fits} |"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", default="fsdp=16 fsdp=32 fsdp=16,tensor=2 fsdp=64")
    parser.add_argument("--accum", default="1", help="comma-separated accumulation counts")
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mesh")
    parser.add_argument("--limit-gib", type=float, default=16.0)
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one mesh, prints JSON
    args = parser.parse_args()

    if args.one:
        result = size_one(parse_mesh(args.one), args.global_batch, int(args.accum))
        print(json.dumps(result), flush=True)
        return

    if args.flops:
        f = count_flops()
        six_n = 6 * f["params"]
        print(
            f"paper-12b: {f['params'] / 1e9:.3f}B parameters; forward + backward per token "
            f"(XLA cost analysis, unscanned, batch 1 x {f['tokens']} tokens): "
            f"{f['flops_none'] / f['tokens'] / 1e9:.1f} GFLOP without remat, "
            f"{f['flops_full'] / f['tokens'] / 1e9:.1f} GFLOP with full remat; 6N = "
            f"{six_n / 1e9:.1f} GFLOP (lowered in {f['lower_none_s'] + f['lower_full_s']:.0f} s)",
            flush=True,
        )
    print(
        f"\npaper-12b AdamW train step, global batch {args.global_batch}, bf16, scanned, full "
        f"remat; GiB per device (XLA:CPU memory_analysis); fits = peak <= {args.limit_gib} GiB\n"
    )
    print(
        "| mesh (devices) | accumulation (sequences/device/microbatch) | params/device | "
        "arguments | temporaries | peak | compile s | fits |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mesh in args.meshes.split():
        for accum in (int(a) for a in args.accum.split(",")):
            print(markdown_row(run_child(mesh, accum, args), args.limit_gib), flush=True)


if __name__ == "__main__":
    main()
