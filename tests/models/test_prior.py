"""The unCLIP diffusion prior: sizes, logical axes, the causal mask, conditioning dropout, input
errors, the loss falling on synthetic data, best-of-n sampling and a sharded train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.models.prior import PRESETS, Prior, PriorConfig
from jaxaigc.objectives.unclip import prior_loss_fn
from jaxaigc.sample.diffusion import sample_prior
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step
from tests.helpers import (
    assert_logical_axes,
    assert_one_step_matches_one_device,
    per_device_fraction,
)

TINY = PriorConfig.from_name("tiny")
KEY = jax.random.key(0)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(config, batch=4, seed=0):
    """Synthetic CLIP features: z_i a fixed linear map of z_t (so the caption predicts it), the
    caption tokens noisy copies of z_t's projection, the last 3 tokens padding."""
    rng = np.random.default_rng(seed)
    z_t = unit(rng.standard_normal((batch, config.embed_dim))).astype(np.float32)
    mix = np.random.default_rng(123).standard_normal((config.embed_dim, config.embed_dim))
    z_i = unit(z_t @ mix).astype(np.float32)
    up = np.random.default_rng(7).standard_normal((config.embed_dim, config.text_width))
    tokens = (z_t @ up)[:, None] + 0.1 * rng.standard_normal(
        (batch, config.text_len, config.text_width)
    )
    mask = np.ones((batch, config.text_len), bool)
    mask[:, -3:] = False
    return {
        "text_tokens": tokens.astype(np.float32),
        "text_embedding": z_t,
        "image_embedding": z_i,
        "text_mask": mask,
    }


def model_inputs(config, batch=4, seed=0):
    data = make_batch(config, batch, seed)
    x = np.random.default_rng(seed + 1).standard_normal((batch, config.embed_dim))
    t = np.arange(batch, dtype=np.int32) * 100
    return x.astype(np.float32), t, data["text_tokens"], data["text_embedding"]


@pytest.fixture(scope="module")
def tiny_params():
    return nn.meta.unbox(jax.jit(Prior(TINY).init)(KEY, *model_inputs(TINY))["params"])


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def expected_count(c: PriorConfig) -> int:
    d, e, hidden = c.width, c.embed_dim, int(c.width * c.mlp_ratio)
    block = 4 * d * d + 3 * d + 2 * d * hidden + hidden + d + 4 * d  # attn, mlp, two LayerNorms
    projections = (c.text_width + 2 * e + 2 * d) * d + 5 * d  # text, z_t, x, time fc / proj
    embeddings = (c.text_len + 2 + c.length) * d  # null tokens, null z_t, query, positions
    return c.layers * block + projections + embeddings + 2 * d + d * e + e


def abstract_init(config):
    shapes = [
        ((1, config.embed_dim), jnp.float32),
        ((1,), jnp.int32),
        ((1, config.text_len, config.text_width), jnp.float32),
        ((1, config.embed_dim), jnp.float32),
    ]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.eval_shape(Prior(config).init, KEY, *args)["params"]


# Karlo's presets: counted against diffusers' modules in tests/convert/test_karlo.py.
@pytest.mark.parametrize("name", [name for name in PRESETS if not name.startswith("karlo")])
def test_preset_parameter_counts(name):
    config = PriorConfig.from_name(name)
    params = abstract_init(config)
    assert count(params) == expected_count(config)
    if name == "paper-1b":
        assert (config.width, config.layers, config.text_len, config.embed_dim) == (
            2048,
            24,
            77,
            768,
        )
        assert 1.2e9 < count(params) < 1.25e9  # 1,223,572,224: the paper's "1B" prior


@pytest.mark.parametrize(
    "name, changes", [("tiny", {}), ("tiny", {"scan_layers": True}), ("paper-1b", {})]
)
def test_every_parameter_has_logical_axis_names(name, changes):
    params = abstract_init(PriorConfig.from_name(name, **changes))
    assert_logical_axes(params)


def test_paper_1b_shards_over_fsdp_and_tensor(mesh_2x2x2):
    """Each device of a 2x2x2 mesh holds a quarter of the parameters (fsdp x tensor = 4)."""
    rules = parallel.make_rules()
    with nn.logical_axis_rules(rules):
        abstract = abstract_init(PriorConfig.from_name("paper-1b"))
    assert per_device_fraction(abstract, mesh_2x2x2, rules) < 0.251


def hidden_states(params, inputs, **kwargs):
    """The transformer's output at every position [b, n + 4, width], and the prediction."""
    out, state = Prior(TINY).apply(
        {"params": params}, *inputs, capture_intermediates=True, **kwargs
    )
    return np.asarray(state["intermediates"]["transformer"]["__call__"][0]), np.asarray(out)


def test_output_shape_and_the_causal_mask(tiny_params):
    inputs = model_inputs(TINY)
    hidden, out = hidden_states(tiny_params, inputs)
    assert out.shape == (4, TINY.embed_dim) and hidden.shape == (4, TINY.text_len + 4, TINY.width)
    # The final query sees everything but nothing sees it.
    delta = np.random.default_rng(0).standard_normal(TINY.width).astype(np.float32)
    moved = {**tiny_params, "final_query": tiny_params["final_query"] + delta}
    hidden_q, out_q = hidden_states(moved, inputs)
    np.testing.assert_array_equal(hidden_q[:, :-1], hidden[:, :-1])
    assert np.abs(out_q - out).max() > 1e-3
    # Changing the first caption token changes every later position, the output included.
    x, t, tokens, z_t = inputs
    tokens = tokens.copy()
    tokens[:, 0] += 1.0
    hidden_c, out_c = hidden_states(tiny_params, (x, t, tokens, z_t))
    assert np.abs(hidden_c - hidden).max(axis=(0, 2)).min() > 1e-4
    assert np.abs(out_c - out).max() > 1e-4
    # The noised embedding (position n + 2) is seen by the query only, not by the tokens before.
    hidden_x, _ = hidden_states(tiny_params, (x + 1.0, t, *inputs[2:]))
    np.testing.assert_array_equal(hidden_x[:, : TINY.text_len + 2], hidden[:, : TINY.text_len + 2])


def test_the_null_path_ignores_the_caption(tiny_params):
    apply = jax.jit(Prior(TINY).apply)
    x, t, tokens, z_t = model_inputs(TINY)
    _, _, other_tokens, other_z_t = model_inputs(TINY, seed=5)
    variables = {"params": tiny_params}
    null = np.zeros(4, bool)
    unconditional = apply(variables, x, t, tokens, z_t, conditional=null)
    np.testing.assert_array_equal(
        apply(variables, x, t, other_tokens, other_z_t, conditional=null), unconditional
    )
    conditional = apply(variables, x, t, tokens, z_t, conditional=~null)
    assert np.abs(conditional - unconditional).min(axis=-1).max() > 0
    np.testing.assert_array_equal(conditional, apply(variables, x, t, tokens, z_t))
    # Per example: only the rows whose flag is False lose their caption.
    mixed = apply(variables, x, t, tokens, z_t, conditional=np.array([True, False, True, False]))
    np.testing.assert_array_equal(mixed[::2], conditional[::2])
    np.testing.assert_array_equal(mixed[1::2], unconditional[1::2])
    # Padded caption positions (text_mask False) do not read their features.
    mask = np.ones((4, TINY.text_len), bool)
    mask[:, 5:] = False
    spliced = tokens.copy()
    spliced[:, 5:] = other_tokens[:, 5:]
    np.testing.assert_array_equal(
        apply(variables, x, t, tokens, z_t, text_mask=mask),
        apply(variables, x, t, spliced, z_t, text_mask=mask),
    )


def test_training_drops_the_caption_with_the_configured_probability(tiny_params):
    x, t, tokens, z_t = model_inputs(TINY)
    variables = {"params": tiny_params}
    null = Prior(TINY).apply(variables, x, t, tokens, z_t, conditional=np.zeros(4, bool))

    def train(config):
        return Prior(config).apply(variables, x, t, tokens, z_t, train=True, rngs={"dropout": KEY})

    np.testing.assert_allclose(train(TINY.replace(text_drop=1.0)), null, atol=1e-6)
    kept = Prior(TINY).apply(variables, x, t, tokens, z_t)
    np.testing.assert_allclose(train(TINY.replace(text_drop=0.0)), kept, atol=1e-6)


def test_errors_name_the_value_and_the_limit(tiny_params):
    x, t, tokens, z_t = model_inputs(TINY)
    apply = Prior(TINY).apply
    variables = {"params": tiny_params}
    with pytest.raises(
        ValueError, match="text_embedding has width 32, the config's embed_dim is 64"
    ):
        apply(variables, x, t, tokens, z_t[:, :32])
    with pytest.raises(ValueError, match="x has width 65, the config's embed_dim is 64"):
        apply(variables, np.pad(x, ((0, 0), (0, 1))), t, tokens, z_t)
    with pytest.raises(
        ValueError, match="text_tokens has width 100, the config's text_width is 128"
    ):
        apply(variables, x, t, tokens[..., :100], z_t)
    with pytest.raises(ValueError, match="text_tokens has 15 tokens, the config's text_len is 16"):
        apply(variables, x, t, tokens[:, :15], z_t)
    with pytest.raises(ValueError, match="width 130 is not divisible by 4 heads"):
        PriorConfig.from_name("tiny", width=130)
    with pytest.raises(ValueError, match=r"text_drop 1.5 is outside \[0, 1\]"):
        PriorConfig.from_name("tiny", text_drop=1.5)
    with pytest.raises(ValueError, match="unknown prior model 'huge'"):
        PriorConfig.from_name("huge")
    diffusion = TINY.replace(num_timesteps=10).diffusion()
    with pytest.raises(ValueError, match="guidance_scale 3.0 needs .* text_drop is 0"):
        sample_prior(
            Prior(TINY.replace(text_drop=0.0)), tiny_params, diffusion, tokens, z_t, KEY,
            guidance_scale=3.0,
        )  # fmt: skip


def test_loss_falls_on_synthetic_data():
    config = TINY.replace(layers=2, num_timesteps=100)
    model, diffusion = Prior(config), config.diffusion()
    batch = make_batch(config, batch=32)
    params = nn.meta.unbox(model.init(KEY, *model_inputs(config))["params"])
    loss_fn = prior_loss_fn(model, diffusion)
    tx = optax.adam(1e-3)

    @jax.jit
    def train(params, opt_state):
        def step(carry, i):
            params, opt_state = carry
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch, jax.random.fold_in(KEY, i)
            )
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), (loss, metrics["cos"])

        return jax.lax.scan(step, (params, opt_state), jnp.arange(80))[1]

    losses, cos = train(params, tx.init(params))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert np.mean(cos[-10:]) > np.mean(cos[:10]) + 0.2


def test_sample_prior_keeps_the_candidate_closest_to_the_caption(tiny_params):
    config = TINY.replace(num_timesteps=20)
    model, diffusion = Prior(config), config.diffusion()
    _, _, tokens, z_t = model_inputs(config)
    out = sample_prior(model, tiny_params, diffusion, tokens, z_t, KEY, steps=5, candidates=3)
    assert out.shape == (4, config.embed_dim)
    # The three candidates of the same call, drawn alone (candidate c is rows c b .. (c + 1) b).
    each = sample_prior(
        model, tiny_params, diffusion, np.tile(tokens, (3, 1, 1)), np.tile(z_t, (3, 1)), KEY,
        steps=5, candidates=1,
    ).reshape(3, 4, -1)  # fmt: skip
    best = np.argmax(np.einsum("cbd,bd->cb", each, z_t), axis=0)
    np.testing.assert_allclose(out, each[best, np.arange(4)], rtol=1e-5, atol=1e-5)
    guided = sample_prior(
        model, tiny_params, diffusion, tokens, z_t, KEY, steps=5, guidance_scale=2
    )
    assert guided.shape == (4, config.embed_dim) and np.all(np.isfinite(guided))


def train_state(mesh, rules):
    model = Prior(TINY)
    batch = make_batch(TINY, batch=8)
    tx = optax.sgd(0.1)
    inputs = [a[:1] for a in model_inputs(TINY)]
    state, shardings, _ = create_sharded_state(
        lambda rng: model.init(rng, *inputs), tx, KEY, mesh, rules
    )
    step = make_train_step(prior_loss_fn(model, TINY.diffusion()), tx, rng=jax.random.key(1))
    batch = parallel.shard_batch(batch, mesh)
    return state, jit_train_step(step, mesh, rules, shardings, batch), batch


@pytest.mark.slow
def test_one_step_on_a_2x2x2_mesh_equals_one_device(mesh_1, mesh_2x2x2):
    assert_one_step_matches_one_device(train_state, mesh_1, mesh_2x2x2)
