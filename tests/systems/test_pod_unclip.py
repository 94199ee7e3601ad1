"""The full-size unCLIP recipes at tiny sizes on clip-retrieval-style folders and WebDataset shards
in tmp_path, with a random tiny CLIP run: each trains a few steps on the 8-device pod mesh,
resumes bit for bit after a crash that follows a checkpoint, and evaluates; the two runs make
one text -> image pipeline (``pipelines.load``, ``jaxaigc generate``) sampling on their mesh; the
in-step caption features equal ClipFeatures'; empty paths, mismatched widths and a missing or
wrong prior run are named."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxaigc import cli, pipelines
from jaxaigc.configs import fields
from jaxaigc.configs.pod import unclip as pod
from jaxaigc.configs.saved import save_run
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
PRIOR, DECODER = "unclip-prior-1b", "unclip-decoder-3.5b"


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


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """``{recipe: (workdir, final state)}``: each recipe trained uninterrupted on the 8-device
    pod mesh, its ``recipe.json`` written as ``jaxaigc train`` writes it; the decoder's
    ``stages.prior`` names the prior run."""
    root = tmp_path_factory.mktemp("pod_unclip_runs")
    prior, decoder = prior_config(data), decoder_config(data)
    decoder.stages.prior = "../prior"
    trained = {}
    for recipe, name, config, train in (
        (PRIOR, "prior", prior, system.train_prior),
        (DECODER, "decoder", decoder, system.train_decoder),
    ):
        save_run(root / name, recipe, config.to_dict())
        trained[recipe] = (root / name, train(config, root / name))
    return trained


def crash_after_checkpoint(step, state, metrics):
    if step == 2:  # checkpoint_every is 2
        raise KeyboardInterrupt


def train_crash_resume(train, config, tmp_path, straight):
    """The final state of a run crashed after step 2 and resumed, equal to ``straight``'s."""
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
def test_prior_recipe_trains_resumes_and_evaluates(data, runs, tmp_path):
    config = prior_config(data)
    state = train_crash_resume(system.train_prior, config, tmp_path, runs[PRIOR][1])
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
def test_decoder_recipe_trains_resumes_and_evaluates(data, runs, tmp_path):
    config = decoder_config(data)
    assert config.model.text_layers  # the caption tokens are read, as paper-3.5b reads them
    train_crash_resume(system.train_decoder, config, tmp_path, runs[DECODER][1])

    report = evaluation.evaluate_decoder(tmp_path / "resumed", config)
    (figure,) = report["figures"]
    assert report["held_out_samples"] == 16
    assert np.isfinite(figure["value"]) and np.isfinite(figure["baseline"])
    grid = np.asarray(Image.open(tmp_path / "resumed" / evaluation.GRID))
    side = 2 * config.model.image_size  # two columns of 2x upscaled images
    assert grid.shape[1] > 2 * side and grid.shape[0] > config.eval.grid * side


@pytest.mark.slow
def test_generate_pairs_the_prior_and_decoder_runs_on_their_mesh(data, runs, tmp_path, capsys):
    prior_dir, decoder_dir = runs[PRIOR][0], runs[DECODER][0]
    captions = ["caption 3", "caption 7"]
    pipe = pipelines.load(decoder_dir, prior=prior_dir)
    out = pipe(captions, n=2, seed=0)
    assert out.images.shape == (2, 2, 16, 16, 3) and out.images.dtype == np.uint8
    assert np.all(np.diff(out.scores, axis=1) <= 0)  # reranked by the prior's CLIP run
    # Both stages sampled sharded over the 8 devices they trained on.
    for stage in (pipe.prior, pipe.decoder):
        assert max(len(x.sharding.device_set) for x in jax.tree.leaves(stage.variables)) == 8
    # The caption features are the frozen tower's, which is the CLIP run's exactly (the EMA
    # copies frozen models instead of averaging them).
    _, variables, _ = clip_system.load_trained(data / "clip")
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, pipe.prior.variables["frozen"]["clip"]),
        system.text_tower(variables),
    )
    # Deterministic for a seed; another seed draws other images.
    again = pipe(captions, n=2, seed=0)
    np.testing.assert_array_equal(again.images, out.images)
    np.testing.assert_array_equal(again.scores, out.scores)
    assert not np.array_equal(pipe(captions, n=2, seed=1).images, out.images)

    # The command, with the prior the decoder's stages.prior names: the same images.
    grid = tmp_path / "grid.png"
    cli.main(["generate", str(decoder_dir), *captions, "--n", "2", "--out", str(grid)])
    printed = capsys.readouterr().out
    for caption, scores in zip(captions, out.scores, strict=True):
        assert (
            f"{caption!r}: reranking scores, best first: {np.round(scores, 3).tolist()}" in printed
        )
    assert np.asarray(Image.open(grid)).shape[1] >= 2 * 3 * 16  # 2 images, 3x upscaled


def test_generate_names_a_missing_or_wrong_prior_run(data, tmp_path, capsys):
    def run_dir(name, recipe, config):
        save_run(tmp_path / name, recipe, config.to_dict())
        return tmp_path / name

    prior_dir = run_dir("prior", PRIOR, prior_config(data))
    decoder_dir = run_dir("decoder", DECODER, decoder_config(data))
    with pytest.raises(ValueError, match="names no prior run: pass one"):
        pipelines.load(decoder_dir)
    with pytest.raises(FileNotFoundError, match="the unCLIP prior run .*nowhere has no recipe"):
        pipelines.load(decoder_dir, prior=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds a 'unclip-decoder-3.5b' run; the unCLIP prior is"):
        pipelines.load(decoder_dir, prior=decoder_dir)
    with pytest.raises(ValueError, match="is a full-size unCLIP prior: load its decoder run"):
        pipelines.load(prior_dir)
    narrow = prior_config(data)
    narrow.model.embed_dim = 32
    with pytest.raises(ValueError, match="draws 32-wide CLIP image embeddings; the decoder run"):
        pipelines.load(decoder_dir, prior=run_dir("narrow", PRIOR, narrow))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*decoder/checkpoints: train it"):
        pipelines.load(decoder_dir, prior=prior_dir)
    assert "generate with its decoder run" in usage_error(
        ["generate", str(prior_dir), "a cat"], capsys
    )
    assert "--prior goes with an unclip-decoder-3.5b run, not a clip one" in usage_error(
        ["generate", str(data / "clip"), "a cat", "--prior", str(prior_dir)], capsys
    )


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


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
