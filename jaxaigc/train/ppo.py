"""One PPO-ptx iteration as one step of the generic training loop (Ouyang et al. 2022, section 3.5).

A step takes a batch of left-padded prompts (and as many pretraining rows for the ptx term), and
in one jitted program: samples a response per prompt from the policy with the KV cache (a fresh
key per row and iteration), scores the sequences with the frozen reward model at each EOS and
with the frozen SFT reference and the value model at every token, turns the per-token KL penalty
and the score into GAE advantages, then runs ``epochs`` passes of ``minibatches`` PPO updates
(each :func:`~jaxaigc.train.step.make_train_step`'s update of
:func:`~jaxaigc.objectives.ppo.ppo_loss_fn`). The ``TrainState`` holds ``params = {"policy",
"value"}`` (trained together by one optimizer) and ``model_state = {"frozen": {"reference",
"reward"}, "kl": {"beta"}}``, so checkpoints, resume, SIGTERM, metrics and sharding are the
loop's; ``state.step`` counts updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.ppo import (
    PPOConfig,
    adaptive_kl_beta,
    gae,
    kl_penalty_rewards,
    ppo_loss_fn,
    whiten,
)
from jaxaigc.objectives.reward import score_at_eos
from jaxaigc.sample.decode import generate, token_logprobs
from jaxaigc.train.loop import Task
from jaxaigc.train.step import make_train_step


def _check_models(policy: GPTConfig, reward: GPTConfig, ppo: PPOConfig) -> None:
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


def load_params(boxed: Any, params: Any | None, name: str) -> Any:
    """``boxed`` (logically annotated) with the values of ``params``, whose shapes must match."""
    if params is None:
        return boxed
    unboxed = nn.meta.unbox(boxed)
    if jax.tree.structure(unboxed) != jax.tree.structure(params):
        raise ValueError(f"the {name} parameters do not have the {name} config's structure")
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(unboxed), jax.tree.leaves(params), strict=True
    ):
        if jnp.shape(want) != jnp.shape(got):
            raise ValueError(
                f"the {name} parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(got)}; "
                f"the {name} config (width, vocabulary, context) expects {jnp.shape(want)}"
            )
    return jax.tree.map(
        lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
        boxed,
        params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def _minibatches(tree: Any, count: int, order: jax.Array | None = None) -> Any:
    """[B, ...] -> [count, B / count, ...], rows in ``order`` (default: strided, as
    ``make_train_step``'s microbatches), each minibatch spread over the batch shards."""

    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {count} minibatches")
        x = x if order is None else x[order]
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, tree)


def make_ppo_task(
    policy_config: GPTConfig,
    reward_config: GPTConfig,
    ppo: PPOConfig,
    *,
    policy_params: Any | None = None,
    reward_params: Any | None = None,
    reward_fn: Callable[..., Any] | None = None,
) -> Task:
    """The :class:`~jaxaigc.train.loop.Task` of PPO(-ptx) for ``train.loop.train``.

    The policy and the frozen reference start from ``policy_params`` (the SFT model), the value
    model and the frozen reward model from ``reward_params`` (the trained RM; the value model has
    its architecture); None initialises randomly (tests). Batches: ``prompt`` int32 [B, p] and
    ``prompt_valid`` bool [B, p], left-padded (:func:`jaxaigc.objectives.sft.left_pad`); with
    ``gamma_ptx`` also ``ptx`` int32 [B, l] and ``ptx_weights`` [B, l - 1]. B must divide by
    ``minibatches``.

    ``reward_fn(prompt, prompt_valid, response, mask) -> float32 [B]``, a host function of numpy
    arrays called through ``jax.pure_callback``, scores the rollouts in place of the reward model
    (e.g. a programmatic gold scorer: the most any reward model can give PPO); the value model
    still starts from ``reward_params``.
    """
    _check_models(policy_config, reward_config, ppo)
    policy, scorer = GPT(policy_config), GPT(reward_config)
    loss_fn = ppo_loss_fn(policy, scorer, ppo)

    def init(rng: jax.Array) -> dict:
        policy_rng, reward_rng = jax.random.split(rng)
        example = jnp.zeros((1, policy_config.context_length), jnp.int32)
        pi = load_params(policy.init(policy_rng, example)["params"], policy_params, "policy")
        example = jnp.zeros((1, reward_config.context_length), jnp.int32)
        rm = load_params(scorer.init(reward_rng, example)["params"], reward_params, "reward")
        return {
            "params": {"policy": pi, "value": rm},  # the value model starts as the RM
            "frozen": {"reference": pi, "reward": rm},
            "kl": {"beta": jnp.asarray(ppo.kl_coef, jnp.float32)},
        }

    def make_step(tx, *, rng: jax.Array, schedule=None):
        update_rng, rollout_rng, shuffle_rng = jax.random.split(rng, 3)
        update = make_train_step(loss_fn, tx, rng=update_rng, schedule=schedule)

        def step(state, batch):
            prompt, prompt_valid = batch["prompt"], batch["prompt_valid"]
            total = prompt.shape[1] + ppo.response_length
            for name, config in (("policy", policy_config), ("reward model", reward_config)):
                if total > config.context_length:
                    raise ValueError(
                        f"prompt length {prompt.shape[1]} + response length "
                        f"{ppo.response_length} exceeds the {name}'s context "
                        f"{config.context_length}"
                    )
            rollouts, metrics = _rollout(state, prompt, prompt_valid, rollout_rng)
            ptx = {k: batch[k] for k in ("ptx", "ptx_weights") if ppo.gamma_ptx}

            def epoch(state, index):
                key = jax.random.fold_in(jax.random.fold_in(shuffle_rng, state.step), index)
                order = jax.random.permutation(key, prompt.shape[0])
                minibatches = _minibatches(rollouts, ppo.minibatches, order)
                minibatches |= _minibatches(ptx, ppo.minibatches)
                return jax.lax.scan(update, state, minibatches)

            state, updates = jax.lax.scan(epoch, state, jnp.arange(ppo.epochs))
            metrics |= jax.tree.map(jnp.mean, updates)
            beta = state.model_state["kl"]["beta"]
            if ppo.kl_target is not None:
                beta = adaptive_kl_beta(
                    beta,
                    metrics["rollout/kl"],
                    target=ppo.kl_target,
                    horizon=ppo.kl_horizon,
                    n_steps=prompt.shape[0],
                )
            state = state.replace(model_state={**state.model_state, "kl": {"beta": beta}})
            return state, metrics

        def _rollout(state, prompt, prompt_valid, key):
            """Samples, scores and advantages of one batch of prompts (no gradients)."""
            params, frozen = state.params, state.model_state["frozen"]
            beta = state.model_state["kl"]["beta"]
            rows = jax.random.split(jax.random.fold_in(key, state.step), prompt.shape[0])
            samples = generate(
                policy_config,
                params["policy"],
                prompt,
                valid=prompt_valid,
                steps=ppo.response_length,
                rng=rows,
                temperature=ppo.temperature,
                top_k=ppo.top_k,
                top_p=ppo.top_p,
                eos_id=ppo.eos_id,
                pad_id=ppo.pad_id,
            )
            mask, r = samples.mask, ppo.response_length
            tokens = jnp.concatenate([prompt, samples.tokens], axis=1)
            valid = jnp.concatenate([prompt_valid, mask], axis=1)

            def logprobs(pi_params):  # recomputed, as the loss computes them
                logits = policy.apply({"params": pi_params}, tokens, valid=valid)
                return token_logprobs(logits[:, -r - 1 : -1], samples.tokens, ppo.temperature)

            old_logprobs = logprobs(params["policy"])
            ref_logprobs = logprobs(frozen["reference"])
            values = scorer.apply({"params": params["value"]}, tokens, valid=valid)[:, -r - 1 : -1]
            if reward_fn is None:
                scores = scorer.apply({"params": frozen["reward"]}, tokens, valid=valid)[:, -r:]
                score = score_at_eos(scores, mask)
            else:
                shape = jax.ShapeDtypeStruct(prompt.shape[:1], jnp.float32)
                score = jax.pure_callback(
                    lambda *arrays: reward_fn(*map(np.asarray, arrays)),
                    shape,
                    prompt,
                    prompt_valid,
                    samples.tokens,
                    mask,
                )
            rewards, kl = kl_penalty_rewards(old_logprobs, ref_logprobs, score, mask, beta)
            advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages:
                advantages = whiten(advantages, mask)
            rollouts = {
                "tokens": tokens,
                "valid": valid,
                "mask": mask,
                "old_logprobs": old_logprobs,
                "old_values": values,
                "advantages": advantages,
                "returns": returns,
            }
            ended = jnp.any(mask & (samples.tokens == ppo.eos_id), axis=1)
            metrics = {
                "rollout/score": score.mean(),
                "rollout/kl": kl.sum(1).mean(),  # KL(policy || SFT) per response, in nats
                "rollout/beta": beta,
                "rollout/length": mask.sum(1).mean(),
                "rollout/eos_fraction": ended.mean(),
                "rollout/return": rewards.sum(1).mean(),
            }
            return rollouts, metrics

        return step

    return Task(
        init=init,
        loss_fn=loss_fn,
        make_step=make_step,
        updates_per_step=ppo.epochs * ppo.minibatches,
    )
