"""DALL-E's own reranker on a tiny random transformer: log p(x | c) against the product of the
next-token probabilities read one prefix at a time, the rebinding classifier against its
definition, and the ranking rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.data import shapes
from jaxaigc.data.tokenizers import train_bpe
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.pipelines import dalle

TWO = "a small red circle left of a large blue square"
ONE = "there is a large green cross at the top"


@pytest.fixture(scope="module")
def tiny():
    """A tiny transformer with random parameters, and a BPE of shapes captions."""
    tokenizer = train_bpe(shapes.generate(300, 32, seed=0)[1], vocab_size=400)
    model = DALLEConfig.from_name(
        "tiny",
        text_len=24,
        text_vocab=tokenizer.vocab_size,
        image_side=2,
        image_vocab=16,
        width=32,
        layers=2,
        heads=2,
    )
    example = (jnp.zeros((1, model.text_len), jnp.int32), jnp.zeros((1, 4), jnp.int32))
    shapes_ = nn.meta.unbox(jax.eval_shape(DALLE(model).init, jax.random.key(0), *example))
    rng = np.random.default_rng(0)
    # Large weights, so that the likelihoods differ between captions.
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes_)
    return model, params["params"], tokenizer


def one_prefix_at_a_time(model, params, text, tokens):
    """sum_j log p(x_j | c, x_<j), each term from the logits of the prefix x_<j alone."""
    apply = jax.jit(DALLE(model).apply)
    total = np.zeros(len(text))
    for j in range(model.image_len):
        _, logits = apply({"params": params}, text, tokens[:, :j])
        log_probs = jax.nn.log_softmax(np.asarray(logits[:, j], np.float64))
        total += np.asarray(log_probs)[np.arange(len(text)), tokens[:, j]]
    return total


def test_log_likelihood_is_the_product_of_next_token_probabilities(tiny):
    model, params, tokenizer = tiny
    captions = [TWO, ONE, *shapes.rebindings(TWO)]  # 9 rows: two batches of 8, one padded
    text = tokenizer.encode(captions, length=model.text_len, eos=True)
    tokens = np.random.default_rng(1).integers(0, model.image_vocab, (len(captions), 4))
    expected = one_prefix_at_a_time(model, params, text, tokens)
    got = dalle.image_log_likelihood(model, params, text, tokens, batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert len(set(np.round(got, 3))) == len(got)  # the captions are told apart
    with pytest.raises(ValueError, match=r"need text \[n, 24\] and image tokens \[n, 4\]"):
        dalle.image_log_likelihood(model, params, text, tokens[:, :3])


def test_rebinding_score_is_a_bayes_classifier_over_the_rebindings(tiny):
    model, params, tokenizer = tiny
    k = 3
    tokens = np.random.default_rng(2).integers(0, model.image_vocab, (2, k, 4))
    likelihood, posterior = dalle.rebinding_scores(
        model, params, tokenizer, [TWO, ONE], tokens, batch_size=8
    )
    assert likelihood.shape == posterior.shape == (2, k)
    # By hand: log p(x | c) of the caption and of each rebinding, then Bayes' rule.
    variants = [TWO, *shapes.rebindings(TWO)]
    text = tokenizer.encode(variants, length=model.text_len, eos=True)
    log_p = dalle.image_log_likelihood(
        model, params, np.repeat(text, k, axis=0), np.tile(tokens[0], (len(variants), 1)),
        batch_size=8,
    ).reshape(len(variants), k)  # fmt: skip
    evidence = np.log(np.exp(log_p.astype(np.float64)).sum(0))
    np.testing.assert_allclose(likelihood[0], log_p[0], rtol=1e-6)
    np.testing.assert_allclose(posterior[0], log_p[0] - evidence, rtol=1e-4, atol=1e-5)
    assert (posterior[0] < 0).all()
    # A one-object caption has nothing to rebind: certain, whatever the image.
    np.testing.assert_array_equal(posterior[1], 0.0)
    # Each rebinding's own score, over the same set: the posteriors sum to one.
    _, each = dalle.rebinding_scores(
        model, params, tokenizer, variants, np.broadcast_to(tokens[0], (len(variants), k, 4)),
        batch_size=8,
    )  # fmt: skip
    np.testing.assert_allclose(np.exp(each).sum(0), 1.0, rtol=1e-5)


def test_rank_keys_and_rules():
    scores = {
        "clip": np.array([[0.5, 0.9, 0.1]]),
        "likelihood": np.array([[-3.0, -9.0, -1.0]]),
        "rebinding": np.array([[-0.1, -2.0, -0.5]]),
    }
    picks = {
        rule: int(np.argmax(dalle.rank_key(scores, rule, logit_scale=10.0))) for rule in dalle.RULES
    }
    # rebinding+clip: -0.1 + 5, -2 + 9, -0.5 + 1: CLIP outweighs the classifier here.
    assert picks == {"clip": 1, "likelihood": 2, "rebinding": 0, "rebinding+clip": 1}
    with pytest.raises(ValueError, match="unknown reranking rule 'vqa'"):
        dalle.rank_key(scores, "vqa")
    with pytest.raises(ValueError, match="reranking by 'rebinding' needs the transformer"):
        dalle.Reranker("rebinding", clip=object())
    with pytest.raises(ValueError, match="reranking by 'clip' needs a CLIP"):
        dalle.Reranker("clip")
