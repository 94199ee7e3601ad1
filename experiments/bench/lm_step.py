"""Benchmark: the generic train step on a small GPT, as a fraction of this machine's matmul ceiling.

    python experiments/bench/lm_step.py [--width 256 --layers 4 --context 128 --batch 16]

The ceiling is a large fp32 matmul measured in the same run; the step's FLOPs come from XLA's cost
analysis of the compiled step (forward, backward and AdamW), the one ``jit_train_step`` runs.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc import parallel
from jaxaigc.benchmark import matmul_ceiling
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    config = GPTConfig(
        vocab_size=256, context_length=args.context, width=args.width, layers=args.layers
    )
    model = GPT(config)
    mesh = parallel.make_mesh({"data": -1})
    rules = parallel.make_rules()
    tx, _ = make_optimizer(peak_lr=1e-3, total_steps=1000)
    state, shardings, _ = create_sharded_state(
        lambda rng: model.init(rng, jnp.zeros((1, args.context), jnp.int32)),
        tx,
        jax.random.key(0),
        mesh,
        rules,
    )
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.context + 1))
    batch = parallel.shard_batch({"tokens": tokens.astype(np.int32)}, mesh)
    step = make_train_step(lm_loss_fn(model), tx, rng=jax.random.key(1))
    run = jit_train_step(step, mesh, rules, shardings, batch)
    # XLA reports the FLOPs of one device's partition of the step.
    flops = run.lower(state, batch).compile().cost_analysis()["flops"] * jax.device_count()

    state, _ = run(state, batch)  # warm-up: the call reuses the compilation above
    times = []
    for _ in range(10):
        start = time.perf_counter()
        state, metrics = run(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    ceiling = matmul_ceiling()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"model: width {args.width}, layers {args.layers}, context {args.context}")
    print(f"batch {args.batch}: step {seconds * 1e3:.1f} ms, {flops / 1e9:.2f} GFLOP/step")
    print(f"step: {flops / seconds / 1e9:.1f} GFLOP/s; matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print(f"fraction of ceiling: {flops / seconds / ceiling:.2f}")


if __name__ == "__main__":
    main()
