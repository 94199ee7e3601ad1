"""The KV-cache sampler against a naive loop that re-runs the whole model every step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.sample.decode import (
    _sample_gpt,
    filter_logits,
    generate,
    sample,
    sample_image_tokens,
)

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


def test_the_cache_holds_the_prompt_and_the_steps_not_the_context():
    """Each step reads every cached slot, so a context-length cache would cost the whole context
    at every token: the compiled sampler's scratch memory must not grow with the context."""
    prompt = jnp.zeros((2, 3), jnp.int32)

    def scratch_bytes(context_length):
        config = TINY.replace(context_length=context_length, decode=True)
        lowered = _sample_gpt.lower(
            config,
            _params(config),
            prompt,
            jnp.ones(prompt.shape, bool),
            jax.random.key(0),
            steps=4,
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            eos_id=None,
            pad_id=0,
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert scratch_bytes(4096) == scratch_bytes(8)


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


def _left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, prompts))
    tokens = np.zeros((len(prompts), length), np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :], valid[row, length - len(prompt) :] = prompt, True
    return tokens, valid


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)]
)
def test_left_padded_batch_equals_each_prompt_alone(temperature, top_k, top_p):
    config = TINY.replace(context_length=12)
    params = _params(config)
    prompts = [[1, 2, 3, 4], [5], [9, 8]]
    keys = jax.random.split(jax.random.key(3), 3)
    args = dict(steps=7, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=0, pad_id=15)
    tokens, valid = _left_pad(prompts)
    batch = generate(config, params, tokens, valid=valid, rng=keys, **args)
    for row, prompt in enumerate(prompts):
        alone = generate(config, params, np.array([prompt]), rng=keys[row : row + 1], **args)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_array_equal(batch.mask[row], alone.mask[0])
        np.testing.assert_allclose(batch.logprobs[row], alone.logprobs[0], rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.asarray(batch.tokens))) > 3  # varied tokens: a bug cannot hide


def test_eos_stops_a_row_and_logprobs_are_at_the_temperature():
    config = TINY.replace(context_length=16)
    params = _params(config)
    tokens, valid = _left_pad([[1, 2, 3], [4, 5], [6, 7, 8], [9]])
    args = dict(steps=12, rng=jax.random.key(0), temperature=1.3, pad_id=11)
    free = np.asarray(generate(config, params, tokens, valid=valid, **args).tokens)
    eos = int(free[0, 2])  # row 0 stops at step 2 at the latest
    got, logprobs, mask = map(
        np.asarray, generate(config, params, tokens, valid=valid, eos_id=eos, **args)
    )
    for row in range(4):
        ends = np.flatnonzero(free[row] == eos)
        end = ends[0] if len(ends) else 11
        # Until its EOS a row draws what it draws without one; then padding, masked, log-prob 0.
        np.testing.assert_array_equal(got[row, : end + 1], free[row, : end + 1])
        assert mask[row, : end + 1].all() and not mask[row, end + 1 :].any()
        assert (got[row, end + 1 :] == 11).all() and (logprobs[row, end + 1 :] == 0).all()
    assert not mask[0].all()
    # The log-probs equal log softmax(logits / temperature) of a full forward on the sequences.
    sequence = np.concatenate([tokens, got], 1)
    full_valid = np.concatenate([valid, mask], 1)
    logits = GPT(config).apply({"params": params}, sequence, valid=full_valid)
    p = tokens.shape[1]
    want = jax.nn.log_softmax(logits[:, p - 1 : -1] / 1.3)
    want = np.take_along_axis(np.asarray(want), got[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_generate_bad_inputs_are_named():
    params = _params(TINY)
    prompt = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="eos_id 16 is outside the vocabulary of 16"):
        generate(TINY, params, prompt, steps=2, rng=jax.random.key(0), eos_id=16)
    with pytest.raises(ValueError, match=r"valid has shape \(2, 2\)"):
        generate(TINY, params, prompt, steps=2, rng=jax.random.key(0), valid=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"one per row \(2\)"):
        generate(TINY, params, prompt, steps=2, rng=jax.random.split(jax.random.key(0), 3))
