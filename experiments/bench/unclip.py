"""Benchmark: the unCLIP decoder's UNet on this machine, and the paper presets' pod sizing.

    python experiments/bench/unclip.py [--parts step,sample,sizing] [--batch 8 --repeats 5]
        [--meshes "fsdp=8 fsdp=4,tensor=2"] [--accum 1,8] [--conv-in fsdp] [--unet-remat none]

``step``: one AdamW training step (``make_train_step(decoder_loss_fn(...))``, fp32, jitted by
``jit_train_step`` on one device) of a decoder at 64 px: the ``tiny`` preset's widths at
``--channels`` base channels, levels 64 / 32 / 16 / 8 px with attention at 16 and 8, its 2-layer
caption encoder, ``--batch`` images. ``sample``: a 50-step DDIM sample of ``--batch`` images at
guidance 3 (``sample_decoder``: every step runs the UNet on the conditional and unconditional
halves, a batch of 2b). Time is the median of interleaved repeats (``timing.median_times``);
FLOPs are XLA's cost analysis of the compiled step, and for the sampler 50 x that of one guided
UNet call (the analysis counts a scan's body once); the fraction is of the fp32 matmul ceiling
measured in the same run (``timing.matmul_ceiling``).

``sizing``: the ``paper-1b`` prior (global batch 4096, the paper's) and the ``paper-3.5b``
decoder at 64 px (global batch 2048) with the paper's AdamW settings, each train step lowered and
compiled as training jits it, on abstract inputs in a subprocess per emulated mesh
(``jaxaigc.train.sizing``: nothing is allocated); GiB per device from XLA:CPU's memory analysis
(an order of magnitude for a pod, as ``jaxaigc plan``). The default rules shard convolution
kernels on their output channels over ``tensor`` only, so on an fsdp-only mesh every UNet
convolution is replicated; ``--conv-in fsdp`` shards their input channels over fsdp too
(compiled with GSPMD: ``parallel.partitioner``, the Shardy workaround). ``--unet-remat`` replaces
the preset's UNet rematerialisation policy (``paper-3.5b``: "full"), to measure what it saves.
"""

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxaigc import parallel
from jaxaigc.benchmark import add_allocator_flag, matmul_ceiling, median_times, use_retaining_malloc
from jaxaigc.compile_options import jit_inference
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.objectives.unclip import decoder_loss_fn, prior_loss_fn
from jaxaigc.pipelines.unclip import decoder_init, prior_init
from jaxaigc.sample.diffusion import sample_decoder
from jaxaigc.train import sizing
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import TrainState
from jaxaigc.train.step import jit_train_step, make_train_step

SAMPLE_STEPS, GUIDANCE = 50, 3.0
# Table 3 of the paper (prior: AdamW 1.1e-4, b2 0.96, wd 6e-2, batch 4096; decoder: 1.2e-4,
# batch 2048) and its sizes.
PAPER = {
    "prior": dict(preset="paper-1b", peak_lr=1.1e-4, b2=0.96, weight_decay=6e-2, batch=4096),
    "decoder": dict(preset="paper-3.5b", peak_lr=1.2e-4, b2=0.999, weight_decay=0.0, batch=2048),
}


def bench_decoder(channels: int) -> DecoderConfig:
    return DecoderConfig.from_name(
        "tiny",
        image_size=64,
        model_channels=channels,
        channel_mult=(1, 2, 2, 2),
        attention_resolutions=(16, 8),
        groups=8,
    )


def decoder_inputs(config: DecoderConfig, b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((b, config.clip_dim)).astype(np.float32)
    r = config.image_size
    return {
        "image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
        "image_embedding": embedding / np.linalg.norm(embedding, axis=-1, keepdims=True),
        "text_tokens": rng.integers(1, config.text_vocab, (b, config.text_len)).astype(np.int32),
    }


def decoder_params(model: Decoder) -> dict:
    return nn.meta.unbox(jax.jit(decoder_init(model))(jax.random.key(0)))["params"]


def train_step_row(config: DecoderConfig, b: int, repeats: int, ceiling: float) -> dict:
    model, batch = Decoder(config), decoder_inputs(config, b)
    params = decoder_params(model)
    tx = optax.adamw(1e-4)
    state = TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params), {}, None)
    step = make_train_step(decoder_loss_fn(model, config.diffusion()), tx, rng=jax.random.key(1))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
    run = jit_train_step(step, mesh, parallel.make_rules(), replicated, batch)
    flops = sizing.compiled_figures(run.lower(state, batch).compile())["flops"]
    holder = {"state": state}  # each call donates the state it is given

    def one_step():
        holder["state"], metrics = run(holder["state"], batch)
        jax.block_until_ready(metrics)

    (seconds,) = median_times([one_step], repeats)
    return dict(part="train step", seconds=seconds, flops=flops, fraction=flops / seconds / ceiling)


def sample_row(config: DecoderConfig, b: int, repeats: int, ceiling: float) -> dict:
    model = Decoder(config)
    inputs = decoder_inputs(config, b)
    r = config.image_size
    params = decoder_params(model)
    z, text = inputs["image_embedding"], inputs["text_tokens"]
    sample = functools.partial(
        sample_decoder, model, params, config.diffusion(), z, jax.random.key(2), text=text,
        steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, method="ddim",
    )  # fmt: skip
    (seconds,) = median_times([lambda: jax.block_until_ready(sample())], repeats)
    # One guided UNet call: the conditional and unconditional halves as one batch of 2b.
    x = np.zeros((2 * b, r, r, 3), np.float32)
    t = np.zeros((2 * b,), np.int32)
    conditional = np.arange(2 * b) < b
    unet = jit_inference(
        lambda p, x, t, z, text, c: model.apply({"params": p}, x, t, z, text, conditional=c)
    )
    forward = unet.lower(
        params, x, t, np.concatenate([z, z]), np.concatenate([text, text]), conditional
    ).compile()
    flops = SAMPLE_STEPS * sizing.compiled_figures(forward)["flops"]
    return dict(
        part=f"DDIM {SAMPLE_STEPS} steps, guidance {GUIDANCE:g}",
        seconds=seconds,
        flops=flops,
        fraction=flops / seconds / ceiling,
    )


def size_one(
    model_name: str,
    mesh_spec: dict[str, int],
    global_batch: int,
    accum: int,
    rules: dict,
    unet_remat: str = "",
) -> dict:
    """Compiles the paper preset's train step on this process's (emulated) devices, with the
    default logical rules overridden by ``rules``."""
    paper = PAPER[model_name]
    tx, _ = make_optimizer(
        peak_lr=paper["peak_lr"], total_steps=1_000_000, warmup_steps=10_000, b2=paper["b2"],
        weight_decay=paper["weight_decay"],
    )  # fmt: skip
    f32 = jnp.float32
    if model_name == "prior":
        c = PriorConfig.from_name(paper["preset"])
        model, init, loss_fn = Prior(c), prior_init, prior_loss_fn
        example = {
            "text_tokens": ((c.text_len, c.text_width), f32),
            "text_mask": ((c.text_len,), jnp.bool_),
            "text_embedding": ((c.embed_dim,), f32),
            "image_embedding": ((c.embed_dim,), f32),
        }
    else:
        changes = {"unet_remat_policy": unet_remat} if unet_remat else {}
        c = DecoderConfig.from_name(paper["preset"], **changes)
        model, init, loss_fn = Decoder(c), decoder_init, decoder_loss_fn
        example = {
            "image": ((c.image_size, c.image_size, 3), f32),
            "image_embedding": ((c.clip_dim,), f32),
            "text_tokens": ((c.text_len,), jnp.int32),
        }
    step = make_train_step(
        loss_fn(model, c.diffusion()), tx, rng=jax.random.key(1), accum_steps=accum
    )
    result = sizing.size_train_step(
        step, init(model), tx, example, parallel.make_mesh(mesh_spec), parallel.make_rules(rules),
        global_batch=global_batch,
    )  # fmt: skip
    return {**result, "accum": accum, "model": paper["preset"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="step,sample,sizing")
    parser.add_argument("--batch", type=int, default=8, help="images per step / sample")
    parser.add_argument("--channels", type=int, default=64, help="the bench decoder's base width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meshes", default="fsdp=8 fsdp=4,tensor=2")
    parser.add_argument("--accum", default="8", help="comma-separated accumulation counts")
    parser.add_argument("--models", default="prior,decoder")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    parser.add_argument("--limit-gib", type=float, default=16.0)
    parser.add_argument(
        "--conv-in", default="", help="mesh axis for convolution input channels (default: none)"
    )
    parser.add_argument("--unet-remat", default="", help="the decoder's UNet remat policy")
    parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)  # child
    parser.add_argument("--model", help=argparse.SUPPRESS)  # child: prior or decoder
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one mesh, prints JSON
    add_allocator_flag(parser)
    args = parser.parse_args()

    rules = {"conv_in": args.conv_in} if args.conv_in else {}
    if args.one:
        result = size_one(
            args.model, sizing.parse_mesh(args.one), args.global_batch, int(args.accum),
            rules, args.unet_remat,
        )  # fmt: skip
        print(json.dumps(result), flush=True)
        return

    parts = args.parts.split(",")
    if {"step", "sample"} & set(parts):
        allocator = use_retaining_malloc(args.system_malloc)
        config = bench_decoder(args.channels)
        start = time.perf_counter()
        ceiling = matmul_ceiling()
        print(
            f"fp32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s ({jax.device_count()} device, "
            f"{allocator}); decoder at 64 px, {args.channels} base channels "
            f"(x {config.channel_mult}), batch {args.batch}\n"
        )
        print("| part | ms | GFLOP | fraction of the matmul ceiling |")
        print("|---|---|---|---|")
        rows = {"step": train_step_row, "sample": sample_row}
        for part in ("step", "sample"):
            if part in parts:
                r = rows[part](config, args.batch, args.repeats, ceiling)
                print(
                    f"| {r['part']} | {r['seconds'] * 1e3:.0f} | {r['flops'] / 1e9:.1f} | "
                    f"{r['fraction']:.2f} |",
                    flush=True,
                )
        print(f"({time.perf_counter() - start:.0f} s)")

    if "sizing" in parts:
        print(
            f"\nPaper presets' AdamW train steps, GiB per device (XLA:CPU memory_analysis); fits "
            f"= peak <= {args.limit_gib} GiB; rule overrides {rules or 'none'}; UNet remat "
            f"{args.unet_remat or 'as the preset'}\n"
        )
        print(
            "| model | mesh (devices) | accumulation (examples/device/microbatch) | "
            "params/device | arguments | temporaries | peak | compile s | fits |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            args.global_batch = PAPER[name]["batch"]
            for mesh in args.meshes.split():
                for accum in (int(a) for a in args.accum.split(",")):
                    extra = ("--model", name, "--conv-in", args.conv_in)
                    extra += ("--unet-remat", args.unet_remat)
                    r = sizing.run_child(
                        __file__, mesh, accum=accum, global_batch=args.global_batch,
                        timeout=args.timeout, extra=extra,
                    )  # fmt: skip
                    row = sizing.markdown_row(r, args.limit_gib)
                    print(f"| {PAPER[name]['preset']} {row}", flush=True)


if __name__ == "__main__":
    main()
