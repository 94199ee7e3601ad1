"""A CLIP converted from an OpenAI-format checkpoint file loads as a run: ``ClipFeatures`` give
the model's own embeddings, and ``jaxaigc zero-shot`` classifies with it."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from jaxaigc import cli, pipelines
from jaxaigc.convert import clip_to_torch
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    try:
        ClipTokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"no CLIP vocabulary: {error}")
    config = CLIPConfig.from_name("tiny-vit", context_length=16)
    model = CLIP(config)
    r = config.image_resolution
    example = (jnp.zeros((1, r, r, 3)), jnp.zeros((1, 16), jnp.int32))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: (0.05 * rng.normal(size=x.shape)).astype(x.dtype), shapes)
    variables["params"]["logit_scale"] = np.float32(np.log(100.0))
    directory = tmp_path_factory.mktemp("convert")
    save_file(clip_to_torch(config, variables), directory / "clip.safetensors")
    cli.main(["convert", "clip", str(directory / "clip.safetensors"), str(directory / "run")])
    return model, variables, directory / "run"


def test_converted_features_are_the_models(converted):
    model, variables, run = converted
    clip = pipelines.load(run)
    assert isinstance(clip, pipelines.ClipFeatures) and clip.config == model.config
    r = clip.image_size
    images = np.random.default_rng(1).integers(0, 256, (3, r, r, 3), dtype=np.uint8)
    pixels = (images / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    direct = model.apply(variables, jnp.asarray(pixels, jnp.float32), method="encode_image")
    direct = direct / jnp.linalg.norm(direct, axis=-1, keepdims=True)
    np.testing.assert_allclose(clip.encode_images(images), direct, atol=1e-5)
    captions = ["a red circle", "a blue square"]
    tokens = clip.tokenize(captions)
    pooled = model.apply(variables, jnp.asarray(tokens), method="encode_text")
    pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(clip.encode_text(captions), pooled, atol=1e-6)
    features = clip.text_features(captions, length=8)
    assert features["text_tokens"].shape == (2, 8, model.config.transformer_width)
    assert features["text_mask"][:, 0].all()


def test_class_embeddings_average_the_normalised_prompts(converted):
    clip = pipelines.load(converted[2])
    templates = ("a {}", "a drawing of the {}")
    prompts = clip.encode_text([t.format(label) for label in ("cat", "dog") for t in templates])
    mean = prompts.reshape(2, 2, -1).mean(axis=1)
    want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(clip.class_embeddings(["cat", "dog"], templates), want, atol=1e-6)
    with pytest.raises(ValueError, match="at least one label"):
        clip.class_embeddings([], templates)
    with pytest.raises(ValueError, match="in every template"):
        clip.class_embeddings(["cat"], ["a photo"])


def test_zero_shot_command_on_the_converted_checkpoint(converted, tmp_path, capsys):
    _, _, run = converted
    path = tmp_path / "x.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    cli.main(["zero-shot", str(run), str(path), "--labels", "cat,dog,car", "--top", "3"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    shares = [float(s) for s in re.findall(r"(\d+\.\d)%", line)]
    assert line.startswith(str(path)) and len(shares) == 3 and abs(sum(shares) - 100) < 0.2


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png is not an image"):
        pipelines.read_images([tmp_path / "notes.png"], size=8)
