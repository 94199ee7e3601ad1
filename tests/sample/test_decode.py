"""The KV-cache sampler against a naive loop that re-runs the whole model every step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.sample.decode import sample

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
