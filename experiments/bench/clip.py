"""Benchmark: CLIP image encoding and a full training step, jaxaigc against OpenAI's PyTorch
``clip/model.py`` on this machine, in one run.

    python experiments/bench/clip.py [--models ViT-B/32,RN50 --batch 16 --repeats 3 --system-malloc]
    python experiments/bench/clip.py --batch 256 --repeats 20 --dtype bfloat16   # on a GPU

Both frameworks get the same random fp32 weights (converted with ``clip_from_torch``) and the same
batch of 224 px images and 77-token texts, on JAX's default backend (PyTorch on CUDA when that is a
GPU). With ``--dtype bfloat16`` both compute in bf16 with fp32 parameters and optimizer state (the
model's ``dtype``; ``torch.autocast`` for PyTorch). Rows: ``encode_image`` (inference; BatchNorm
on running statistics), jitted by ``jit_inference``, and a training step (both encoders, symmetric
InfoNCE, backward, AdamW; BatchNorm on batch statistics), jitted by ``jit_train_step``: each with
the library's XLA:CPU options and, on CPU, with XLA's defaults for comparison. Times are medians
of interleaved repeats after a warm-up, with ``timing.RETAINING_MALLOC`` unless
``--system-malloc``; FLOPs come from XLA:CPU's cost analysis of the lowered program; the ceiling is
the best jitted matmul in the compute dtype (4096^3 on CPU, 8192^3 on GPU), measured before and
after the models.
"""

import argparse
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxaigc import parallel
from jaxaigc.benchmark import (
    add_allocator_flag,
    clip_inputs,
    huge_page_megabytes,
    matmul_ceiling,
    median_times,
    openai_clip_module,
    openai_clip_step,
    use_retaining_malloc,
)
from jaxaigc.compile_options import jit_inference
from jaxaigc.convert.clip import clip_from_torch, openai_constructor_args
from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train.state import init_state
from jaxaigc.train.step import jit_train_step, make_train_step


def cpu_flops(fn, *args) -> float:
    """FLOPs of ``fn`` by XLA:CPU's cost analysis of the lowered program (GPU backends give none,
    or none for cuDNN convolutions); the count is the same on every platform."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
        lowered = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",))
    cost = lowered.cost_analysis()
    return cost["flops"] if cost else float("nan")


def bench(name: str, batch: int, repeats: int, dtype: str, settle: float, openai) -> list[dict]:
    import torch

    on_cpu = jax.default_backend() == "cpu"
    device = "cpu" if on_cpu else "cuda"
    config = CLIPConfig.from_name(name, dtype=dtype)
    torch.manual_seed(0)
    t_model = openai.CLIP(*openai_constructor_args(config))
    _, variables = clip_from_torch(t_model.state_dict())
    t_model.to(device)
    model = CLIP(config)
    images, tokens = clip_inputs(config, batch)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    t_tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)
    variables, images, tokens = jax.device_put((variables, images, tokens))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def autocast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=getattr(torch, dtype))

    # Inference, with the library's XLA:CPU inference options and with XLA's defaults.
    def encode(v, x):
        return model.apply(v, x, method="encode_image")

    tuned_encode = jit_inference(encode).lower(variables, images).compile()
    default_encode = jax.jit(encode)
    encode_flops = cpu_flops(encode, variables, images)

    def torch_encode():
        t_model.eval()
        with torch.no_grad(), autocast():
            t_model.encode_image(t_images)
        sync()

    # Training step: the library's step and jit (AdamW with torch's hyperparameters), once with its
    # XLA:CPU options (``compile_options.CPU_TRAINING_OPTIONS``) and once with XLA's defaults.
    tx = optax.adamw(1e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2)
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    batch_arrays = {"image": images, "tokens": tokens}
    mesh = parallel.make_mesh({"data": -1})
    state = init_state(lambda _: variables, tx, jax.random.key(0), use_ema=False)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
    step_flops = cpu_flops(step, state, batch_arrays)

    def timed_step(compiler_options):
        run = jit_train_step(
            step, mesh, parallel.make_rules(), replicated, batch_arrays,
            compiler_options=compiler_options,
        )  # fmt: skip
        holder = {"state": jax.tree.map(jnp.copy, state)}  # each jit donates its own copy

        def jax_step():
            holder["state"], metrics = run(holder["state"], batch_arrays)
            jax.block_until_ready(metrics)

        return jax_step

    optimizer = torch.optim.AdamW(
        t_model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2
    )
    torch_step = openai_clip_step(torch, t_model, t_images, t_tokens, optimizer, autocast, sync)

    encode_rows = {"encode_image": lambda: jax.block_until_ready(tuned_encode(variables, images))}
    step_rows = {"train step": timed_step(None)}
    if on_cpu:  # the library's options are CPU-only: elsewhere its rows are XLA's defaults
        encode_rows["encode_image, XLA defaults"] = lambda: jax.block_until_ready(
            default_encode(variables, images)
        )
        step_rows["train step, XLA defaults"] = timed_step({})

    rows = []
    for jax_rows, torch_fn, flops in [
        (encode_rows, torch_encode, encode_flops),
        (step_rows, torch_step, step_flops),
    ]:
        *jax_times, torch_s = median_times([*jax_rows.values(), torch_fn], repeats, settle)
        for row, jax_s in zip(jax_rows, jax_times, strict=True):
            rows.append(dict(model=name, row=row, flops=flops, jax_s=jax_s, torch_s=torch_s))
            print(
                f"{name} {row}: {flops / 1e9:.0f} GFLOP, jax {jax_s * 1e3:.1f} ms, "
                f"torch {torch_s * 1e3:.1f} ms",
                flush=True,
            )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="ViT-B/32,RN50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--settle", type=float, default=None, help="seconds between turns (default: 1 on CPU, 0)"
    )
    add_allocator_flag(parser)
    args = parser.parse_args()
    allocator = use_retaining_malloc(args.system_malloc)

    import torch

    torch.set_num_threads(args.threads)
    openai = openai_clip_module()
    on_cpu = jax.default_backend() == "cpu"
    settle = args.settle if args.settle is not None else (1.0 if on_cpu else 0.0)

    def ceiling_now() -> float:
        return matmul_ceiling(4096 if on_cpu else 8192, dtype=jnp.dtype(args.dtype))

    ceiling = ceiling_now()
    # Printed now as well: a run stopped at its time limit still gives its rows a denominator.
    print(f"matmul ceiling before the models {ceiling / 1e9:.1f} GFLOP/s", flush=True)
    rows = [
        r
        for name in args.models.split(",")
        for r in bench(name, args.batch, args.repeats, args.dtype, settle, openai)
    ]
    ceiling = max(ceiling, ceiling_now())

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"jax devices: {device}; torch {torch.__version__} with {args.threads} threads")
    print(f"batch {args.batch}, {args.dtype}; matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print(f"allocator: {allocator}; {huge_page_megabytes()} MB in huge pages at the end")
    print("| model | row | GFLOP | jax ms | torch ms | jax/torch | jax/ceiling | torch/ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['row']} | {r['flops'] / 1e9:.0f} | {r['jax_s'] * 1e3:.0f} | "
            f"{r['torch_s'] * 1e3:.0f} | {r['jax_s'] / r['torch_s']:.2f} | "
            f"{r['flops'] / r['jax_s'] / ceiling:.2f} | {r['flops'] / r['torch_s'] / ceiling:.2f} |"
        )


if __name__ == "__main__":
    main()
