"""PPO-ptx (Ouyang et al. 2022, section 3.5; Ziegler et al. 2019; Schulman et al. 2016 and
2017): the equations, each a small pure function over [B, T] response-aligned arrays with a
``mask`` of the drawn tokens (True up to and including each row's EOS), and the loss of one PPO
minibatch built from them (the rollout and the epochs of updates: :mod:`jaxaigc.train.ppo`).

    objective = E[r(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x))] + gamma_ptx E_pretrain[log pi_RL(x)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.models.gpt import GPT
from jaxaigc.objectives.autoregressive import next_token_nll
from jaxaigc.objectives.reward import last_index
from jaxaigc.sample.decode import check_sampling, token_logprobs


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO-ptx's settings: how rollouts are sampled, how many updates each takes, the loss terms
    and the KL coefficient beta."""

    response_length: int = 16  # the most tokens a rollout draws
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = 0
    pad_id: int = 0
    epochs: int = 1  # passes over each rollout batch (paper: 1; lm-human-preferences: 4)
    minibatches: int = 1  # updates per pass (paper: batch 512 / minibatch 64 = 8)
    # The rollout (sampling and scoring) runs over this many chunks of the batch one after the
    # other, so a batch of hundreds of prompts fits in memory; the samples do not depend on it.
    rollout_chunks: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    # The value loss's weight (lm-human-preferences: 0.1). Policy and value are separate networks
    # with their own clipping and Adam, so it scales only the value's gradient before its clip.
    vf_coef: float = 1.0
    # The value's learning rate over the policy's (lm-human-preferences: 1, one Adam; OpenRLHF's
    # defaults: 9e-6 / 5e-7 = 18).
    value_lr_scale: float = 1.0
    gamma_ptx: float = 0.0  # 0: plain PPO (paper's PPO-ptx: 27.8)
    kl_coef: float = 0.02  # the initial beta (paper: 0.02)
    kl_target: float | None = None  # None: fixed beta; else Ziegler et al.'s adaptive controller
    kl_horizon: int = 10_000
    whiten_advantages: bool = True

    def __post_init__(self):
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.temperature == 0:
            raise ValueError("PPO samples: temperature must be > 0 (0 is greedy)")
        for name in ("response_length", "epochs", "minibatches", "rollout_chunks", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.value_lr_scale <= 0:
            raise ValueError(f"value_lr_scale must be positive; got {self.value_lr_scale}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be positive (or None); got {self.kl_target}")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """``x`` normalised to unit variance (and zero mean) over its valid tokens only; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return jnp.where(mask, out if shift_mean else out + mean, 0.0)


def kl_penalty_rewards(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    scores: jax.Array,
    mask: jax.Array,
    beta: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [B, T]: -beta (log pi - log pi_SFT) at every drawn token, plus the reward
    model's score [B] at each row's last drawn token (its EOS). Returns (rewards, kl [B, T])."""
    kl = jnp.where(mask, logprobs - ref_logprobs, 0.0)
    at_eos = jnp.arange(mask.shape[1]) == last_index(mask)[:, None]
    return -beta * kl + jnp.where(at_eos, scores[:, None], 0.0), kl


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over [B, T] by a reverse ``lax.scan``.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}; a masked position
    ends the episode (V and A after it count as 0) and gets A = 0. Returns (advantages, returns =
    advantages + values), both 0 at masked positions.
    """
    mask = mask.astype(jnp.float32)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * valid
        return (value * valid, advantage), advantage

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(
        step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True
    )  # (T, B)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip: float = 0.2,
) -> tuple[jax.Array, dict]:
    """The clipped surrogate: mean over drawn tokens of max(-A ratio, -A clip(ratio, 1 -+ clip))."""
    ratio = jnp.exp(logprobs - old_logprobs)
    losses = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip))
    metrics = {
        "ratio": masked_mean(ratio, mask),
        "clip_fraction": masked_mean((jnp.abs(ratio - 1) > clip).astype(jnp.float32), mask),
        # Schulman's estimator of KL(old || new), for monitoring.
        "approx_kl": masked_mean(0.5 * jnp.square(logprobs - old_logprobs), mask),
    }
    return masked_mean(losses, mask), metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip: float = 0.2,
) -> jax.Array:
    """0.5 * mean over drawn tokens of max((v - R)^2, (clip(v, v_old -+ clip) - R)^2)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    losses = jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    return 0.5 * masked_mean(losses, mask)


def token_entropy(logits: jax.Array, temperature: float) -> jax.Array:
    """The entropy [...] of softmax(logits / temperature) [..., vocab], in nats: the policy's
    uncertainty where it drew each token (top-k / top-p do not enter, as in the log-probs)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    return -(jnp.exp(logp) * logp).sum(-1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over the valid tokens: 1 for a value model that
    predicts the returns, 0 for one no better than their mean; NaN when the returns are constant."""

    def var(x):
        return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)

    return 1.0 - var(returns - values) / var(returns)


def fit_reward_normalizer(scores: np.ndarray) -> tuple[float, float]:
    """``(gain, bias)`` with ``gain * scores + bias`` of mean 0 and standard deviation 1: Ziegler
    et al.'s normalisation of the reward model on samples of the initial policy, so beta weighs
    the KL against a score of unit scale."""
    scores = np.asarray(scores, np.float64).ravel()
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"need at least 2 finite scores to fit a normaliser; got {scores}")
    std = scores.std()
    if std == 0:
        raise ValueError(f"the {scores.size} scores are all {scores[0]}: no scale to normalise")
    return float(1.0 / std), float(-scores.mean() / std)


def adaptive_kl_beta(
    beta: jax.Array, kl: jax.Array, *, target: float, horizon: int, n_steps: int
) -> jax.Array:
    """Ziegler et al.'s controller: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e n / H."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def ppo_loss_fn(policy: GPT, value: GPT, ppo: PPOConfig) -> Callable:
    """``loss_fn(params, batch, rng)`` of one PPO minibatch: the clipped policy loss plus
    ``vf_coef`` times the clipped value loss plus ``gamma_ptx`` times the pretraining NLL.

    ``batch``: ``tokens`` / ``valid`` [b, p + r] (prompt and response), response-aligned [b, r]
    ``mask``, ``old_logprobs``, ``old_values``, ``advantages``, ``returns``; with ``gamma_ptx``
    also ``ptx`` int32 [n, l] and ``ptx_weights`` [n, l - 1].
    """

    def loss_fn(params, batch, rng):
        del rng  # deterministic forward passes: the ratio is exactly 1 before the first update
        r = ppo.response_length
        tokens, valid, mask = batch["tokens"], batch["valid"], batch["mask"]
        logits = policy.apply({"params": params["policy"]}, tokens, valid=valid)
        # Position t predicts token t + 1: the response's scores start one before it.
        logprobs = token_logprobs(logits[:, -r - 1 : -1], tokens[:, -r:], ppo.temperature)
        pg, metrics = policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, clip=ppo.clip_ratio
        )
        values = value.apply({"params": params["value"]}, tokens, valid=valid)[:, -r - 1 : -1]
        vf = value_loss(values, batch["old_values"], batch["returns"], mask, clip=ppo.value_clip)
        loss = pg + ppo.vf_coef * vf
        metrics |= {"policy_loss": pg, "value_loss": vf}
        if ppo.gamma_ptx:
            ptx = batch["ptx"]
            ptx_logits = policy.apply({"params": params["policy"]}, ptx[:, :-1])
            nll, count = next_token_nll(ptx_logits, ptx[:, 1:], batch["ptx_weights"])
            ptx_nll = nll.sum() / jnp.maximum(count.sum(), 1.0)
            loss = loss + ppo.gamma_ptx * ptx_nll
            metrics["ptx_nll"] = ptx_nll
        return loss, metrics

    return loss_fn
