"""The full-size unCLIP recipes at tiny sizes on clip-retrieval-style folders and WebDataset shards
in tmp_path, with a random tiny CLIP run: each trains a few steps on the 8-device pod mesh,
resumes bit for bit after a crash that follows a checkpoint, and evaluates; the in-step caption
features equal ClipFeatures'; empty paths and mismatched widths are named."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxaigc.configs import fields
from jaxaigc.configs.pod import unclip as pod
from jaxaigc.convert.checkpoints import write_run
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate import unclip_pod as evaluation
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.pipelines.clip import ClipFeatures
from jaxaigc.systems import clip as clip_system
from jaxaigc.systems import unclip_pod as system
from tests.data.test_embeddings import write_clip_retrieval, write_shard
from tests.helpers import assert_trees_equal

WIDTH = 64  # the quick configs' embed_dim and clip_dim


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A random tiny CLIP run of the quick prior's ``config.clip``; training and held-out
    embeddings (keys 0..47 and 100..115) and image shards with the same keys."""
    root = tmp_path_factory.mktemp("pod_unclip")
    config = fields.to_dataclass(CLIPConfig, pod.get_prior_config(quick=True).clip)
    model = CLIP(config)
    example = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, config.context_length), jnp.int32))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example))
    rng = np.random.default_rng(0)  # NumPy draws: Flax's initialisers compile for seconds
    variables = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), shapes)
    write_run(root / "clip", "clip", config, variables, source="random")
    write_clip_retrieval(root / "train", {"0": range(24), "1": range(24, 48)}, width=WIDTH)
    write_clip_retrieval(root / "eval", {"0": range(100, 116)}, width=WIDTH)
    write_clip_retrieval(root / "narrow", {"0": range(16)}, width=32)
    write_shard(root / "train-00000.tar", range(48), shape=(20, 24))
    write_shard(root / "eval-00000.tar", range(100, 116), shape=(20, 24))
    return root


def prior_config(data):
    config = pod.get_prior_config(quick=True)
    config.stages.clip = str(data / "clip")
    config.data.update(dict(embeddings=str(data / "train"), eval_embeddings=str(data / "eval")))
    return config


def decoder_config(data):
    config = pod.get_decoder_config(quick=True)
    config.data.update(
        dict(
            source=f"webdataset:{data}/train-00000.tar",
            embeddings=str(data / "train"),
            eval_source=f"webdataset:{data}/eval-00000.tar",
            eval_embeddings=str(data / "eval"),
        )
    )
    return config


def crash_after_checkpoint(step, state, metrics):
    if step == 2:  # checkpoint_every is 2
        raise KeyboardInterrupt


def train_crash_resume(train, config, tmp_path):
    """The final states of an uninterrupted run and of one crashed after step 2 and resumed."""
    straight = train(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", hooks=[crash_after_checkpoint])
    resumed = train(config, tmp_path / "resumed")
    assert int(resumed.step) == config.train.steps
    for name in ("params", "opt_state", "ema_params", "model_state"):
        assert_trees_equal(getattr(resumed, name), getattr(straight, name))
    return resumed


def test_step_caption_features_equal_clip_features(data):
    model, variables, _ = clip_system.load_trained(data / "clip")
    captions = ["a red circle", "caption 7", "two blue squares left of a green triangle", ""]
    expected = ClipFeatures(model, variables, batch_size=3).text_features(captions, length=16)
    # The recipe's data pipeline tokenises as ClipFeatures does.
    (tokenize,) = system.prior_operations(pod.get_prior_config(quick=True), ClipTokenizer())
    tokens = [
        tokenize.map({"caption": c, "text_embedding": 0, "image_embedding": 0}) for c in captions
    ]
    np.testing.assert_array_equal(np.stack([t["tokens"] for t in tokens]), expected["tokens"])
    step = jax.jit(functools.partial(system.caption_features, model))
    per_token, mask = step(system.text_tower(variables), expected["tokens"])
    np.testing.assert_allclose(per_token, expected["text_tokens"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask, expected["text_mask"])
    assert "visual" not in system.text_tower(variables)


@pytest.mark.slow
def test_prior_recipe_trains_resumes_and_evaluates(data, tmp_path):
    config = prior_config(data)
    state = train_crash_resume(system.train_prior, config, tmp_path)
    # The frozen tower is the CLIP run's, untouched by training.
    _, variables, _ = clip_system.load_trained(data / "clip")
    assert_trees_equal(state.model_state["frozen"]["clip"], system.text_tower(variables))

    report = evaluation.evaluate_prior(tmp_path / "resumed", config)
    assert report["held_out_samples"] == 16
    best, single = report["figures"]
    records = system.prior_source(config, "eval_embeddings")
    z_t = np.stack([records[i]["text_embedding"] for i in range(16)])
    z_i = np.stack([records[i]["image_embedding"] for i in range(16)])
    cos = np.sum(z_t * z_i, -1) / np.linalg.norm(z_t, axis=-1) / np.linalg.norm(z_i, axis=-1)
    assert best["baseline"] == pytest.approx(cos.mean(), abs=1e-5)
    for figure in (best, single):
        assert -1 <= figure["value"] <= 1
    assert report["prior"]["final"]["step"] == config.train.steps


@pytest.mark.slow
def test_decoder_recipe_trains_resumes_and_evaluates(data, tmp_path):
    config = decoder_config(data)
    assert config.model.text_layers  # the caption tokens are read, as paper-3.5b reads them
    train_crash_resume(system.train_decoder, config, tmp_path)

    report = evaluation.evaluate_decoder(tmp_path / "resumed", config)
    (figure,) = report["figures"]
    assert report["held_out_samples"] == 16
    assert np.isfinite(figure["value"]) and np.isfinite(figure["baseline"])
    grid = np.asarray(Image.open(tmp_path / "resumed" / evaluation.GRID))
    side = 2 * config.model.image_size  # two columns of 2x upscaled images
    assert grid.shape[1] > 2 * side and grid.shape[0] > config.eval.grid * side


def test_empty_paths_and_widths_are_named(data, tmp_path):
    config = pod.get_prior_config(quick=True)
    with pytest.raises(ValueError, match="config.data.embeddings is empty: set --config.data"):
        system.build_prior(config, tmp_path)
    config.data.embeddings = str(data / "train")
    with pytest.raises(ValueError, match="config.stages.clip is empty: set --config.stages.clip="):
        system.build_prior(config, tmp_path)
    config.stages.clip = str(data / "clip")
    config.data.embeddings = str(data / "narrow")
    with pytest.raises(ValueError, match="32-wide embeddings; config.model.embed_dim is 64"):
        system.build_prior(config, tmp_path)
    config.clip.transformer_width = 48
    with pytest.raises(ValueError, match="has transformer_width 32; config.clip.transformer_width"):
        system.build_prior(config, tmp_path)

    config = pod.get_decoder_config(quick=True)
    with pytest.raises(ValueError, match="config.data.source is empty: set --config.data.source="):
        system.build_decoder(config)
    config.data.source = f"webdataset:{data}/train-00000.tar"
    with pytest.raises(ValueError, match="config.data.embeddings is empty"):
        system.build_decoder(config)
    config.data.embeddings = str(data / "narrow")
    with pytest.raises(ValueError, match="32-wide embeddings; config.model.clip_dim is 64"):
        system.build_decoder(config)
    config.data.source = "folder:captions.csv"
    with pytest.raises(ValueError, match="must be webdataset:PATTERN"):
        system.build_decoder(config)
    config.model.text_vocab = 1000
    with pytest.raises(ValueError, match="text_vocab 1000 is smaller than CLIP's BPE vocab"):
        system.build_decoder(config)
