"""Pod sizing of the CLIP presets without allocating them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python experiments/bench/clip_sizing.py [--models RN50,ViT-B/32] [--batch-per-device 64]

For each full-size preset: abstract parameters from ``jax.eval_shape`` (no array is allocated),
shardings from their logical names on an FSDP mesh over all devices, then ``encode_image``,
``encode_text`` and a whole AdamW train step (``clip_loss_fn``: InfoNCE over the global batch,
BatchNorm statistics updated) are lowered and compiled on ``jax.ShapeDtypeStruct`` inputs.
Prints a markdown table of parameter counts, compile times and XLA's per-device memory estimate
of the train step.
The estimate comes from the CPU backend, which lays out buffers like the accelerator backends but
fuses differently: read it as an order of magnitude for a TPU/GPU pod.
"""

from __future__ import annotations

import argparse
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc import parallel
from jaxaigc.models.clip import CLIP, PRESETS, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step

FULL_PRESETS = [name for name in PRESETS if not name.startswith("tiny")]
GIB = 2**30


def size_model(config: CLIPConfig, mesh, rules, global_batch: int) -> dict:
    """Parameter count, compile seconds and per-device bytes of the compiled functions."""
    model = CLIP(config)
    r = config.image_resolution
    tx, _ = make_optimizer(peak_lr=5e-4, total_steps=10_000, weight_decay=0.2)
    _, shardings, state = create_sharded_state(
        # Inside eval_shape these zeros are abstract: nothing is allocated.
        lambda rng: model.init(rng, jnp.zeros((1, r, r, 3)), jnp.zeros((1, 1), jnp.int32)),
        tx,
        jax.random.key(0),
        mesh,
        rules,
        materialize=False,
    )
    batch = {
        "image": jax.ShapeDtypeStruct(
            (global_batch, r, r, 3), jnp.float32, sharding=parallel.batch_sharding(mesh, 4)
        ),
        "tokens": jax.ShapeDtypeStruct(
            (global_batch, config.context_length),
            jnp.int32,
            sharding=parallel.batch_sharding(mesh, 2),
        ),
    }
    variables = {"params": state.params, **state.model_state}
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )

    def with_rules(fn):
        def wrapped(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)

        return wrapped

    functions = {
        "encode_image": (
            jax.jit(with_rules(lambda v, x: model.apply(v, x, method="encode_image"))),
            (variables, batch["image"]),
        ),
        "encode_text": (
            jax.jit(with_rules(lambda v, t: model.apply(v, t, method="encode_text"))),
            (variables, batch["tokens"]),
        ),
        "train_step": (
            jax.jit(with_rules(step), out_shardings=(shardings, None), donate_argnums=(0,)),
            (state, batch),
        ),
    }
    result = {"params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))}
    with jax.set_mesh(mesh):
        for name, (fn, args) in functions.items():
            start = time.perf_counter()
            compiled = fn.lower(*args).compile()
            result[f"{name}_compile_s"] = time.perf_counter() - start
            result[f"{name}_memory"] = compiled.memory_analysis()
    return result


def peak_bytes(memory) -> int:
    """Arguments + outputs + temporaries, less the donated (aliased) buffers."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(FULL_PRESETS))
    parser.add_argument("--batch-per-device", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()

    mesh = parallel.make_mesh({"fsdp": -1})
    # Shard convolution kernels along their input channels too: the ResNet's parameters are
    # mostly convolutions, which the default rules (conv_out -> tensor only) leave replicated.
    rules = parallel.make_rules({"conv_in": "fsdp"})
    global_batch = args.batch_per_device * jax.device_count()
    print(
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, "
        f"global batch {global_batch}, compute {args.dtype}, remat {args.remat}, scanned layers\n"
    )
    print(
        "| model | params | compile s (image / text / step) | step GiB/device: args | temps "
        "| peak |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        config = CLIPConfig.from_name(
            name, dtype=args.dtype, remat_policy=args.remat, scan_layers=True
        )
        r = size_model(config, mesh, rules, global_batch)
        step = r["train_step_memory"]
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['encode_image_compile_s']:.0f} / "
            f"{r['encode_text_compile_s']:.0f} / {r['train_step_compile_s']:.0f} | "
            f"{step.argument_size_in_bytes / GIB:.2f} | {step.temp_size_in_bytes / GIB:.2f} | "
            f"{peak_bytes(step) / GIB:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
