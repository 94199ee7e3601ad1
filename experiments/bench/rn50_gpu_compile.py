"""Compile time and step time of CLIP RN50's training step with XLA's default GPU options and with
``compile_options.GPU_TRAINING_OPTIONS`` (autotune level 1), one set per process so that a compile
that runs away costs only its own ``timeout``:

    timeout 300 python experiments/bench/rn50_gpu_compile.py --options library
    timeout 300 python experiments/bench/rn50_gpu_compile.py --options default

Each prints one JSON line: the options, the seconds to lower and to compile, and the median of
``--steps`` steps after one warm-up (bf16 compute, fp32 parameters, AdamW, batch ``--batch``).
On CPU, ``--model tiny-rn --batch 4`` checks that it runs.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxaigc import parallel
from jaxaigc.benchmark import clip_inputs
from jaxaigc.compile_options import GPU_TRAINING_OPTIONS
from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train.state import init_state
from jaxaigc.train.step import jit_train_step, make_train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", choices=["library", "default"], required=True)
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config = CLIPConfig.from_name(args.model, dtype="bfloat16")
    model = CLIP(config)
    images, tokens = clip_inputs(config, args.batch)
    batch = jax.device_put({"image": images, "tokens": tokens})
    tx = optax.adamw(1e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2)
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    state = init_state(
        lambda rng: nn.meta.unbox(model.init(rng, images[:1], tokens[:1])),
        tx,
        jax.random.key(0),
        use_ema=False,
    )
    mesh = parallel.make_mesh({"data": -1})
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
    options = GPU_TRAINING_OPTIONS if args.options == "library" else {}
    run = jit_train_step(
        step, mesh, parallel.make_rules(), replicated, batch, compiler_options=options
    )

    start = time.perf_counter()
    lowered = run.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()  # calls to run reuse this compilation
    compiled_at = time.perf_counter()

    state, metrics = run(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        state, metrics = run(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    row = dict(
        model=args.model,
        batch=args.batch,
        device=jax.devices()[0].device_kind,
        options=options,
        lower_s=round(lowered_at - start, 2),
        compile_s=round(compiled_at - lowered_at, 2),
        step_ms=round(float(np.median(times)) * 1e3, 2),
        loss=float(jnp.asarray(metrics["train/loss"])),
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
