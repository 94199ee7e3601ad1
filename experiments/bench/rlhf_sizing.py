"""Pod sizing of one PPO-ptx iteration for a GPT-3 1.3B-shaped policy without allocating it.

    python experiments/bench/rlhf_sizing.py [--meshes "fsdp=8 fsdp=32"] [--global-batch 256]
        [--policy gpt3-1.3b] [--reward gpt3-1.3b] [--prompt-length 512] [--response-length 256]

For each mesh a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` lowers and
compiles the whole PPO iteration the loop jits (``make_ppo_task(...).make_step``: KV-cache
rollout of ``--response-length`` tokens per prompt, reference / value / reward scoring, GAE, then
``--minibatches`` AdamW updates of policy + value with the pretraining-mix term on
``--ptx-length``-token corpus rows) on abstract inputs, jitted by ``jit_train_step`` as the loop
jits it (``jaxaigc.train.sizing.size_train_step``).
The state holds the trained policy and value model (the value model has the reward model's
shape), their Adam moments, and the frozen SFT reference and reward model. Prints a markdown row
per mesh: XLA's per-device memory (arguments, temporaries, peak) and compile seconds. As for
``dalle_sizing``, XLA:CPU's figures are an order of magnitude for an accelerator, not a promise.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxaigc import parallel
from jaxaigc.models.gpt import GPTConfig
from jaxaigc.objectives.ppo import PPOConfig
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.ppo import make_ppo_task
from jaxaigc.train.sizing import markdown_row, parse_mesh, run_child, size_train_step


def size_one(mesh_spec: dict[str, int], args) -> dict:
    """Compiles the PPO iteration on this process's (emulated) devices."""
    policy = GPTConfig.from_name(args.policy)
    reward = GPTConfig.from_name(args.reward, head="scalar")
    ppo = PPOConfig(
        response_length=args.response_length,
        eos_id=50256,  # GPT-2's <|endoftext|>
        pad_id=50256,
        minibatches=args.minibatches,
        gamma_ptx=27.8,  # the paper's PPO-ptx
    )
    task = make_ppo_task(policy, reward, ppo)
    # The paper's PPO optimizer for 1.3B (App. C.4): Adam (0.9, 0.95), lr 9.65e-6, clipping at 1.
    tx, _ = make_optimizer(
        peak_lr=9.65e-6,
        total_steps=256_000 // args.global_batch,
        warmup_steps=10,
        b1=0.9,
        b2=0.95,
        weight_decay=0.0,
        clip_norm=1.0,
    )
    example = {
        "prompt": ((args.prompt_length,), jnp.int32),
        "prompt_valid": ((args.prompt_length,), jnp.bool_),
        "ptx": ((args.ptx_length,), jnp.int32),
        "ptx_weights": ((args.ptx_length - 1,), jnp.float32),
    }
    result = size_train_step(
        task.make_step(tx, rng=jax.random.key(1)),
        task.init,
        tx,
        example,
        parallel.make_mesh(mesh_spec),
        parallel.make_rules(),
        global_batch=args.global_batch,
    )
    return {**result, "accum": 1}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", default="fsdp=8 fsdp=32")
    parser.add_argument("--global-batch", type=int, default=256, help="prompts per iteration")
    parser.add_argument("--minibatches", type=int, default=8, help="PPO updates per iteration")
    parser.add_argument("--policy", default="gpt3-1.3b")
    parser.add_argument("--reward", default="gpt3-1.3b", help="reward (and value) model preset")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--ptx-length", type=int, default=2048)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mesh")
    parser.add_argument("--limit-gib", type=float, default=80.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one mesh, prints JSON
    parser.add_argument("--accum", default="1", help=argparse.SUPPRESS)  # run_child passes it
    args = parser.parse_args()

    if args.one:
        print(json.dumps(size_one(parse_mesh(args.one), args)), flush=True)
        return

    print(
        f"\nPPO-ptx iteration: policy {args.policy}, reference, value and reward {args.reward}; "
        f"{args.global_batch} prompts of {args.prompt_length} tokens, {args.response_length} "
        f"sampled, {args.minibatches} minibatch updates, ptx rows of {args.ptx_length}; GiB per "
        f"device (XLA:CPU memory_analysis); fits = peak <= {args.limit_gib} GiB\n"
    )
    print(
        "| mesh (devices) | accumulation (prompts/device) | trained params/device (policy + "
        "value) | arguments | temporaries | peak | compile s | fits |"
    )
    print("|---|---|---|---|---|---|---|---|")
    extra = [
        f"--{name}={value}"
        for name, value in (
            ("minibatches", args.minibatches),
            ("policy", args.policy),
            ("reward", args.reward),
            ("prompt-length", args.prompt_length),
            ("response-length", args.response_length),
            ("ptx-length", args.ptx_length),
        )
    ]
    for mesh in args.meshes.split():
        row = run_child(
            __file__,
            mesh,
            accum=1,
            global_batch=args.global_batch,
            timeout=args.timeout,
            extra=extra,
        )
        print(markdown_row(row, args.limit_gib), flush=True)


if __name__ == "__main__":
    main()
