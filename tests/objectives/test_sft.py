"""Supervised fine-tuning: the loss counts response tokens only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc.data.text import pack
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.sft import encode_example, sft_loss_fn

CONFIG = GPTConfig(vocab_size=20, context_length=10, width=16, layers=1, heads=2)


def test_encode_example_layout_and_errors():
    tokens, mask = encode_example([5, 6, 7], [8, 9], length=8, eos_id=1, pad_id=0, vocab_size=20)
    np.testing.assert_array_equal(tokens, [5, 6, 7, 8, 9, 1, 0, 0])
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="6 tokens, longer than the length 5"):
        encode_example([5, 6, 7], [8, 9], length=5, eos_id=1, pad_id=0, vocab_size=20)
    with pytest.raises(ValueError, match="token id 300 is outside the model's vocabulary of 20"):
        encode_example([300], [8], length=5, eos_id=1, pad_id=0, vocab_size=20)


def test_sft_loss_is_the_mean_nll_of_response_tokens():
    model = GPT(CONFIG)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))["params"])
    args = dict(length=10, eos_id=1, pad_id=0, vocab_size=20)
    rows = [encode_example([2, 3, 4], [5, 6], **args), encode_example([7], [8, 9, 10, 11], **args)]
    tokens, mask = (np.stack(x) for x in zip(*rows, strict=True))
    batch = {"tokens": tokens, "response_mask": mask}
    loss, metrics = sft_loss_fn(model)(params, batch, jax.random.key(0))
    logits = model.apply({"params": params}, batch["tokens"][:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    targets = batch["response_mask"][:, 1:]
    assert targets.sum() == 3 + 5  # responses with their EOS
    np.testing.assert_allclose(loss, nll[targets].mean(), rtol=1e-6)
    assert float(metrics["loss_weight"]) == 8
    # The pads after each EOS are neither targets nor context of a target.
    changed = dict(batch, tokens=np.where(np.arange(10) >= 8, 13, batch["tokens"]))
    np.testing.assert_allclose(
        sft_loss_fn(model)(params, changed, jax.random.key(0))[0], loss, rtol=1e-6
    )


def test_packed_sft_loss_equals_the_unpacked_loss():
    """Rows packed by ``pack`` (with their segments) give the loss of the same examples padded
    one per row: no target crosses into the next example."""
    model = GPT(CONFIG.replace(context_length=16))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))["params"])
    args = dict(length=8, eos_id=1, pad_id=0, vocab_size=20)
    rows = [
        encode_example([2, 3, 4], [5, 6], **args),
        encode_example([7], [8, 9, 10], **args),
        encode_example([12, 13], [14], **args),
    ]
    tokens, mask = (np.stack(x) for x in zip(*rows, strict=True))
    loss, _ = sft_loss_fn(model)(
        params, {"tokens": tokens, "response_mask": mask}, jax.random.key(0)
    )
    packed = pack({"tokens": tokens, "response_mask": mask}, np.array([6, 5, 4]), length=16)
    assert len(packed["tokens"]) == 1
    packed_loss, metrics = sft_loss_fn(model)(params, packed, jax.random.key(0))
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    assert float(metrics["loss_weight"]) == 3 + 4 + 2
