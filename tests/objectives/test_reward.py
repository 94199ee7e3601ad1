"""The reward model's ranking loss, its EOS read-out and its bias."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.reward import (
    center_rewards,
    encode_comparison,
    pack_comparisons,
    pair_counts,
    pairwise_accuracy,
    ranking_loss,
    ranks_of_scores,
    reward_loss_fn,
    score_at_eos,
)

RM = GPTConfig(vocab_size=20, context_length=12, width=16, layers=1, heads=2, head="scalar")


def test_ranking_loss_matches_brute_force_over_pairs():
    rng = np.random.default_rng(0)
    ks = [4, 9, 6, 2]
    rewards = rng.normal(size=(4, 9))
    ranks = np.full((4, 9), -1)
    for row, k in enumerate(ks):
        ranks[row, :k] = rng.permutation(k)
    got = np.asarray(ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks)))
    accuracy = np.asarray(pairwise_accuracy(jnp.asarray(rewards), jnp.asarray(ranks)))
    for row, k in enumerate(ks):
        pairs = list(itertools.combinations(range(k), 2))
        assert len(pairs) == k * (k - 1) // 2
        losses, correct = [], []
        for i, j in pairs:
            win, lose = (i, j) if ranks[row, i] < ranks[row, j] else (j, i)
            margin = rewards[row, win] - rewards[row, lose]
            losses.append(np.log1p(np.exp(-margin)))
            correct.append(margin > 0)
        np.testing.assert_allclose(got[row], np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(accuracy[row], np.mean(correct), rtol=1e-6)


def test_gold_order_accuracy_skips_ties_and_missing_responses():
    """Ranks of gold scores with ties: each pair of different gold scores counts once, oriented
    by the gold order; tied and missing responses make no pair (a brute-force loop over pairs)."""
    rng = np.random.default_rng(1)
    gold = rng.choice([0.0, 0.5, 1.0], size=(6, 5))  # many ties
    present = np.arange(5) < np.array([[5], [4], [2], [5], [3], [1]])
    rewards = rng.normal(size=(6, 5)).astype(np.float32)
    ranks = ranks_of_scores(gold, present)
    assert (ranks[~present] == -1).all() and (ranks[present] >= 0).all()
    correct, pairs = (np.asarray(x) for x in pair_counts(jnp.asarray(rewards), ranks))
    for row in range(6):
        k = int(present[row].sum())
        right = total = 0
        for i, j in itertools.combinations(range(k), 2):
            if gold[row, i] != gold[row, j]:
                total += 1
                better, worse = (i, j) if gold[row, i] > gold[row, j] else (j, i)
                right += rewards[row, better] > rewards[row, worse]
        assert (correct[row], pairs[row]) == (right, total)


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ([[0, 1, 1, -1]], r"ranks \[0, 1, 1, -1\] are not a permutation"),
        ([[0, 2, -1, -1]], "not a permutation of 0..K-1"),
        ([[0, -1, -1, -1]], "row 0 ranks 1 responses; K must be at least 2"),
    ],
)
def test_bad_ranks_are_named(ranks, message):
    with pytest.raises(ValueError, match=message):
        ranking_loss(jnp.zeros((1, 4)), jnp.asarray(ranks))


def test_k_below_two_is_refused():
    with pytest.raises(ValueError, match="K = 1 responses per prompt"):
        ranking_loss(jnp.zeros((3, 1)), jnp.zeros((3, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"K = 1 responses; K must be in \[2, 9\]"):
        encode_comparison([3], [[4]], [0], max_k=9, length=8, eos_id=1, pad_id=0, vocab_size=20)
    with pytest.raises(ValueError, match="token id 25 is outside the model's vocabulary of 20"):
        encode_comparison(
            [3], [[4], [25]], [0, 1], max_k=9, length=8, eos_id=1, pad_id=0, vocab_size=20
        )


def _comparison_batch():
    """Two prompts with 3 and 2 responses of different lengths, padded to K = 4."""
    args = dict(max_k=4, length=12, eos_id=1, pad_id=0, vocab_size=20)
    rows = [
        encode_comparison([5, 6], [[7], [8, 9, 10, 11], [12, 13]], [2, 0, 1], **args),
        encode_comparison([14, 15, 16], [[17, 18], [19]], [1, 0], **args),
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_the_score_is_read_at_eos_and_missing_responses_do_not_count():
    batch = _comparison_batch()
    np.testing.assert_array_equal(batch["ranks"], [[1, 2, 0, -1], [1, 0, -1, -1]])
    mask = batch["response_mask"]
    # Response 1 of prompt 0: tokens 2..5, then EOS at index 6.
    assert batch["tokens"][0, 1, 6] == 1 and mask[0, 1].tolist() == [0, 0] + [1] * 5 + [0] * 5
    scores = jnp.arange(24.0).reshape(2, 12)
    np.testing.assert_array_equal(score_at_eos(scores, mask[:, 1]), [6.0, 12 + 4.0])

    model = GPT(RM)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x + 0.1, params)  # a nonzero bias, read with the score
    loss_fn = reward_loss_fn(model)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    # Tokens of missing responses, and pads after each EOS, change nothing.
    changed = dict(batch, tokens=np.where(mask | (np.arange(12) < 3), batch["tokens"], 19))
    changed["tokens"][0, 3] = 4
    loss2, grads2 = jax.value_and_grad(lambda p: loss_fn(p, changed, None)[0])(params)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    assert float(grads["score"]["bias"]) == 0.0  # Eq. 1 sees only differences
    assert 0 <= float(metrics["pair_accuracy"]) <= 1

    # The bias after training: demonstrations score mean 0.
    demos = jnp.array([1.5, 2.5, 4.0])
    centred = center_rewards(params, demos)
    np.testing.assert_allclose(centred["score"]["bias"], params["score"]["bias"] - 8 / 3, 1e-6)


COMPARISONS = [
    ([5, 6], [[7], [8, 9, 10, 11], [12, 13]], [2, 0, 1]),
    ([14, 15, 16], [[17, 18], [19]], [1, 0]),
    ([3, 4, 5, 6], [[7, 8], [9], [10, 11, 12], [13]], [3, 1, 0, 2]),
]


def test_packed_comparisons_give_the_loss_and_gradients_of_one_comparison_per_row():
    """Each prompt once with its responses as branches, several comparisons per row: the same
    rewards, loss, accuracy and gradients as one comparison per row."""
    args = dict(eos_id=1, pad_id=0, vocab_size=20)
    flat = [encode_comparison(*c, max_k=4, length=12, **args) for c in COMPARISONS]
    flat = {k: np.stack([r[k] for r in flat]) for k in flat[0]}
    packed = pack_comparisons(COMPARISONS, length=20, context_length=12, **args)
    assert packed["tokens"].shape == (2, 20)  # 12 + 8 tokens, then 15
    model = GPT(RM)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    loss_fn = reward_loss_fn(model)
    (want, want_metrics), want_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, flat, None)
    (got, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, packed, None)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key in want_metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)


def test_a_comparison_longer_than_a_row_is_split_into_runs_ranked_as_in_the_whole():
    prompt, responses = [2, 3, 4], [[5, 6], [7], [8, 9, 10], [11]]
    packed = pack_comparisons(
        [(prompt, responses, [2, 0, 3, 1])],
        length=9,
        context_length=9,
        eos_id=1,
        pad_id=0,
        vocab_size=20,
    )
    # Responses 0, 1 (ranks 1, 3) and 2, 3 (ranks 0, 2): each run keeps its order.
    np.testing.assert_array_equal(
        packed["tokens"][:, :9], [[2, 3, 4, 5, 6, 1, 7, 1, 0], [2, 3, 4, 8, 9, 10, 1, 11, 1]]
    )
    np.testing.assert_array_equal(packed["response_rank"][0], [0, 0, 0, 0, 0, 1, 0, 2, 0])
    np.testing.assert_array_equal(packed["response_rank"][1], [0, 0, 0, 0, 0, 0, 1, 0, 2])
    np.testing.assert_array_equal(packed["branches"][1], [0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_packing_rejects_bad_comparisons():
    args = dict(length=16, context_length=8, eos_id=1, pad_id=0, vocab_size=20)
    with pytest.raises(ValueError, match="comparison 0 has K = 1 responses"):
        pack_comparisons([([3], [[4]], [0])], **args)
    with pytest.raises(ValueError, match=r"ranking \[0, 0\] is not a permutation"):
        pack_comparisons([([3], [[4], [5]], [0, 0])], **args)
    with pytest.raises(ValueError, match="token id 25 is outside"):
        pack_comparisons([([3], [[4], [25]], [0, 1])], **args)
    with pytest.raises(ValueError, match="exceed the context length 8"):
        pack_comparisons([([3], [[4] * 7, [5]], [0, 1])], **args)
    with pytest.raises(ValueError, match="two responses exceed the row length 5"):
        pack_comparisons([([3, 3], [[4], [5, 5]], [0, 1])], **dict(args, length=5))
