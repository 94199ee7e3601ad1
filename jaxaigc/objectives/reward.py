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

from jaxaigc.data.text import pack
from jaxaigc.objectives.sft import check_tokens, encode_example

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
    losses, _ = _pair_terms(rewards, pairs)
    return losses.sum((1, 2)) / pairs.sum((1, 2))


def pair_counts(rewards: jax.Array, ranks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per prompt [B]: (its ranked pairs whose better response scores strictly higher, its ranked
    pairs), from rewards and ranks [B, K] (-1 a missing response). Responses of equal rank (a
    tie: :func:`ranks_of_scores` gives equal scores one rank) form no pair."""
    pairs = _pairs(ranks)
    _, correct = _pair_terms(rewards, pairs)
    return correct.sum((1, 2)), pairs.sum((1, 2))


def pairwise_accuracy(rewards: jax.Array, ranks: jax.Array) -> jax.Array:
    """Per prompt [B]: the fraction of its ranked pairs whose better response scores higher (NaN
    for a prompt without pairs)."""
    correct, pairs = pair_counts(rewards, ranks)
    return correct / pairs


def ranks_of_scores(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """int32 [B, K]: each present response's rank by ``scores`` [B, K] (e.g. gold scores), the
    number of present responses of its prompt that score strictly higher, so that equal scores
    share a rank; -1 where ``present`` is False."""
    scores, present = np.asarray(scores), np.asarray(present, bool)
    higher = (scores[:, None, :] > scores[:, :, None]) & present[:, None, :]
    return np.where(present, higher.sum(-1), -1).astype(np.int32)


def _pair_terms(rewards: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rewards [..., n] and pair weights [..., n, n] (i ranked above j) -> the weighted
    -log sigmoid(r_i - r_j) and the weighted indicator r_i > r_j, both [..., n, n]."""
    margin = rewards[..., :, None] - rewards[..., None, :]
    return -jax.nn.log_sigmoid(margin) * weights, (margin > 0) * weights


def sequence_scores(
    model: nn.Module, params, tokens: jax.Array, valid: jax.Array, response_mask: jax.Array
) -> jax.Array:
    """A scalar-head model's score of each sequence [b, t] at its EOS -> [b]."""
    scores = model.apply({"params": params}, tokens, valid=valid)
    return score_at_eos(scores, response_mask)


def _flat_pairs(model, params, batch):
    """Rewards [B, K] of one comparison per row and their pair weights [B, K, K]."""
    b, k, t = batch["tokens"].shape
    mask = batch["response_mask"].reshape(b * k, t)
    valid = jnp.arange(t) <= last_index(mask)[:, None]  # right-padded after the EOS
    rewards = sequence_scores(model, params, batch["tokens"].reshape(b * k, t), valid, mask)
    pairs = _pairs(batch["ranks"])
    return rewards.reshape(b, k), batch["ranks"] >= 0, pairs / pairs.sum((1, 2), keepdims=True)


def _packed_pairs(model, params, batch):
    """Scores [B, L] of rows packed by :func:`pack_comparisons`, the EOS tokens and the pair
    weights [B, L, L] between EOS tokens of one comparison (1 / C(k, 2) each)."""
    segments, order = batch["segments"], batch["response_rank"]
    scores = model.apply(
        {"params": params}, batch["tokens"], segments=segments, branches=batch["branches"]
    )
    eos = order > 0
    same = (segments[:, :, None] == segments[:, None, :]) & eos[:, :, None] & eos[:, None, :]
    k = same.sum(-1, keepdims=True).astype(jnp.float32)  # responses in each token's comparison
    above = same & (order[:, :, None] < order[:, None, :])
    return scores, eos, above / jnp.maximum(k * (k - 1) / 2, 1.0)


def reward_loss_fn(model: nn.Module) -> Callable:
    """``loss_fn(params, batch, rng)``: the mean over comparisons of :func:`ranking_loss`, all K
    responses of a prompt scored in one forward pass. ``batch`` holds one comparison per row
    (:func:`encode_comparison`: ``"tokens"`` int32 [B, K, t], ``"response_mask"`` bool [B, K, t],
    ``"ranks"`` int32 [B, K]) or rows of several, each prompt once (:func:`pack_comparisons`)."""

    def loss_fn(params, batch, rng):
        del rng  # the reward model trains without dropout here
        # No gradient to the bias: Eq. 1 sees only reward differences.
        score = dict(params["score"], bias=jax.lax.stop_gradient(params["score"]["bias"]))
        params = dict(params, score=score)
        pairs = _packed_pairs if "segments" in batch else _flat_pairs
        rewards, present, weights = pairs(model, params, batch)
        losses, correct = _pair_terms(rewards, weights)
        # Each comparison's weights sum to 1, so their total counts the comparisons.
        comparisons = weights.sum()
        loss = losses.sum() / comparisons
        return loss, {
            "ranking_loss": loss,
            "pair_accuracy": correct.sum() / comparisons,
            "reward_mean": (rewards * present).sum() / present.sum(),
        }

    return loss_fn


def pack_comparisons(
    comparisons: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
    *,
    length: int,
    context_length: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Comparisons ``(prompt, K responses, ranking)`` (ranking: response indices, best first) in
    rows of ``length`` tokens with each prompt once: ``prompt, response_1 + [eos], ...`` as
    ``branches`` of one sequence, several sequences per row (:func:`jaxaigc.data.text.pack`).

    Returns ``tokens``, ``segments``, ``branches`` and ``response_rank`` (int32 [m, length]: 1 +
    the response's rank at its EOS token, 0 elsewhere). A comparison longer than a row is split
    into the fewest runs of its responses that fit, each ranked as in the whole: the pairs across
    runs are dropped.
    """
    sequences = []
    for index, (prompt, responses, ranking) in enumerate(comparisons):
        k = len(responses)
        if k < MIN_K:
            raise ValueError(f"comparison {index} has K = {k} responses; K must be at least 2")
        if sorted(ranking) != list(range(k)):
            raise ValueError(
                f"comparison {index}: ranking {list(ranking)} is not a permutation of its "
                f"{k} responses"
            )
        ranks = np.empty(k, np.int32)
        ranks[np.asarray(ranking)] = np.arange(k)
        for response in responses:
            check_tokens([*prompt, *response, eos_id, pad_id], vocab_size)
            if len(prompt) + len(response) + 1 > context_length:
                raise ValueError(
                    f"prompt ({len(prompt)}) + response ({len(response)}) + EOS of comparison "
                    f"{index} exceed the context length {context_length}"
                )
        sizes = [len(r) + 1 for r in responses]
        for runs in range(1, k // MIN_K + 1):
            parts = np.array_split(np.arange(k), runs)
            if all(len(prompt) + sum(sizes[i] for i in part) <= length for part in parts):
                break
        else:
            raise ValueError(
                f"comparison {index}: the prompt and two responses exceed the row length {length}"
            )
        for part in parts:
            tokens, branches, order = list(prompt), [0] * len(prompt), [0] * len(prompt)
            for branch, i in enumerate(part, 1):
                ids = [*responses[i], eos_id]
                tokens += ids
                branches += [branch] * len(ids)
                rank = 1 + int((ranks[part] < ranks[i]).sum())  # 1 the best of the run
                order += [0] * (len(ids) - 1) + [rank]
            sequences.append((tokens, branches, order))
    width = max(len(t) for t, _, _ in sequences)
    arrays = {
        key: np.zeros((len(sequences), width), np.int32)
        for key in ("tokens", "branches", "response_rank")
    }
    arrays["tokens"][:] = pad_id
    for row, values in enumerate(sequences):
        for key, value in zip(arrays, values, strict=True):
            arrays[key][row, : len(value)] = value
    packed = pack(arrays, np.array([len(t) for t, _, _ in sequences]), length=length)
    packed["tokens"][packed["segments"] == 0] = pad_id
    return packed


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


def normalize_rewards(params, gain: float, bias: float):
    """``params`` with the score head giving ``gain * score + bias``: with
    :func:`~jaxaigc.objectives.ppo.fit_reward_normalizer`'s values on samples of the policy PPO
    starts from, Ziegler et al. 2019's normalisation, folded into the head so that the value
    model, which starts as the reward model, predicts normalised scores too."""
    score = params["score"]
    scaled = {"kernel": score["kernel"] * gain, "bias": score["bias"] * gain + bias}
    return {**params, "score": {**score, **scaled}}
