"""Benchmark: RLHF rollouts and the PPO update, in one run.

    python experiments/bench/rlhf.py [--repeats 3] [--skip-gpt2]

1. Rollout tokens/s of the pipeline's policy: ``sample.decode.generate`` (prefill, then one token
   per step over the KV cache) against recomputing the whole sequence for every token.
2. Greedy generation with converted GPT-2-small weights (random, 124M, batch 8, 96 new tokens)
   against ``transformers``' ``generate()`` on the same CPU (issue 17's target: at most 0.8x).
3. One PPO minibatch update (policy and value forward, backward, AdamW) as a fraction of the fp32
   matmul ceiling measured in the same run (FLOPs from XLA's cost analysis).
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.benchmark import add_allocator_flag, matmul_ceiling, median_times, use_retaining_malloc
from jaxaigc.models.gpt import GPT
from jaxaigc.objectives.ppo import ppo_loss_fn
from jaxaigc.sample.decode import generate, token_logprobs
from jaxaigc.systems import instructgpt as ig
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import init_state
from jaxaigc.train.step import make_train_step


def _recompute_sampler(config, steps: int):
    """Greedy decoding without a cache: every step runs the model over the whole sequence."""
    model = GPT(config)

    @jax.jit
    def run(params, prompt, valid):
        b, p = prompt.shape
        tokens = jnp.concatenate([prompt, jnp.zeros((b, steps), jnp.int32)], 1)
        valid = jnp.concatenate([valid, jnp.zeros((b, steps), bool)], 1)

        def step(i, carry):
            tokens, valid = carry
            logits = model.apply({"params": params}, tokens, valid=valid)
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, 1, False), -1)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, token.astype(jnp.int32), p + i, 1)
            return tokens, jax.lax.dynamic_update_index_in_dim(valid, jnp.ones(b, bool), p + i, 1)

        return jax.lax.fori_loop(0, steps, step, (tokens, valid))[0][:, p:]

    return run


def rollouts(repeats: int) -> None:
    config = ig.get_config()
    policy = ig.policy_config(config)
    params = GPT(policy).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    prompts = ig.instructions.rl_prompts(32, seed=0)
    prompt, valid = ig.left_pad(
        [ig.prompt_bytes(p) for p in prompts],
        length=config.data.prompt_length,
        pad_id=ig.PAD,
        vocab_size=ig.VOCAB,
    )
    steps = config.data.response_length
    cached = functools.partial(
        generate,
        policy,
        params,
        prompt,
        valid=valid,
        steps=steps,
        rng=jax.random.key(0),
        temperature=0.0,
    )
    recompute = functools.partial(_recompute_sampler(policy, steps), params, prompt, valid)
    np.testing.assert_array_equal(cached().tokens, recompute())  # the same greedy tokens
    times = median_times(
        [lambda: jax.block_until_ready(cached()), lambda: jax.block_until_ready(recompute())],
        repeats,
    )
    tokens = len(prompts) * steps
    print(
        f"rollouts ({policy.width} wide, {policy.layers} layers, batch {len(prompts)}, prompt "
        f"{prompt.shape[1]}, {steps} new tokens): KV cache {tokens / times[0]:.0f} tokens/s, "
        f"recompute {tokens / times[1]:.0f} tokens/s ({times[1] / times[0]:.1f}x)"
    )


def gpt2_generate(repeats: int) -> None:
    import torch
    import transformers

    from jaxaigc.convert import gpt2_from_torch

    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    config, variables = gpt2_from_torch(reference.state_dict())
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)).astype(np.int32)
    ids = torch.tensor(prompt, dtype=torch.long)

    def ours():
        out = generate(
            config, variables["params"], prompt, steps=96, rng=jax.random.key(0), temperature=0.0
        )
        return jax.block_until_ready(out.tokens)

    def theirs():
        with torch.no_grad():
            return reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=96,
                min_new_tokens=96,
                do_sample=False,
                pad_token_id=0,
            )

    same = (np.asarray(ours()) == theirs()[:, 16:].numpy()).mean()
    times = median_times([ours, theirs], repeats)
    print(
        f"GPT-2 small greedy, batch 8, 96 new tokens: jax {times[0]:.2f} s, transformers "
        f"{times[1]:.2f} s ({times[0] / times[1]:.2f}x); {same:.1%} of the tokens equal "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )


def ppo_update(repeats: int) -> None:
    config = ig.get_config()
    policy, value = GPT(ig.policy_config(config)), GPT(ig.reward_config(config))
    ppo = ig.ppo_config(config)
    example = jnp.zeros((1, 8), jnp.int32)
    params = {
        "policy": policy.init(jax.random.key(0), example)["params"],
        "value": value.init(jax.random.key(1), example)["params"],
    }
    params = nn.meta.unbox(params)
    tx, _ = make_optimizer(peak_lr=1e-5, total_steps=100)
    state = init_state(lambda rng: {"params": params}, tx, jax.random.key(0), use_ema=False)
    b, p, r = 16, config.data.prompt_length, ppo.response_length
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (b, p + r)).astype(np.int32)
    logits = policy.apply({"params": params["policy"]}, tokens)
    batch = {
        "tokens": tokens,
        "valid": np.ones((b, p + r), bool),
        "mask": np.ones((b, r), bool),
        "old_logprobs": token_logprobs(logits[:, -r - 1 : -1], tokens[:, -r:], 1.0),
        "old_values": np.zeros((b, r), np.float32),
        "advantages": rng.normal(size=(b, r)).astype(np.float32),
        "returns": rng.normal(size=(b, r)).astype(np.float32),
    }
    update = jax.jit(make_train_step(ppo_loss_fn(policy, value, ppo), tx, rng=jax.random.key(0)))
    flops = update.lower(state, batch).compile().cost_analysis()["flops"]
    times = median_times([lambda: jax.block_until_ready(update(state, batch))], repeats)
    ceiling = matmul_ceiling()
    print(
        f"PPO update (policy + value, batch {b} x {p + r} tokens): {times[0] * 1e3:.0f} ms, "
        f"{flops / 1e9:.1f} GFLOP, {flops / times[0] / 1e9:.0f} GFLOP/s = "
        f"{flops / times[0] / ceiling:.2f} of the matmul ceiling ({ceiling / 1e9:.0f} GFLOP/s)"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gpt2", action="store_true", help="no transformers comparison")
    add_allocator_flag(parser)
    args = parser.parse_args()
    print(use_retaining_malloc(args.system_malloc))
    rollouts(args.repeats)
    if not args.skip_gpt2:
        gpt2_generate(args.repeats)
    ppo_update(args.repeats)


if __name__ == "__main__":
    main()
