"""One PPO-ptx iteration as one step of the generic training loop (Ouyang et al. 2022, section 3.5).

A step takes a batch of left-padded prompts (and as many pretraining rows for the ptx term), and
in one jitted program: samples a response per prompt from the policy with the KV cache (a fresh
key per row and iteration), scores the sequences with the frozen reward model at each EOS and
with the frozen SFT reference and the value model at every token, turns the per-token KL penalty
and the normalised score into GAE advantages, then runs ``epochs`` passes of ``minibatches`` PPO
updates over a fresh shuffle each (each :func:`~jaxaigc.train.step.make_train_step`'s update of
:func:`~jaxaigc.objectives.ppo.ppo_loss_fn`). The rollout runs over ``rollout_chunks`` chunks of
the batch in turn, so a batch of hundreds of prompts fits in memory. The ``TrainState`` holds
``params = {"policy", "value"}`` (each clipped to its own gradient norm and stepped by its own
Adam, the value's rate ``value_lr_scale`` times the policy's) and ``model_state = {"frozen":
{"reference", "reward", "reward_normalizer": {"gain", "bias"}}, "kl": {"beta"}}``, so
checkpoints, resume, SIGTERM, metrics and sharding are the loop's; ``state.step`` counts updates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.ppo import (
    PPOConfig,
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_mean,
    ppo_loss_fn,
    whiten,
)
from jaxaigc.train.loop import Task
from jaxaigc.train.rollout import check_models, make_sampler, split_rows
from jaxaigc.train.step import make_train_step


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


def saved_score_head(path: Path, reward_params: Any, fit: Callable[[], Any] | None = None) -> Any:
    """``reward_params`` with the score head kept in ``path`` (JSON ``kernel`` and ``bias``),
    which ``fit()`` (the normalised reward model's parameters) writes the first time: a resumed
    run and the evaluation then use the same normaliser without sampling again. Without ``fit``
    the file must exist."""
    if not path.exists():
        if fit is None:
            raise FileNotFoundError(f"{path} is missing: PPO has not started yet")
        head = fit()["score"]
        if jax.process_index() == 0:
            text = json.dumps({k: np.asarray(v).tolist() for k, v in head.items()})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(text)
            path.with_suffix(".tmp").replace(path)  # atomic: never half a head
        multihost_utils.sync_global_devices(f"score head written to {path}")
    head = json.loads(path.read_text())
    score = {k: jnp.asarray(head[k], jnp.float32) for k in ("kernel", "bias")}
    return {**reward_params, "score": score}


def make_ppo_task(
    policy_config: GPTConfig,
    reward_config: GPTConfig,
    ppo: PPOConfig,
    *,
    policy_params: Any | None = None,
    reward_params: Any | None = None,
    reward_fn: Callable[..., Any] | None = None,
    reward_gain: float = 1.0,
    reward_bias: float = 0.0,
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

    The score PPO maximises is ``reward_gain * raw + reward_bias`` of either's raw score (Ziegler
    et al.: fit them with :func:`~jaxaigc.objectives.ppo.fit_reward_normalizer` on scores of the
    SFT policy's samples, e.g. from :func:`~jaxaigc.train.rollout.score_samples`); they live in
    the checkpointed ``model_state["frozen"]["reward_normalizer"]``.
    """
    check_models(policy_config, reward_config, ppo)
    policy, scorer = GPT(policy_config), GPT(reward_config)
    loss_fn = ppo_loss_fn(policy, scorer, ppo)

    def init(rng: jax.Array) -> dict:
        policy_rng, reward_rng = jax.random.split(rng)
        example = jnp.zeros((1, policy_config.context_length), jnp.int32)
        pi = load_params(policy.init(policy_rng, example)["params"], policy_params, "policy")
        example = jnp.zeros((1, reward_config.context_length), jnp.int32)
        rm = load_params(scorer.init(reward_rng, example)["params"], reward_params, "reward")
        normalizer = {
            "gain": jnp.asarray(reward_gain, jnp.float32),
            "bias": jnp.asarray(reward_bias, jnp.float32),
        }
        return {
            "params": {"policy": pi, "value": rm},  # the value model starts as the RM
            "frozen": {"reference": pi, "reward": rm, "reward_normalizer": normalizer},
            "kl": {"beta": jnp.asarray(ppo.kl_coef, jnp.float32)},
        }

    sample_and_score = make_sampler(policy_config, reward_config, ppo, reward_fn)

    def make_step(tx, *, rng: jax.Array, schedule=None):
        update_rng, rollout_rng, shuffle_rng = jax.random.split(rng, 3)
        update = make_train_step(
            loss_fn, tx, rng=update_rng, schedule=schedule, norm_groups=("policy", "value")
        )

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
            for name in ("minibatches", "rollout_chunks"):
                if prompt.shape[0] % getattr(ppo, name):
                    raise ValueError(
                        f"the batch of {prompt.shape[0]} prompts does not divide into "
                        f"{name}={getattr(ppo, name)}"
                    )
            rollouts, metrics = _rollout(state, prompt, prompt_valid, rollout_rng)
            ptx = {k: batch[k] for k in ("ptx", "ptx_weights") if ppo.gamma_ptx}

            def epoch(state, index):
                key = jax.random.fold_in(jax.random.fold_in(shuffle_rng, state.step), index)
                order = jax.random.permutation(key, prompt.shape[0])
                minibatches = split_rows(rollouts, ppo.minibatches, order)
                minibatches |= split_rows(ptx, ppo.minibatches)
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
            frozen = state.model_state["frozen"]
            beta = state.model_state["kl"]["beta"]
            rows = jax.random.split(jax.random.fold_in(key, state.step), prompt.shape[0])
            out = sample_and_score(
                {**state.params, **frozen}, prompt, prompt_valid, rows, evaluate=True
            )
            mask, raw = out["mask"], out["raw_score"]
            normalizer = frozen["reward_normalizer"]
            score = normalizer["gain"] * raw + normalizer["bias"]
            rewards, kl = kl_penalty_rewards(
                out["logprobs"], out["ref_logprobs"], score, mask, beta
            )
            advantages, returns = gae(rewards, out["values"], mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages:
                advantages = whiten(advantages, mask)
            rollouts = {
                "tokens": jnp.concatenate([prompt, out["response"]], axis=1),
                "valid": jnp.concatenate([prompt_valid, mask], axis=1),
                "mask": mask,
                "old_logprobs": out["logprobs"],
                "old_values": out["values"],
                "advantages": advantages,
                "returns": returns,
            }
            ended = jnp.any(mask & (out["response"] == ppo.eos_id), axis=1)
            gap = jnp.where(mask, jnp.abs(out["logprobs"] - out["sampler_logprobs"]), 0.0)
            metrics = {
                "rollout/score": score.mean(),
                "rollout/score_std": score.std(),
                "rollout/raw_score": raw.mean(),  # before the normaliser
                "rollout/kl": kl.sum(1).mean(),  # KL(policy || SFT) per response, in nats
                "rollout/beta": beta,
                "rollout/length": mask.sum(1).mean(),
                "rollout/eos_fraction": ended.mean(),
                "rollout/return": rewards.sum(1).mean(),
                "rollout/entropy": masked_mean(out["entropy"], mask),  # nats per drawn token
                "rollout/explained_variance": explained_variance(out["values"], returns, mask),
                # The KV-cache sampler's log-probs against the full forward pass PPO's ratio uses.
                "rollout/logprob_gap": gap.max(),
            }
            return rollouts, metrics

        return step

    return Task(
        init=init,
        loss_fn=loss_fn,
        make_step=make_step,
        updates_per_step=ppo.epochs * ppo.minibatches,
        lr_scales={"policy": 1.0, "value": ppo.value_lr_scale},
    )
