"""PPO's rollouts (Ouyang et al. 2022, section 3.5): one response per prompt sampled from the
policy with the KV cache (a key per row), scored by the frozen reward model at its EOS (or by a
host ``reward_fn``), and, for the update, the log-probs, entropy and values at every drawn token
recomputed by full forward passes. A batch of hundreds of prompts runs in chunks of its rows, one
after the other, with the same samples for any chunk count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.ppo import PPOConfig, token_entropy
from jaxaigc.objectives.reward import score_at_eos
from jaxaigc.sample.decode import generate, token_logprobs


def check_models(policy: GPTConfig, reward: GPTConfig, ppo: PPOConfig) -> None:
    """Raises a ValueError naming the mismatch if the policy, the reward model and ``ppo`` do
    not fit together."""
    if policy.head != "lm" or reward.head != "scalar":
        raise ValueError(
            f"the policy needs head='lm' (got {policy.head!r}), the reward model head='scalar' "
            f"(got {reward.head!r})"
        )
    if policy.vocab_size != reward.vocab_size:
        raise ValueError(
            f"the policy's vocabulary ({policy.vocab_size}) and the reward model's "
            f"({reward.vocab_size}) differ: they must share a tokenizer"
        )
    for name in ("eos_id", "pad_id"):
        if not 0 <= getattr(ppo, name) < policy.vocab_size:
            raise ValueError(
                f"{name} {getattr(ppo, name)} is outside the vocabulary of {policy.vocab_size}"
            )


def split_rows(tree: Any, count: int, order: jax.Array | None = None) -> Any:
    """[B, ...] -> [count, B / count, ...], rows in ``order`` (default: strided, as
    ``make_train_step``'s microbatches), each minibatch spread over the batch shards."""

    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"batch size {x.shape[0]} is not divisible into {count} parts")
        x = x if order is None else x[order]
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, tree)


def merge_rows(tree: Any) -> Any:
    """The inverse of :func:`split_rows` without an order: [count, B / count, ...] -> [B, ...]."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def make_sampler(
    policy_config: GPTConfig,
    reward_config: GPTConfig,
    ppo: PPOConfig,
    reward_fn: Callable[..., Any] | None,
) -> Callable:
    """``sample_and_score(params, prompt, prompt_valid, rows, *, evaluate) -> dict of [B, ...]``.

    One response per prompt from ``params["policy"]`` at the rollout's temperature, row ``i``
    drawn with the key ``rows[i]`` (``response``, ``mask``, the sampler's ``sampler_logprobs``),
    and its ``raw_score`` by ``params["reward"]`` (or ``reward_fn``), over ``ppo.rollout_chunks``
    chunks of the rows in turn (the same samples for any count). With ``evaluate`` also, at every
    drawn position, the policy's ``logprobs`` and ``entropy``, the ``ref_logprobs`` of
    ``params["reference"]`` and the ``values`` of ``params["value"]``, each recomputed by a full
    forward pass as the loss computes them.
    """
    policy, scorer = GPT(policy_config), GPT(reward_config)
    r = ppo.response_length

    def one_chunk(params, prompt, prompt_valid, rows, evaluate):
        samples = generate(
            policy_config,
            params["policy"],
            prompt,
            valid=prompt_valid,
            steps=r,
            rng=rows,
            temperature=ppo.temperature,
            top_k=ppo.top_k,
            top_p=ppo.top_p,
            eos_id=ppo.eos_id,
            pad_id=ppo.pad_id,
        )
        mask = samples.mask
        tokens = jnp.concatenate([prompt, samples.tokens], axis=1)
        valid = jnp.concatenate([prompt_valid, mask], axis=1)
        if reward_fn is None:
            scores = scorer.apply({"params": params["reward"]}, tokens, valid=valid)[:, -r:]
            raw = score_at_eos(scores, mask)
        else:
            raw = jax.pure_callback(
                lambda *arrays: reward_fn(*map(np.asarray, arrays)),
                jax.ShapeDtypeStruct(prompt.shape[:1], jnp.float32),
                prompt,
                prompt_valid,
                samples.tokens,
                mask,
            )
        out = {
            "response": samples.tokens,
            "mask": mask,
            "sampler_logprobs": samples.logprobs,
            "raw_score": raw,
        }
        if evaluate:

            def logits(pi_params):  # position t predicts token t + 1
                return policy.apply({"params": pi_params}, tokens, valid=valid)[:, -r - 1 : -1]

            current = logits(params["policy"])
            ref_logits = logits(params["reference"])
            values = scorer.apply({"params": params["value"]}, tokens, valid=valid)
            out |= {
                "logprobs": token_logprobs(current, samples.tokens, ppo.temperature),
                "entropy": token_entropy(current, ppo.temperature),
                "ref_logprobs": token_logprobs(ref_logits, samples.tokens, ppo.temperature),
                "values": values[:, -r - 1 : -1],
            }
        return out

    def sample_and_score(params, prompt, prompt_valid, rows, *, evaluate):
        if ppo.rollout_chunks == 1:
            return one_chunk(params, prompt, prompt_valid, rows, evaluate)
        # Strided chunks: each spreads over the batch shards as the whole batch does.
        chunks = split_rows((prompt, prompt_valid, rows), ppo.rollout_chunks)
        return merge_rows(jax.lax.map(lambda chunk: one_chunk(params, *chunk, evaluate), chunks))

    return sample_and_score


def score_samples(
    policy_config: GPTConfig,
    reward_config: GPTConfig,
    ppo: PPOConfig,
    *,
    params: dict[str, Any],
    prompt: jax.Array,
    prompt_valid: jax.Array,
    rng: jax.Array,
    reward_fn: Callable[..., Any] | None = None,
) -> dict[str, jax.Array]:
    """One response per prompt drawn from ``params["policy"]`` as a PPO rollout draws it (the
    same samples as a rollout with the row keys ``split(rng, B)``) and its scores: ``response``,
    ``mask``, ``sampler_logprobs``, the ``raw_score`` [B] by ``params["reward"]`` (or
    ``reward_fn``) before any normaliser (what
    :func:`~jaxaigc.objectives.ppo.fit_reward_normalizer` fits on, with the SFT policy), and with
    ``params["reference"]`` the ``kl`` [B], KL(policy || reference) per response in nats as PPO's
    penalty counts it."""
    check_models(policy_config, reward_config, ppo)
    if ("reward" in params) == (reward_fn is not None):
        raise ValueError("score_samples takes either params['reward'] or reward_fn (not both)")
    return _score_samples(
        params,
        jnp.asarray(prompt, jnp.int32),
        jnp.asarray(prompt_valid, bool),
        rng,
        configs=(policy_config, reward_config, ppo),
        reward_fn=reward_fn,
    )


@functools.partial(jax.jit, static_argnames=("configs", "reward_fn"))
def _score_samples(params, prompt, prompt_valid, rng, *, configs, reward_fn):
    policy_config, _, ppo = configs
    rows = jax.random.split(rng, prompt.shape[0])
    out = make_sampler(*configs, reward_fn)(params, prompt, prompt_valid, rows, evaluate=False)
    if "reference" in params:
        r = ppo.response_length
        tokens = jnp.concatenate([prompt, out["response"]], axis=1)
        valid = jnp.concatenate([prompt_valid, out["mask"]], axis=1)
        logits = GPT(policy_config).apply({"params": params["reference"]}, tokens, valid=valid)
        ref = token_logprobs(logits[:, -r - 1 : -1], out["response"], ppo.temperature)
        out["kl"] = jnp.where(out["mask"], out["sampler_logprobs"] - ref, 0.0).sum(1)
    return out
