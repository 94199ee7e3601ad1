"""InstructGPT's reward model (Ouyang et al. 2022, section 3.5): the SFT transformer with a scalar
head read at each response's EOS token, trained on K-way rankings with every one of a prompt's
C(K, 2) pairs in one batch element (each response is scored once per prompt):

    loss = -1 / C(K, 2) * E[log sigmoid(r(x, y_w) - r(x, y_l))]                            (Eq. 1)

The head's bias gets no gradient (the loss sees only differences; Adam would turn its rounding
noise into drift); after training it is set so that demonstrations score mean 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.rlhf.sft import encode_example

MIN_K = 2


def last_index(mask: jax.Array) -> jax.Array:
    """int32 [b]: the index of each row's last True in ``mask`` [b, t] (0 for an empty row)."""
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)).astype(jnp.int32)


def score_at_eos(scores: jax.Array, response_mask: jax.Array) -> jax.Array:
    """scores [b, t] read at each row's last response token (its EOS) -> [b]."""
    index = last_index(response_mask)
    return jnp.take_along_axis(scores, index[:, None], axis=1)[:, 0]


def check_ranks(ranks: np.ndarray) -> None:
    """Each row of ``ranks`` [B, K] (rank 0 the best, -1 a missing response) ranks at least two
    responses with a permutation of ``0..k-1``; raises ``ValueError`` naming the row otherwise."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [batch, K]; got shape {ranks.shape}")
    for row, r in enumerate(ranks):
        present = np.sort(r[r >= 0])
        if len(present) < MIN_K:
            raise ValueError(f"row {row} ranks {len(present)} responses; K must be at least 2")
        if not np.array_equal(present, np.arange(len(present))) or (r < -1).any():
            raise ValueError(f"row {row}: ranks {r.tolist()} are not a permutation of 0..K-1")


def _pairs(ranks: jax.Array) -> jax.Array:
    """float [B, K, K]: 1 where response i is ranked above (better than) present response j."""
    present = ranks >= 0
    above = ranks[:, :, None] < ranks[:, None, :]
    return (above & present[:, :, None] & present[:, None, :]).astype(jnp.float32)


def ranking_loss(rewards: jax.Array, ranks: jax.Array) -> jax.Array:
    """Eq. 1 per prompt: rewards and ranks [B, K] (rank 0 the best, -1 a missing response) ->
    the mean over the prompt's C(k, 2) pairs of -log sigmoid(r_better - r_worse), [B]."""
    if rewards.shape != ranks.shape or rewards.ndim != 2:
        raise ValueError(f"rewards {rewards.shape} and ranks {ranks.shape} must both be [B, K]")
    if rewards.shape[1] < MIN_K:
        raise ValueError(f"K = {rewards.shape[1]} responses per prompt; K must be at least 2")
    if not isinstance(ranks, jax.core.Tracer):
        check_ranks(np.asarray(ranks))
    pairs = _pairs(ranks)
    margin = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    losses = -jax.nn.log_sigmoid(margin) * pairs
    return losses.sum((1, 2)) / pairs.sum((1, 2))


def pairwise_accuracy(rewards: jax.Array, ranks: jax.Array) -> jax.Array:
    """Per prompt [B]: the fraction of its ranked pairs whose better response scores higher."""
    pairs = _pairs(ranks)
    correct = (rewards[:, :, None] > rewards[:, None, :]) * pairs
    return correct.sum((1, 2)) / pairs.sum((1, 2))


def sequence_scores(
    model: nn.Module, params, tokens: jax.Array, valid: jax.Array, response_mask: jax.Array
) -> jax.Array:
    """A scalar-head model's score of each sequence [b, t] at its EOS -> [b]."""
    scores = model.apply({"params": params}, tokens, valid=valid)
    return score_at_eos(scores, response_mask)


def reward_loss_fn(model: nn.Module) -> Callable:
    """``loss_fn(params, batch, rng)`` for ``batch = {"tokens": int32 [B, K, t], "response_mask":
    bool [B, K, t], "ranks": int32 [B, K]}`` (:func:`encode_comparison`): the mean over prompts
    of :func:`ranking_loss`, all K responses of a prompt scored in one forward pass."""

    def loss_fn(params, batch, rng):
        del rng  # the reward model trains without dropout here
        b, k, t = batch["tokens"].shape
        # No gradient to the bias: Eq. 1 sees only reward differences.
        score = dict(params["score"], bias=jax.lax.stop_gradient(params["score"]["bias"]))
        params = dict(params, score=score)
        mask = batch["response_mask"].reshape(b * k, t)
        valid = jnp.arange(t) <= last_index(mask)[:, None]  # right-padded after the EOS
        rewards = sequence_scores(model, params, batch["tokens"].reshape(b * k, t), valid, mask)
        rewards = rewards.reshape(b, k)
        loss = ranking_loss(rewards, batch["ranks"]).mean()
        present = batch["ranks"] >= 0
        mean = (rewards * present).sum() / present.sum()
        return loss, {
            "ranking_loss": loss,
            "pair_accuracy": pairwise_accuracy(rewards, batch["ranks"]).mean(),
            "reward_mean": mean,
        }

    return loss_fn


def encode_comparison(
    prompt: Sequence[int],
    responses: Sequence[Sequence[int]],
    ranking: Sequence[int],
    *,
    max_k: int,
    length: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """One prompt's K responses and the labeller's ``ranking`` (response indices, best first),
    padded to ``max_k`` responses: ``{"tokens": [max_k, length], "response_mask": [max_k,
    length], "ranks": [max_k]}`` (rank -1 and an empty mask for missing responses)."""
    k = len(responses)
    if not MIN_K <= k <= max_k:
        raise ValueError(f"K = {k} responses; K must be in [{MIN_K}, {max_k}]")
    ranks = np.full(max_k, -1, np.int32)
    ranks[np.asarray(ranking)] = np.arange(len(ranking))
    check_ranks(ranks[None])
    tokens = np.full((max_k, length), pad_id, np.int32)
    mask = np.zeros((max_k, length), bool)
    # A missing response is the prompt alone, masked: every row stays a valid sequence.
    for i in range(max_k):
        tokens[i], mask[i] = encode_example(
            prompt,
            responses[i] if i < k else (),
            length=length,
            eos_id=eos_id,
            pad_id=pad_id,
            vocab_size=vocab_size,
        )
    mask[k:] = False
    return {"tokens": tokens, "response_mask": mask, "ranks": ranks}


def center_rewards(params, demonstration_scores: jax.Array):
    """``params`` with the score bias shifted so that ``demonstration_scores`` (the model's
    scores of SFT demonstrations [n]) average 0."""
    score = params["score"]
    bias = score["bias"] - jnp.mean(demonstration_scores)
    return {**params, "score": {**score, "bias": bias}}
