"""The unCLIP decoder: sizes, logical axes, conditioning and its dropout, input errors, the loss
(fixed and learned variances) on synthetic data, sampling and a sharded train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.models.decoder import PRESETS, Decoder, DecoderConfig
from jaxaigc.objectives.diffusion import sample_timesteps
from jaxaigc.objectives.unclip import decoder_loss_fn
from jaxaigc.sample.diffusion import _decoder_fn, classifier_free_guidance, guided, sample_decoder
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step
from tests.helpers import (
    assert_logical_axes,
    assert_one_step_matches_one_device,
    max_relative_difference,
    per_device_fraction,
)

TINY = DecoderConfig.from_name("tiny")
# Faster still, for training loops: 16 px, two levels, one text layer.
SMALL = TINY.replace(image_size=16, channel_mult=(1, 2), attention_resolutions=(8,), text_layers=1)
KEY = jax.random.key(0)


def make_batch(config, batch=4, seed=0):
    """Synthetic scenes: a flat colour given by the first 3 embedding components, captions whose
    tokens 1..4 are drawn at random (0 pads the rest)."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((batch, config.clip_dim)).astype(np.float32)
    embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)
    colour = np.tanh(3 * embedding[:, :3])
    image = np.broadcast_to(colour[:, None, None], (batch, config.image_size, config.image_size, 3))
    text = np.zeros((batch, config.text_len), np.int32)
    text[:, :4] = rng.integers(1, config.text_vocab, (batch, 4))
    return {"image": image.astype(np.float32), "image_embedding": embedding, "text_tokens": text}


def model_inputs(config, batch=4, seed=0):
    data = make_batch(config, batch, seed)
    x = np.random.default_rng(seed + 1).standard_normal(data["image"].shape).astype(np.float32)
    t = np.arange(batch, dtype=np.int32) * 100
    return x, t, data["image_embedding"], data["text_tokens"]


def random_params(config, seed=1):
    """Random values in the shapes ``init`` gives, without compiling ``init`` (a UNet's init is
    as slow to compile as its forward pass): N(0, 0.05^2), norm scales around 1. Unlike the
    initial values (zero-initialised output layers: an untrained decoder predicts 0 whatever its
    conditioning), every input reaches the output."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + (jax.tree_util.keystr(path).endswith("['scale']"))

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_init(config)))


@pytest.fixture(scope="module")
def small_params():
    return random_params(SMALL)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(config):
    r = config.image_size
    shapes = [
        ((1, r, r, config.in_channels), jnp.float32),
        ((1,), jnp.int32),
        ((1, config.clip_dim), jnp.float32),
        ((1, config.text_len), jnp.int32),
    ]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes[: 4 if config.text_layers else 3]]
    return jax.eval_shape(Decoder(config).init, KEY, *args)["params"]


def text_encoder_count(c: DecoderConfig) -> int:
    d = c.context_width
    block = 12 * d * d + 12 * d  # attention (no key bias), MLP, two LayerNorms
    return c.text_layers * block + (c.text_vocab + 2 * c.text_len) * d + 2 * d


# Karlo's presets: counted against diffusers' modules in tests/convert/test_karlo.py.
@pytest.mark.parametrize("name", [name for name in PRESETS if not name.startswith("karlo")])
def test_preset_parameter_counts(name):
    config = DecoderConfig.from_name(name)
    params = abstract_init(config)
    assert count(params["text_encoder"]) == text_encoder_count(config)
    if name == "tiny":
        assert count(params) == 1_681_571
    else:  # GLIDE: 2.3B in the UNet, 1.2B in the text transformer; unCLIP: 3.5B
        assert (config.image_size, config.model_channels, config.num_res_blocks) == (64, 512, 3)
        assert 2.2e9 < count(params["unet"]) < 2.3e9  # 2,232,903,683
        assert 3.5e9 < count(params) < 3.6e9  # 3,562,488,579


@pytest.mark.parametrize("name", [name for name in PRESETS if not name.startswith("karlo")])
def test_every_parameter_has_logical_axis_names(name):
    params = abstract_init(DecoderConfig.from_name(name))
    assert_logical_axes(params)


def test_paper_3_5b_shards_over_fsdp_and_tensor(mesh_2x2x2):
    """The default rules leave convolution input channels (conv_in) replicated (the Shardy
    workaround in ``parallel.partitioner``), so the UNet's convolutions split over tensor only;
    mapping conv_in to fsdp brings the whole model to a quarter per device."""
    rules = parallel.make_rules()
    with nn.logical_axis_rules(rules):
        abstract = abstract_init(DecoderConfig.from_name("paper-3.5b"))
    assert per_device_fraction(abstract, mesh_2x2x2, rules) < 0.375
    conv_in_fsdp = parallel.make_rules({"conv_in": "fsdp"})
    assert per_device_fraction(abstract, mesh_2x2x2, conv_in_fsdp) < 0.258


@pytest.mark.parametrize("variance, channels", [("fixed_small", 3), ("learned_range", 6)])
def test_output_has_the_input_shape(variance, channels):
    config = TINY.replace(variance=variance)
    inputs = model_inputs(config)
    params = abstract_init(config)
    out = jax.eval_shape(Decoder(config).apply, {"params": params}, *inputs)
    assert out.shape == (4, 32, 32, channels) and out.dtype == jnp.float32


def test_the_null_path_ignores_image_embedding_and_caption(small_params):
    apply = jax.jit(Decoder(SMALL).apply)
    variables = {"params": small_params}
    x, t, embedding, text = model_inputs(SMALL)
    _, _, other_embedding, other_text = model_inputs(SMALL, seed=5)
    null = np.zeros(4, bool)
    unconditional = apply(variables, x, t, embedding, text, conditional=null)
    np.testing.assert_array_equal(
        apply(variables, x, t, other_embedding, other_text, conditional=null), unconditional
    )
    conditional = apply(variables, x, t, embedding, text)
    differs = lambda a, b: np.abs(np.asarray(a - b)).reshape(4, -1).max(-1).min() > 1e-4  # noqa: E731
    assert differs(conditional, unconditional)
    assert differs(conditional, apply(variables, x, t, other_embedding, text))
    assert differs(conditional, apply(variables, x, t, embedding, other_text))
    mixed = apply(variables, x, t, embedding, text, conditional=np.array([True, False] * 2))
    np.testing.assert_array_equal(mixed[::2], conditional[::2])
    np.testing.assert_array_equal(mixed[1::2], unconditional[1::2])


def test_training_drops_image_embedding_and_caption_independently(small_params):
    variables = {"params": small_params}
    x, t, embedding, text = model_inputs(SMALL)
    _, _, other_embedding, other_text = model_inputs(SMALL, seed=5)

    @functools.partial(jax.jit, static_argnums=(0,))
    def train(config, embedding, text):
        return Decoder(config).apply(
            variables, x, t, embedding, text, train=True, rngs={"dropout": KEY}
        )

    null = jax.jit(Decoder(SMALL).apply)(
        variables, x, t, embedding, text, conditional=np.zeros(4, bool)
    )
    both = SMALL.replace(image_drop=1.0, text_drop=1.0)
    np.testing.assert_allclose(train(both, embedding, text), null, atol=1e-5)
    image_only = SMALL.replace(image_drop=1.0, text_drop=0.0)  # the caption still conditions
    out = train(image_only, embedding, text)
    np.testing.assert_array_equal(out, train(image_only, other_embedding, text))
    assert max_relative_difference(out, train(image_only, embedding, other_text)) > 1e-3


def test_the_image_embedding_enters_scaled_to_unit_variance_components(small_params):
    x, t, embedding, text = model_inputs(SMALL)
    apply = lambda config, z: jax.jit(Decoder(config).apply)(  # noqa: E731
        {"params": small_params}, x, t, z, text
    )
    scale = SMALL.clip_dim**0.5
    np.testing.assert_allclose(
        apply(SMALL, embedding),
        apply(SMALL.replace(scale_embedding=False), scale * embedding),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_v_prediction_regresses_v(small_params):
    """The loss of a v-predicting decoder is the MSE against v = sqrt(ab) eps - sqrt(1 - ab) x0
    at the t and noise it drew (the loss's own split of the rng)."""
    config = SMALL.replace(prediction="v")
    model, diffusion = Decoder(config), config.diffusion()
    batch = make_batch(config)
    loss, _ = jax.jit(decoder_loss_fn(model, diffusion))(small_params, batch, KEY)
    model_rng, t_rng, noise_rng = jax.random.split(KEY, 3)
    t = sample_timesteps(t_rng, 4, diffusion.num_timesteps)
    x0 = batch["image"]
    noise = jax.random.normal(noise_rng, x0.shape)
    ab = diffusion.alphas_cumprod[np.asarray(t)][:, None, None, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    out = model.apply(
        {"params": small_params}, xt, diffusion.model_timesteps(t), batch["image_embedding"],
        batch["text_tokens"], train=True, rngs={"dropout": model_rng},
    )  # fmt: skip
    v = np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0
    np.testing.assert_allclose(loss, np.mean(np.square(out - v)), rtol=1e-4)
    assert abs(float(loss) - float(np.mean(np.square(out - noise)))) > 1e-3  # not the eps MSE


def test_errors_name_the_value_and_the_limit(small_params):
    variables = {"params": small_params}
    apply = Decoder(SMALL).apply
    x, t, embedding, text = model_inputs(SMALL)
    with pytest.raises(
        ValueError, match="image_embedding has width 32, the config's clip_dim is 64"
    ):
        apply(variables, x, t, embedding[:, :32], text)
    with pytest.raises(ValueError, match=r"image size 15x15 cannot be halved 1 times .* by 2"):
        apply(variables, x[:, :15, :15], t, embedding, text)
    with pytest.raises(ValueError, match="give text"):
        apply(variables, x, t, embedding)
    with pytest.raises(ValueError, match=r"text of shape \(4, 17\) exceeds text_len 16"):
        apply(variables, x, t, embedding, np.pad(text, ((0, 0), (0, 1))))
    with pytest.raises(ValueError, match="image_size 34 cannot be halved 2 times .* multiple of 4"):
        TINY.replace(image_size=34)
    with pytest.raises(ValueError, match=r"attention resolution 4 is not a UNet level's side"):
        TINY.replace(attention_resolutions=(16, 4))
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        TINY.replace(variance="learned")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        TINY.replace(prediction="score")
    with pytest.raises(ValueError, match=r"unknown unet_remat_policy 'all'; known: \['dots'"):
        TINY.replace(unet_remat_policy="all")
    diffusion = SMALL.replace(num_timesteps=10).diffusion()
    no_image_drop = Decoder(SMALL.replace(image_drop=0.0))
    with pytest.raises(ValueError, match="guidance_scale 3.0 needs .* image_drop is 0"):
        sample_decoder(
            no_image_drop, small_params, diffusion, embedding, KEY, text=text, guidance_scale=3.0
        )


def train_loop(config, steps, batch_size=8):
    """Adam on a fixed synthetic batch: the per-step losses (a Python loop over one jitted step:
    XLA:CPU ran the same steps inside a ``lax.scan`` 10x slower)."""
    model, diffusion = Decoder(config), config.replace(num_timesteps=100).diffusion()
    batch = make_batch(config, batch=batch_size)
    params = nn.meta.unbox(model.init(KEY, *model_inputs(config, batch=1))["params"])
    loss_fn = decoder_loss_fn(model, diffusion)
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, i):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, _), grads = grad_fn(params, batch, jax.random.fold_in(KEY, i))
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, i)
        losses.append(loss)
    return np.asarray(losses)


@pytest.mark.slow
def test_loss_falls_on_synthetic_data():
    losses = train_loop(SMALL, 30)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)


def test_learned_variances_train_through_the_variational_bound():
    config = SMALL.replace(
        variance="learned_range", channel_mult=(1,), attention_resolutions=(), text_layers=0
    )
    model, diffusion = Decoder(config), config.replace(num_timesteps=100).diffusion()
    batch = make_batch(config)
    del batch["text_tokens"]
    params = random_params(config)
    loss_fn = decoder_loss_fn(model, diffusion)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, KEY)
    assert np.isfinite(loss) and np.isfinite(metrics["vlb"]) and metrics["vlb"] > 0
    # L_hybrid = L_simple + 0.001 T L_t (T = 100 here).
    np.testing.assert_allclose(loss, metrics["mse"] + 0.1 * metrics["vlb"], rtol=1e-5)
    kernel = np.asarray(grads["unet"]["out_conv"]["kernel"])
    assert np.abs(kernel[..., 3:]).max() > 0  # the variance channels learn


def test_unet_remat_gives_the_same_loss_and_gradients(small_params):
    """Rematerialised UNet blocks (dropout on: the recomputation must redraw the same masks)
    give the loss and every gradient of the stored-activation UNet, with the same parameters."""
    diffusion = SMALL.diffusion()
    batch = make_batch(SMALL)
    results = {}
    for policy in ("none", "full"):
        model = Decoder(SMALL.replace(dropout_rate=0.1, unet_remat_policy=policy))
        grad_fn = jax.value_and_grad(decoder_loss_fn(model, diffusion), has_aux=True)
        jaxpr = str(jax.make_jaxpr(grad_fn)(small_params, batch, KEY))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none")
        (loss, _), grads = jax.jit(grad_fn)(small_params, batch, KEY)
        results[policy] = (loss, grads)
    (loss, grads), (remat_loss, remat_grads) = results["none"], results["full"]
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_sampling_gives_images_in_range(small_params):
    config = SMALL.replace(num_timesteps=20)
    _, _, embedding, text = model_inputs(config, batch=2)
    diffusion = config.diffusion()
    for method, scale in (("ddpm", 1.0), ("ddim", 3.0)):
        images = sample_decoder(
            Decoder(config), small_params, diffusion, embedding, KEY, text=text, steps=4,
            guidance_scale=scale, method=method,
        )  # fmt: skip
        assert images.shape == (2, 16, 16, 3)
        assert np.all(np.abs(np.asarray(images)) <= 1.0 + 1e-6)


def test_guided_decoding_mixes_the_captioned_and_the_null_prediction(small_params):
    """The sampler's guided model of a caption-reading decoder is uncond + s (cond - uncond),
    with uncond the null image embedding and the null caption: any embedding and caption give
    the same unconditional half."""
    x, t, embedding, text = model_inputs(SMALL)
    _, _, other_embedding, other_text = model_inputs(SMALL, seed=5)
    apply = jax.jit(Decoder(SMALL).apply)
    variables = {"params": small_params}
    cond = apply(variables, x, t, embedding, text)
    uncond = apply(variables, x, t, other_embedding, other_text, conditional=np.zeros(4, bool))
    fn = jax.tree_util.Partial(_decoder_fn(SMALL), small_params, embedding, text, None, None)
    out = jax.jit(guided(fn, 3.0))(x, t)
    np.testing.assert_allclose(out, classifier_free_guidance(cond, uncond, 3.0), atol=1e-4)
    assert max_relative_difference(out, cond) > 1e-2  # the null half moved it


def test_a_caption_reading_decoder_samples_from_its_caption(small_params):
    config = SMALL.replace(num_timesteps=20)
    _, _, embedding, text = model_inputs(config, batch=2)
    _, _, _, other_text = model_inputs(config, batch=2, seed=5)
    sample = functools.partial(
        sample_decoder, Decoder(config), small_params, config.diffusion(), embedding, KEY,
        steps=4, method="ddim",
    )  # fmt: skip
    images = sample(text=text)
    assert max_relative_difference(images, sample(text=other_text)) > 1e-3
    with pytest.raises(ValueError, match="reads captions .* give text"):
        sample()


def train_state(mesh, rules):
    model = Decoder(SMALL)
    batch = make_batch(SMALL, batch=8)
    tx = optax.sgd(0.1)
    inputs = model_inputs(SMALL, batch=1)
    state, shardings, _ = create_sharded_state(
        lambda rng: model.init(rng, *inputs), tx, KEY, mesh, rules
    )
    step = make_train_step(decoder_loss_fn(model, SMALL.diffusion()), tx, rng=jax.random.key(1))
    batch = parallel.shard_batch(batch, mesh)
    return state, jit_train_step(step, mesh, rules, shardings, batch), batch


@pytest.mark.slow
def test_one_step_on_a_2x2x2_mesh_equals_one_device(mesh_1, mesh_2x2x2):
    assert_one_step_matches_one_device(train_state, mesh_1, mesh_2x2x2)
