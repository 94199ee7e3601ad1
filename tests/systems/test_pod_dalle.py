"""The full-size DALL-E recipe (``dalle-12b``) at its quick sizes: trained on WebDataset shards on
a 2x2x2 mesh, each batch tokenised by the frozen encoder of a dVAE run written by ``jaxaigc
convert dvae``; a crash after a checkpoint resumes bit-identically; the encoder never changes;
the evaluation reports validation NLL beside uniform and a sample grid reranked by a CLIP run;
bad inputs are named before anything compiles."""

import io
import json
import math
import tarfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxaigc import pipelines, run
from jaxaigc.configs import fields
from jaxaigc.convert import checkpoints
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate import dalle_pod as dalle_pod_eval
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.models.dvae import DVAEConfig, init_dvae
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.systems import dalle_pod
from jaxaigc.train import checkpoint, loop
from tests.helpers import assert_trees_equal

RECIPE = "dalle-12b"
CLIP_MODEL = CLIPConfig(
    embed_dim=16,
    image_resolution=8,  # not the 16 px samples: the reranker resizes them
    vision_layers=1,
    vision_width=64,
    vision_patch_size=4,
    context_length=16,
    transformer_width=32,
    transformer_heads=2,
    transformer_layers=1,
)


def _random(shapes, seed: int, std: float):
    """NumPy draws shaped like ``shapes`` (Flax's initialisers compile for seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(s.dtype), shapes)


def _convert_dvae(dest, model: DVAEConfig, monkeypatch):
    """``jaxaigc convert dvae``'s code path with random weights in place of OpenAI's pickles."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_dvae(model, jax.random.key(0))))
    variables = _random(shapes, 0, 0.5)
    monkeypatch.setattr(checkpoints, "load_dvae_pickle", lambda *a, **k: (model, variables))
    return checkpoints.convert("dvae", dest / "encoder.pkl", dest, trust_pickle=True), variables


def _write_shard(path, first: int, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            image = np.random.default_rng(i).integers(0, 256, (20, 24 + i % 3, 3), np.uint8)
            data = io.BytesIO()
            Image.fromarray(image).save(data, format="PNG")
            caption = f"picture number {i}!".encode()
            for name, payload in ((f"{i:06d}.png", data.getvalue()), (f"{i:06d}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two training shards of 12 pairs, one held-out shard of 12, a converted dVAE of the quick
    recipe's architecture and a CLIP run."""
    root = tmp_path_factory.mktemp("inputs")
    for shard in range(3):
        _write_shard(root / f"{shard:05d}.tar", 12 * shard, 12)
    model = fields.to_dataclass(DVAEConfig, run.get_config(RECIPE, quick=True).dvae)
    with pytest.MonkeyPatch.context() as monkeypatch:
        dvae_dir, dvae_variables = _convert_dvae(root / "dvae", model, monkeypatch)
    clip = CLIP(CLIP_MODEL)
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(
            clip.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 16), jnp.int32))
        )
    )
    checkpoints.write_run(root / "clip", "clip", CLIP_MODEL, _random(shapes, 1, 0.05), source="x")
    return {"root": root, "dvae": dvae_dir, "dvae_variables": dvae_variables}


def _config(inputs):
    config = run.get_config(RECIPE, quick=True)
    config.mesh.shape.update(dict(data=2, fsdp=2, tensor=2))
    config.data.source = f"webdataset:{inputs['root']}/{{00000..00001}}.tar"
    config.data.eval_source = f"webdataset:{inputs['root']}/00002.tar"
    config.stages.dvae = str(inputs["dvae"])  # absolute: kept as it is
    config.stages.clip = str(inputs["root"] / "clip")
    return config


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """The recipe trained and evaluated as ``jaxaigc train dalle-12b`` runs it."""
    workdir = tmp_path_factory.mktemp("dalle")
    config = _config(inputs)
    return workdir, run.train_and_evaluate(RECIPE, config, workdir), config


def _final_variables(workdir, config):
    """``{"params", "frozen"}`` of the run's last checkpoint."""
    dvae = dalle_pod.load_dvae(config, workdir)
    _, variables, step = checkpoint.load_trained(
        workdir, lambda _: dalle_pod.make_task(config, dvae)[1].init
    )
    assert step == config.train.steps
    return variables


def test_captions_are_padded_with_eot():
    tokenizer = ClipTokenizer()
    text = dalle_pod.encode_captions(tokenizer, ["a cat!", "a b c d e f g h"], 6)
    eot, cat = tokenizer.eot_token, tokenizer.tokenize("a cat!")
    np.testing.assert_array_equal(text[0], [tokenizer.sot_token, *cat, eot, eot])
    assert text[1, -1] == eot and len(set(text[1, 1:-1])) == 4  # cut, keeping its EOT


@pytest.mark.slow
def test_crash_after_a_checkpoint_resumes_bit_identically(trained, inputs, tmp_path):
    straight_dir, _, config = trained
    model, task, batches = dalle_pod.build(config, tmp_path)

    def crash(step, state, metrics):
        if step == 2:  # after step 2's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(task, batches, config, tmp_path, hooks=[crash])
    _, task, batches = dalle_pod.build(config, tmp_path)
    resumed = loop.train(task, batches, config, tmp_path)
    assert int(resumed.step) == config.train.steps
    straight = _final_variables(straight_dir, config)
    assert_trees_equal(jax.device_get(resumed.params), straight["params"])
    assert_trees_equal(jax.device_get(resumed.model_state["frozen"]), straight["frozen"])


@pytest.mark.slow
def test_the_frozen_dvae_encoder_is_unchanged_by_training(trained, inputs):
    workdir, _, config = trained
    variables = _final_variables(workdir, config)
    assert_trees_equal(
        variables["frozen"]["dvae_encoder"], inputs["dvae_variables"]["encoder"]["params"]
    )
    # The run's dVAE is the converted one, encoder and decoder.
    _, loaded, _ = dvae_pipeline.load_trained(config.stages.dvae)
    assert_trees_equal(loaded, inputs["dvae_variables"])
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["train/loss"]) for m in metrics if "train/loss" in m)


@pytest.mark.slow
def test_the_evaluation_reports_nll_and_reranked_samples(trained):
    workdir, report, config = trained

    def figure(start: str) -> dict:
        return next(f for f in report["figures"] if f["name"].startswith(start))

    image, caption = figure("image NLL per token"), figure("caption NLL per token")
    assert image["name"].endswith("12 held-out pairs")
    assert image["baseline"] == pytest.approx(math.log(64))
    assert caption["baseline"] == pytest.approx(math.log(49408))
    assert 0 < image["value"] < 2 * image["baseline"] and caption["value"] > 0
    # 12 held-out pairs in batches of 8: the 4 rows filling the last batch are not counted, nor
    # SOT and the padding after EOT.
    tokenizer, captions = ClipTokenizer(), [f"picture number {i}!" for i in range(24, 36)]
    caption_tokens = sum(min(len(tokenizer.tokenize(c)) + 1, 11) for c in captions)
    assert report["pairs"] == 12 and report["validation"]["image_tokens"] == 12 * 16
    assert report["validation"]["text_tokens"] == caption_tokens
    best = figure("CLIP cosine of CLIP's best of 2")
    assert best["value"] >= best["baseline"]
    grid = Image.open(workdir / dalle_pod_eval.GRID)
    assert grid.size[0] > 3 * 4 * 16  # the real image and 2 samples, 4x upscaled
    assert json.loads((workdir / "report.json").read_text())["system"] == RECIPE
    assert report["final"]["loss"] < 0.9 * report["first_logged"]["loss"]


@pytest.mark.slow
def test_generate_draws_on_the_mesh_and_reranks(trained):
    workdir, _, config = trained
    pipe = pipelines.load(workdir)
    out = pipe(["picture number 3!", "picture number 7!"], n=2, seed=0)
    side = config.data.image_size
    assert out.images.shape == (2, 2, side, side, 3) and out.images.dtype == np.uint8
    assert np.all(np.diff(out.scores, axis=1) <= 0)  # CLIP's best first


def test_missing_inputs_are_named(inputs, tmp_path):
    config = _config(inputs)
    config.data.source = ""
    with pytest.raises(ValueError, match=r"config.data.source is empty.*webdataset:/data/"):
        dalle_pod.train(config, tmp_path)
    config = _config(inputs)
    config.stages.dvae = ""
    with pytest.raises(ValueError, match="config.stages.dvae is empty.*jaxaigc convert dvae"):
        dalle_pod.build(config, tmp_path)


def test_a_dvae_or_tokenizer_that_does_not_fit_is_named(inputs, tmp_path, monkeypatch):
    config = _config(inputs)
    small = fields.to_dataclass(DVAEConfig, config.dvae).replace(vocab_size=32)
    config.stages.dvae = str(_convert_dvae(tmp_path / "dvae32", small, monkeypatch)[0])
    message = "has 32 codes, but the transformer's image_vocab is 64: set config.model.image_vocab"
    with pytest.raises(ValueError, match=message):
        dalle_pod.build(config, tmp_path / "run")
    config = _config(inputs)
    config.model.update(text_vocab=1000, pad_id=0)
    with pytest.raises(ValueError, match="tokenizer has 49408 ids.*text_vocab is 1000"):
        dalle_pod.build(config, tmp_path / "run")
    config = _config(inputs)
    config.data.image_size = 32
    with pytest.raises(ValueError, match=r"into 8 x 8 tokens .* image_side is 4"):
        dalle_pod.make_task(config)
