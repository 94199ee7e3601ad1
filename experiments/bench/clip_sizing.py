"""Pod sizing of the CLIP presets without allocating them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python experiments/bench/clip_sizing.py [--models RN50,ViT-B/32] [--batch-per-device 64]

For each full-size preset: abstract parameters from ``jax.eval_shape`` (no array is allocated),
shardings from their logical names on an FSDP mesh over all devices, then ``encode_image`` and
``encode_text`` (jitted as ``jit_inference`` does) and a whole AdamW train step (``clip_loss_fn``:
InfoNCE over the global batch, BatchNorm statistics updated; jitted by ``jit_train_step``, as
training runs it) are lowered and compiled on ``jax.ShapeDtypeStruct`` inputs
(``jaxaigc.train.sizing``). Prints a markdown table of parameter counts, compile times and XLA's
per-device memory estimate of the train step.
The estimate comes from the CPU backend, which lays out buffers like the accelerator backends but
fuses differently: read it as an order of magnitude for a TPU/GPU pod.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from jaxaigc import parallel
from jaxaigc.models.clip import CLIP, PRESETS, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train import sizing
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step

FULL_PRESETS = [name for name in PRESETS if not name.startswith("tiny")]


def size_model(config: CLIPConfig, mesh, rules, global_batch: int) -> dict:
    """``sizing.size_train_step``'s figures of the train step, under ``"train_step"``, and
    ``sizing.size_inference``'s of each encoder, under its name."""
    model = CLIP(config)
    r = config.image_resolution

    def init(rng):  # inside eval_shape these zeros are abstract: nothing is allocated
        return model.init(rng, jnp.zeros((1, r, r, 3)), jnp.zeros((1, 1), jnp.int32))

    tx, _ = make_optimizer(peak_lr=5e-4, total_steps=10_000, weight_decay=0.2)
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    example = {"image": ((r, r, 3), jnp.float32), "tokens": ((config.context_length,), jnp.int32)}
    result = {
        "train_step": sizing.size_train_step(
            step, init, tx, example, mesh, rules, global_batch=global_batch
        )
    }
    _, _, state = create_sharded_state(init, tx, jax.random.key(0), mesh, rules, materialize=False)
    variables = {"params": state.params, **state.model_state}
    batch = sizing.abstract_batch(example, global_batch, mesh)
    for method, inputs in (("encode_image", batch["image"]), ("encode_text", batch["tokens"])):
        encode = functools.partial(model.apply, method=method)
        result[method] = sizing.size_inference(encode, (variables, inputs), mesh, rules)
    return result


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
        step, gib = r["train_step"], sizing.GIB
        print(
            f"| {name} | {step['params'] / 1e6:.1f}M | {r['encode_image']['compile_s']:.0f} / "
            f"{r['encode_text']['compile_s']:.0f} / {step['compile_s']:.0f} | "
            f"{step['argument'] / gib:.2f} | {step['temp'] / gib:.2f} | {step['peak'] / gib:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
