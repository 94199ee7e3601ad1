"""Pod sizing of DALL-E's 12B transformer (``paper-12b``) without allocating it.

    python experiments/bench/dalle_sizing.py [--meshes "fsdp=16 fsdp=32 fsdp=16,tensor=2"]
        [--accum 1,4,16] [--global-batch 512] [--timeout 1800] [--flops]

For each mesh (and gradient-accumulation count) a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` builds the abstract train state with
``create_sharded_state(..., materialize=False)`` (``jax.eval_shape``: no parameter is allocated;
shardings from the logical names and ``parallel.make_rules()``), then lowers and compiles the
whole AdamW train step (``make_train_step(dalle_loss_fn(model), ...)`` as ``jit_train_step`` jits
it for training: ``jaxaigc.train.sizing.size_train_step``) for a global batch of
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
import time

import jax
import jax.numpy as jnp

from jaxaigc import parallel
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.objectives.dalle import dalle_loss_fn
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.sizing import markdown_row, parse_mesh, run_child, size_train_step
from jaxaigc.train.step import make_train_step


def paper_optimizer():
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
    config = DALLEConfig.from_name("paper-12b")
    model = DALLE(config)
    tx = paper_optimizer()
    step = make_train_step(dalle_loss_fn(model), tx, rng=jax.random.key(1), accum_steps=accum)
    result = size_train_step(
        step,
        # Inside eval_shape these zeros are abstract: nothing is allocated.
        lambda rng: model.init(
            rng,
            jnp.zeros((1, config.text_len), jnp.int32),
            jnp.zeros((1, config.image_len), jnp.int32),
        ),
        tx,
        {"text": ((config.text_len,), jnp.int32), "image": ((config.image_len,), jnp.int32)},
        parallel.make_mesh(mesh_spec),
        parallel.make_rules(),
        global_batch=global_batch,
    )
    return {**result, "accum": accum}


def count_flops() -> dict:
    """FLOPs of one sequence's forward + backward from the unscanned lowered program."""
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
            r = run_child(
                __file__, mesh, accum=accum, global_batch=args.global_batch, timeout=args.timeout
            )
            print(markdown_row(r, args.limit_gib), flush=True)


if __name__ == "__main__":
    main()
