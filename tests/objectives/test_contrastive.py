"""The contrastive losses: a NumPy reference, and sharded over 8 devices equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxaigc import parallel
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.objectives import contrastive


def _embeddings(n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
    )


def _numpy_clip_loss(images, texts, scale):
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    logits = scale * images @ texts.T

    def ce(x):
        x = x - x.max(1, keepdims=True)
        return -(np.diag(x) - np.log(np.exp(x).sum(1))).mean()

    return (ce(logits) + ce(logits.T)) / 2


def test_clip_loss_matches_numpy():
    images, texts = _embeddings()
    loss, metrics = contrastive.clip_loss(images, texts, jnp.log(10.0))
    expected = _numpy_clip_loss(np.float64(images), np.float64(texts), 10.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0.0 <= metrics["acc_i2t"] <= 1.0


def test_sigmoid_loss_matches_numpy():
    images, texts = _embeddings()
    loss, _ = contrastive.sigmoid_loss(images, texts, jnp.log(10.0), jnp.asarray(-10.0))
    i = np.float64(images) / np.linalg.norm(images, axis=1, keepdims=True)
    t = np.float64(texts) / np.linalg.norm(texts, axis=1, keepdims=True)
    logits = 10.0 * i @ t.T - 10.0
    signs = 2 * np.eye(len(i)) - 1
    expected = np.log1p(np.exp(-signs * logits)).sum() / len(i)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["clip", "sigmoid"])
def test_sharded_loss_and_gradients_equal_single_device(loss_name, mesh_2x2x2):
    images, texts = _embeddings(n=16)
    scale, bias = jnp.log(10.0), jnp.asarray(-3.0)

    def loss(images, texts, scale, bias):
        if loss_name == "clip":
            return contrastive.clip_loss(images, texts, scale)[0]
        return contrastive.sigmoid_loss(images, texts, scale, bias)[0]

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    expected_loss, expected_grads = jax.jit(grad_fn)(images, texts, scale, bias)

    batch = parallel.batch_sharding(mesh_2x2x2, 2)
    with jax.set_mesh(mesh_2x2x2):
        sharded = jax.jit(grad_fn, in_shardings=(batch, batch, None, None))
        text = sharded.lower(images, texts, scale, bias).as_text()
        got_loss, got_grads = sharded(
            jax.device_put(images, batch), jax.device_put(texts, batch), scale, bias
        )
    # Each device scores its 4 local rows against the 16 gathered ones, never all 16 x 16.
    assert "all_gather" in text or "all-gather" in text
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    for got, want in zip(got_grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_text_pairs_add_their_weighted_infonce():
    model = CLIP(CLIPConfig.from_name("tiny-vit", context_length=8, vocab_size=64))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
        **{
            k: jnp.asarray(rng.integers(1, 64, (4, 8)), jnp.int32)
            for k in ("tokens", "pair_a", "pair_b")
        },
    }
    variables = nn.meta.unbox(
        model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])
    )
    params = variables["params"]
    plain, _ = contrastive.clip_loss_fn(model)(params, {}, batch, None)
    value, (metrics, _) = contrastive.clip_loss_fn(model, text_pairs=0.5)(params, {}, batch, None)
    a, b = (model.apply(variables, batch[k], method="encode_text") for k in ("pair_a", "pair_b"))
    pair_loss = _numpy_clip_loss(np.asarray(a), np.asarray(b), np.exp(float(params["logit_scale"])))
    np.testing.assert_allclose(metrics["loss_text_pairs"], pair_loss, rtol=1e-5)
    np.testing.assert_allclose(value, plain + 0.5 * pair_loss, rtol=1e-5)
