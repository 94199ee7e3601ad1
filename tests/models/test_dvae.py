"""The dVAE against OpenAI's ``dall_e`` package, its parameter annotations and its converter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.convert.dvae import dvae_from_torch, dvae_to_torch, load_dvae_pickle
from jaxaigc.models.dvae import (
    LOGIT_LAPLACE_EPS,
    PRESETS,
    Decoder,
    DVAEConfig,
    Encoder,
    decode,
    encode,
    init_dvae,
    map_pixels,
    unmap_pixels,
)
from tests.helpers import assert_trees_equal

SKIP_REASON = "the reference needs torch and the dall_e package (pip install --no-deps DALL-E)"


def reference_dvae(seed: int, **kwargs):
    """A random-weight ``dall_e`` encoder and decoder (float32, CPU), biases made non-zero."""
    torch = pytest.importorskip("torch", reason=SKIP_REASON)
    dall_e = pytest.importorskip("dall_e", reason=SKIP_REASON)
    torch.manual_seed(seed)
    n_init = kwargs.pop("n_init", 128)
    encoder = dall_e.Encoder(**kwargs, requires_grad=False)
    decoder = dall_e.Decoder(**kwargs, n_init=n_init, requires_grad=False)
    with torch.no_grad():
        for module in (encoder, decoder):
            for name, value in module.state_dict().items():
                if name.endswith(".b"):
                    value.normal_(std=0.1)
    return torch, encoder, decoder


def random_variables(config: DVAEConfig, seed: int = 0) -> dict:
    """Variables drawn with NumPy: compiling the jitted init takes XLA ~10 s on CPU."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(lambda key: init_dvae(config, key), jax.random.key(0)))
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype),
        shapes,
    )


def relative_error(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def check_against_reference(batch: int, size: int, **kwargs) -> None:
    torch, t_encoder, t_decoder = reference_dvae(0, **kwargs)
    config, variables = dvae_from_torch(t_encoder.state_dict(), t_decoder.state_dict())
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    pixels = np.asarray(map_pixels(images))

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))

    with torch.no_grad():
        ref_logits = t_encoder(nchw(pixels)).numpy().transpose(0, 2, 3, 1)
    logits = jax.jit(Encoder(config).apply)(variables["encoder"], pixels)
    assert logits.shape == ref_logits.shape
    assert relative_error(logits, ref_logits) < 1e-4
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), ref_logits.argmax(-1))

    # One-hot codes from the reference's tokens, and relaxed codes (a softmax, like gumbel-softmax).
    one_hot = np.eye(config.vocab_size, dtype=np.float32)[ref_logits.argmax(-1)]
    relaxed = np.asarray(jax.nn.softmax(ref_logits / 0.5, axis=-1))
    decoder = jax.jit(Decoder(config).apply)
    for codes in (one_hot, relaxed):
        with torch.no_grad():
            ref_stats = t_decoder(nchw(codes)).numpy().transpose(0, 2, 3, 1)
        stats = decoder(variables["decoder"], codes)
        assert stats.shape == (batch, size, size, 6)
        assert relative_error(stats, ref_stats) < 1e-4
    # Token ids decode exactly like their one-hot codes.
    np.testing.assert_allclose(
        decoder(variables["decoder"], ref_logits.argmax(-1)),
        decoder(variables["decoder"], one_hot),
        rtol=1e-5,
        atol=1e-5,
    )


def test_matches_dall_e_at_a_small_config():
    check_against_reference(2, 32, n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32)


@pytest.mark.slow
def test_matches_dall_e_at_the_full_config():
    check_against_reference(1, 256)  # the released model's shapes: 256 px, 32 x 32 tokens


def test_converter_reads_the_config_off_the_shapes_and_round_trips():
    _, t_encoder, t_decoder = reference_dvae(1, n_hid=64, n_blk_per_group=2, vocab_size=512)
    config, variables = dvae_from_torch(t_encoder.state_dict(), t_decoder.state_dict())
    assert config == DVAEConfig(n_hid=64, n_blk_per_group=2, vocab_size=512, n_init=128)
    encoder_state, decoder_state = dvae_to_torch(variables)
    for ours, theirs in ((encoder_state, t_encoder), (decoder_state, t_decoder)):
        assert ours.keys() == theirs.state_dict().keys()
        for name, value in theirs.state_dict().items():
            np.testing.assert_array_equal(ours[name], value.numpy())
    # NumPy state dicts convert too.
    assert_trees_equal(dvae_from_torch(encoder_state, decoder_state)[1], variables)


def test_converter_rejects_bad_state_dicts():
    _, t_encoder, t_decoder = reference_dvae(1, n_hid=64, n_blk_per_group=1, vocab_size=512)
    encoder_state = dict(t_encoder.state_dict())
    decoder_state = dict(t_decoder.state_dict())
    with pytest.raises(ValueError, match="unexpected keys"):
        dvae_from_torch({**encoder_state, "blocks.extra.w": np.zeros(1)}, decoder_state)
    with pytest.raises(ValueError, match="missing 'blocks.input.w'"):
        dvae_from_torch(
            {k: v for k, v in encoder_state.items() if k != "blocks.input.w"}, decoder_state
        )
    small_vocab = {**decoder_state, "blocks.input.w": np.zeros((128, 256, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="does not fit"):
        dvae_from_torch(encoder_state, small_vocab)


def test_pickles_load_only_when_trusted(tmp_path):
    torch, t_encoder, t_decoder = reference_dvae(2, n_hid=64, n_blk_per_group=1, vocab_size=512)
    paths = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(t_encoder, paths[0])
    torch.save(t_decoder, paths[1])
    with pytest.raises(ValueError, match="arbitrary code.*trust_pickle=True"):
        load_dvae_pickle(*paths)
    with pytest.warns(UserWarning, match="runs any code"):
        config, variables = load_dvae_pickle(*paths, trust_pickle=True)
    expected = dvae_from_torch(t_encoder.state_dict(), t_decoder.state_dict())
    assert config == expected[0]
    assert_trees_equal(variables, expected[1])


def test_every_parameter_has_logical_axis_names():
    boxed = jax.eval_shape(lambda rng: init_dvae(PRESETS["tiny"], rng), jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == len(leaf.value.shape)
    params = boxed["decoder"]["params"]
    assert params["input"]["kernel"].names == ("height", "width", "vocab", "conv_out")
    assert boxed["encoder"]["params"]["output"]["kernel"].names[-1] == "vocab"


def test_encode_decode_round_trip_shapes():
    config = PRESETS["tiny"]
    variables = random_variables(config)
    images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    ids = encode(config, variables, images)
    assert ids.shape == (2, 4, 4) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < config.vocab_size
    out = decode(config, variables, ids)
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_map_and_unmap_pixels_are_inverse_to_float_precision():
    # Every 8-bit level, and points of the mapped interval [eps, 1 - eps].
    x = jnp.arange(256, dtype=jnp.float32) / 255
    mapped = map_pixels(x)
    float_eps = float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(unmap_pixels(mapped), x, rtol=0, atol=float_eps)
    np.testing.assert_array_equal(np.round(np.asarray(unmap_pixels(mapped)) * 255), np.arange(256))
    assert float(mapped[0]) == pytest.approx(LOGIT_LAPLACE_EPS, abs=1e-7)
    assert float(mapped[-1]) == pytest.approx(1 - LOGIT_LAPLACE_EPS, abs=1e-7)
    np.testing.assert_allclose(np.diff(mapped), (1 - 2 * LOGIT_LAPLACE_EPS) / 255, rtol=1e-4)
    y = jnp.linspace(LOGIT_LAPLACE_EPS, 1 - LOGIT_LAPLACE_EPS, 1001, dtype=jnp.float32)
    np.testing.assert_allclose(map_pixels(unmap_pixels(y)), y, rtol=0, atol=float_eps)
    # unmap clips what lies outside the mapped interval (a decoder's sigmoid can reach it).
    np.testing.assert_array_equal(unmap_pixels(jnp.array([0.0, 0.05, 0.95, 1.0])), [0, 0, 1, 1])


def test_bad_inputs_are_named():
    config, rng = PRESETS["tiny"], jax.random.key(0)
    with pytest.raises(ValueError, match="3 channels"):
        Encoder(config).init(rng, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="expected codes"):
        Decoder(config).init(rng, jnp.zeros((1, 4, 4, 7)))
