"""unCLIP training at toy size: CLIP features of shapes scenes from a random tiny CLIP, both
stages' losses fall through the generic loop, both reload from their checkpoints, text -> image
returns uint8 images, guidance without conditioning dropout is refused by name, and the CLIP
sizes the stages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.configs import unclip as unclip_config
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.pipelines import unclip
from jaxaigc.pipelines.clip import ClipFeatures
from jaxaigc.systems import unclip as system
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics
from tests.helpers import assert_trees_equal

TEXT_LEN = 24


def _random(shapes, seed: int, std: float):
    """NumPy draws shaped like ``shapes`` (Flax's initialisers compile for seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def clip():
    try:
        tokenizer = ClipTokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"no CLIP vocabulary: {error}")
    model = CLIP(CLIPConfig.from_name("tiny-vit", context_length=TEXT_LEN))
    example = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, TEXT_LEN), jnp.int32))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example))
    return ClipFeatures(model, _random(shapes, 0, 0.05), tokenizer=tokenizer, batch_size=5)


def _config():
    config = unclip_config.get_config()
    config.prior.model.update(dict(width=32, layers=2, heads=2))
    config.decoder.model.update(
        dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(16,), head_channels=8)
    )
    for section in (config.prior, config.decoder):
        section.train.update(dict(steps=20, batch_size=8, log_every=5, checkpoint_every=1000))
        section.optim.update(dict(peak_lr=3e-3, warmup_steps=5))
    return config


def test_clip_features_line_up(clip):
    features = system.encode_scenes(clip, 8, split="test", seed=0)
    assert features.text_tokens.shape == (8, TEXT_LEN, 128)
    assert features.text_embedding.shape == features.image_embedding.shape == (8, 64)
    np.testing.assert_allclose(np.linalg.norm(features.image_embedding, axis=-1), 1, rtol=1e-5)
    # The mask covers SOT..EOT: one position more than the caption's BPE tokens.
    lengths = [len(clip.tokenizer.tokenize(c)) + 2 for c in features.captions]
    np.testing.assert_array_equal(features.text_mask.sum(-1), lengths)
    # The pooled embedding is CLIP's own encode_text, whatever the batches (5 + 3 padded; 3).
    direct = clip.encode_text(features.captions[:3], length=TEXT_LEN)
    np.testing.assert_allclose(direct, features.text_embedding[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_both_stages_learn_and_generate_images(clip, mesh_1, tmp_path):
    config = _config()
    features = system.encode_scenes(clip, 64, split="train", seed=0)
    stages = {}
    for name, build in (("prior", system.build_prior), ("decoder", system.build_decoder)):
        model, task, batches = build(config, None, features=features)
        state = train(task, batches, config[name], tmp_path / name, mesh=mesh_1)
        losses = [r["train/loss"] for r in read_metrics(tmp_path / name) if "train/loss" in r]
        assert losses[-1] < 0.8 * losses[0], (name, losses)
        # The checkpoint round trip: the stage rebuilt from the workdir alone.
        loaded, params, step = unclip.load_trained(tmp_path, name)
        assert step == 20 and loaded.config == model.config
        assert_trees_equal(params, jax.device_get(state.eval_params))
        stages[name] = (loaded, params)

    captions = ["a small red circle on the left", "a large blue square above a small green cross"]
    out = unclip.generate(
        captions, prior=stages["prior"], decoder=stages["decoder"], clip=clip,
        rng=jax.random.key(0), prior_steps=4, decoder_steps=4, decoder_guidance=2.0, candidates=3,
    )  # fmt: skip
    assert out["images"].shape == (2, 3, 32, 32, 3) and out["images"].dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(out["image_embedding"], axis=-1), 1, rtol=1e-5)

    # Guidance scales other than 1 need the stage trained with conditioning dropout.
    prior_model, prior_params = stages["prior"]
    decoder_model, decoder_params = stages["decoder"]
    no_drop_prior = (type(prior_model)(prior_model.config.replace(text_drop=0.0)), prior_params)
    with pytest.raises(ValueError, match="guidance_scale 3.0 needs .* text_drop is 0"):
        unclip.generate(
            captions, prior=no_drop_prior, decoder=stages["decoder"], clip=clip,
            rng=jax.random.key(0), prior_guidance=3.0,
        )  # fmt: skip
    no_drop_decoder = (
        type(decoder_model)(decoder_model.config.replace(image_drop=0.0)),
        decoder_params,
    )
    with pytest.raises(ValueError, match="guidance_scale 2.0 needs .* image_drop is 0"):
        unclip.generate(
            captions, prior=stages["prior"], decoder=no_drop_decoder, clip=clip,
            rng=jax.random.key(0), decoder_guidance=2.0,
        )  # fmt: skip


def test_load_trained_names_the_stage_and_the_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown unCLIP stage 'upsampler'"):
        unclip.load_trained(tmp_path, "upsampler")
    with pytest.raises(FileNotFoundError, match=r"no unCLIP decoder checkpoint in .*decoder"):
        unclip.load_trained(tmp_path, "decoder")


def test_the_clip_sizes_the_stages(clip):
    """The fields only the CLIP decides follow its features, with nothing set by hand: a change of
    the CLIP's text width or embedding size (the demo's clip stage went to width 64) builds."""
    config = CLIPConfig.from_name("tiny-vit", context_length=TEXT_LEN)
    narrow = CLIP(config.replace(transformer_width=64, embed_dim=32))
    example = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, TEXT_LEN), jnp.int32))
    shapes = nn.meta.unbox(jax.eval_shape(narrow.init, jax.random.key(0), *example))
    narrow = ClipFeatures(narrow, _random(shapes, 0, 0.05), tokenizer=clip.tokenizer)
    for encoder, width, dim in ((clip, 128, 64), (narrow, 64, 32)):
        features = system.encode_scenes(encoder, 8, split="train", seed=0)
        config = _config()
        prior, _, _ = system.build_prior(config, None, features=features)
        decoder, _, _ = system.build_decoder(config, None, features=features)
        assert (prior.config.text_width, prior.config.embed_dim) == (width, dim)
        assert (decoder.config.clip_dim, decoder.config.image_size) == (dim, 32)
        # Filled in place, so the run config saved with the checkpoints rebuilds the same models.
        assert (config.prior.model.text_width, config.decoder.model.clip_dim) == (width, dim)


def test_mismatched_clip_features_are_named(clip):
    features = system.encode_scenes(clip, 16, split="train", seed=0)
    config = _config()
    config.prior.model.text_width = 64
    with pytest.raises(ValueError, match="width is 128, but the prior's text_width is 64"):
        system.build_prior(config, None, features=features)
    config = _config()
    config.decoder.model.clip_dim = 32
    with pytest.raises(ValueError, match="embedding width is 64, but the decoder's clip_dim is 32"):
        system.build_decoder(config, None, features=features)
    with pytest.raises(ValueError, match="give clip"):
        system.build_decoder(config, None)


def test_the_decoder_loss_takes_the_configs_weighting(clip):
    features = system.encode_scenes(clip, 8, split="train", seed=0)
    batch = {
        "image": system.to_signed_range(features.images),
        "image_embedding": features.image_embedding,
    }
    figures = {}
    for weighting in ("none", "min_snr"):
        config = _config()
        config.decoder.loss.weighting = weighting
        _, task, _ = system.build_decoder(config, None, features=features)
        params = nn.meta.unbox(task.init(jax.random.key(0)))["params"]
        figures[weighting] = task.loss_fn(params, batch, jax.random.key(1))
    (plain, plain_metrics), (min_snr, min_snr_metrics) = figures["none"], figures["min_snr"]
    # Same draws, so the same unweighted MSE; Min-SNR's v weights min(SNR, 5) / (SNR + 1) < 1.
    assert float(plain_metrics["mse"]) == float(min_snr_metrics["mse"])
    np.testing.assert_allclose(plain, plain_metrics["mse"], rtol=1e-6)
    assert float(min_snr) < 0.9 * float(plain)
    config = _config()
    config.decoder.loss.weighting = "snr"
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        system.build_decoder(config, None, features=features)


def test_a_caption_reading_decoder_gets_the_clip_captions(clip):
    """The recipe's decoder with GLIDE's text transformer turned on (text_layers, the only field
    to set): its batches carry the CLIP token ids of each scene's caption, its sampler refuses to
    run without them, and a caption vocabulary too small for CLIP's ids is named before any
    compile."""
    features = system.encode_scenes(clip, 8, split="train", seed=0)
    config = _config()
    config.decoder.model.text_layers = 1
    model, _, batches = system.build_decoder(config, None, features=features)
    spec = system.decoder_batch_spec(config)
    assert spec["text_tokens"] == ((model.config.text_len,), jnp.int32)
    batch = next(batches)
    # Each row's caption tokens are its own scene's (found by its embedding).
    scene = np.argmax(batch["image_embedding"] @ features.image_embedding.T, axis=1)
    np.testing.assert_array_equal(batch["text_tokens"], features.tokens[scene])
    assert sorted(scene) == list(range(8))
    with pytest.raises(ValueError, match="reads captions .* give text"):
        unclip.decode((model, None), features.image_embedding, jax.random.key(0), steps=2)
    config = _config()
    config.decoder.model.update(dict(text_layers=1, text_vocab=1000))
    with pytest.raises(ValueError, match="caption encoder takes 24 tokens of 1000 ids"):
        system.build_decoder(config, None, features=features)
