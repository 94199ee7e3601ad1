"""The KV-cache sampler against a naive loop that re-runs the whole model every step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.sample.decode import filter_logits, sample, sample_image_tokens

TINY = GPTConfig(vocab_size=16, context_length=8, width=32, layers=2, heads=2)


def _params(config: GPTConfig, seed: int = 0):
    """Random parameters drawn with NumPy (compiling Flax's initialisers would cost more than the
    test). Layer norms start as the identity, so that the logits depend on the tokens rather than
    on the final norm's bias."""
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(GPT(config).init, jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "ln_" in name:
            return np.full(leaf.shape, "scale" in name, leaf.dtype)
        std = 1.0 if "embedding" in name else 0.3
        return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _naive_greedy(config: GPTConfig, params, prompt: np.ndarray, steps: int) -> np.ndarray:
    apply = jax.jit(GPT(config).apply)
    tokens = prompt
    for _ in range(steps):
        logits = apply({"params": params}, tokens)  # (b, t, v): the whole sequence again
        tokens = np.concatenate([tokens, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
    return tokens[:, prompt.shape[1] :]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_matches_naive_loop(scan_layers):
    config = TINY.replace(scan_layers=scan_layers)
    params = _params(config)
    prompt = np.array([[1, 2, 3], [7, 0, 7], [15, 4, 9]], np.int32)
    steps = config.context_length - prompt.shape[1]  # fill the context exactly
    got = sample(config, params, prompt, steps=steps, rng=jax.random.key(1))
    want = _naive_greedy(config, params, prompt, steps)
    assert len(np.unique(want)) > steps  # varied tokens: a cache bug cannot hide
    assert got.shape == (3, steps) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


def test_temperature_sampling_is_seeded():
    params = _params(TINY)
    prompt = np.array([[1, 2], [3, 4]], np.int32)

    def draw(seed: int) -> np.ndarray:
        rng = jax.random.key(seed)
        return np.asarray(sample(TINY, params, prompt, steps=6, rng=rng, temperature=1.0))

    a, b = draw(0), draw(1)
    np.testing.assert_array_equal(a, draw(0))
    assert a.shape == (2, 6) and not np.array_equal(a, b)
    assert ((a >= 0) & (a < TINY.vocab_size)).all()


def test_too_long_raises():
    params = _params(TINY)
    prompt = np.zeros((1, 5), np.int32)
    with pytest.raises(ValueError, match="exceeds the context length"):
        sample(TINY, params, prompt, steps=TINY.context_length - 4, rng=jax.random.key(0))


def _numpy_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Row by row: keep the top_k largest, then the most likely tokens until their mass reaches
    top_p (at least one)."""
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        keep = 1
        while keep < len(order) and probs[:keep].sum() < top_p:
            keep += 1
        out[r, order[:keep]] = row[order[:keep]]
    return out


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (1, 0.3)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 12)).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(got, _numpy_filter(logits, top_k, top_p))


DALLE_TINY = DALLEConfig(
    text_len=5,
    text_vocab=20,
    image_side=4,
    image_vocab=16,
    width=32,
    layers=4,
    heads=2,
    conv_kernel=3,
    layer_kinds=("row", "column", "conv", "dense"),
)


def _dalle_params(config: DALLEConfig, seed: int = 0):
    text = jax.ShapeDtypeStruct((1, config.text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((1, config.image_len), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(DALLE(config).init, jax.random.key(0), text, image))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "ln_" in name:
            return np.full(leaf.shape, "scale" in name, leaf.dtype)
        return rng.normal(0.0, 1.0 if "embedding" in name else 0.3, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dalle_greedy_with_the_cache_matches_full_forward_passes(scan_layers):
    config = DALLE_TINY.replace(scan_layers=scan_layers)
    params = _dalle_params(config)
    text = np.array([[3, 7, 1, 0, 0], [19, 2, 2, 5, 8]], np.int32)
    got = np.asarray(
        sample_image_tokens(config, params, text, rng=jax.random.key(0), temperature=0)
    )
    apply = jax.jit(DALLE(config).apply)
    # The whole sequence again for every token; the not yet drawn tail is zeros, which a causal
    # model cannot see (one compilation for every step).
    image = np.zeros((2, config.image_len), np.int32)
    for i in range(config.image_len):
        _, logits = apply({"params": params}, text, image)
        image[:, i] = np.asarray(logits[:, i].argmax(-1))
    assert len(np.unique(image)) > 4  # varied tokens: a cache or mask bug cannot hide
    assert got.shape == (2, config.image_len) and got.dtype == np.int32
    np.testing.assert_array_equal(got, image)


def test_dalle_sampling_is_seeded_and_top_k_1_is_greedy():
    params = _dalle_params(DALLE_TINY)
    text = np.array([[3, 7, 1, 0, 0]] * 4, np.int32)

    def draw(seed, **options):
        rng = jax.random.key(seed)
        return np.asarray(sample_image_tokens(DALLE_TINY, params, text, rng=rng, **options))

    a = draw(0)
    np.testing.assert_array_equal(a, draw(0))
    assert not np.array_equal(a, draw(1))
    assert len({tuple(row) for row in a}) > 1  # candidates of one caption differ
    np.testing.assert_array_equal(draw(5, top_k=1), draw(0, temperature=0))


def test_bad_sampling_arguments_name_the_value():
    params = _dalle_params(DALLE_TINY)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="text_len = 5"):
        sample_image_tokens(DALLE_TINY, params, np.zeros((1, 6), np.int32), rng=key)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_image_tokens(DALLE_TINY, params, np.zeros((1, 5), np.int32), rng=key, top_p=0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        sample(TINY, _params(TINY), np.zeros((1, 2), np.int32), steps=2, rng=key, top_k=-1)
