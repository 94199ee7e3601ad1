"""The DALL-E recipe's training at toy size: pairs from the dvae stage's checkpoint, the loss falls
through the generic loop, the run reloads from its checkpoint, generation returns reranked
decoded samples; mismatches and a missing stage are named."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxaigc.configs import dalle as dalle_config
from jaxaigc.configs import dvae as dvae_config
from jaxaigc.data import image_tokens
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.models.dvae import DVAEConfig, init_train_variables
from jaxaigc.pipelines import dalle as dalle_pipeline
from jaxaigc.pipelines.clip import ClipFeatures
from jaxaigc.systems import dalle
from jaxaigc.train.checkpoint import Checkpointer
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics
from jaxaigc.train.state import TrainState
from tests.helpers import assert_trees_equal

DVAE = DVAEConfig(n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=64, n_init=8)


def _random(shapes, seed: int, std: float):
    """NumPy draws shaped like ``shapes`` (Flax's initialisers compile for seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def dvae_workdir(tmp_path_factory):
    """A dVAE run directory holding one checkpoint of random parameters."""
    workdir = tmp_path_factory.mktemp("dvae")
    config = dvae_config.get_config()
    config.model.update(dataclasses.asdict(DVAE))
    config.train.ema_decay = 0.0  # the checkpoint holds no EMA
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_train_variables(DVAE, jax.random.key(0))))
    params = _random(shapes["params"], 0, 0.5)
    state = TrainState(jnp.asarray(1, jnp.int32), params, {}, {}, None)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=1, async_save=False)
    checkpointer.save(1, state, data_state={}, config=config.to_dict(), force=True)
    checkpointer.close()
    return workdir


def _config(dvae_workdir, data_dir) -> ml_collections.ConfigDict:
    config = dalle_config.get_config(quick=True)
    config.model.image_vocab = DVAE.vocab_size
    config.data.update(dict(train=256, validation=16, test=16, data_dir=str(data_dir)))
    config.stages.dvae = str(dvae_workdir)  # absolute: kept as it is
    return config


@pytest.mark.slow
def test_loss_falls_and_generation_is_reranked(dvae_workdir, tmp_path):
    config = _config(dvae_workdir, tmp_path / "data")
    model, task, batches, pairs, dvae_model = dalle.build(config, tmp_path / "run")
    state = train(task, batches, config, tmp_path / "run")
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    # The run rebuilt from its workdir: the same model, parameters, tokenizer and dVAE.
    loaded, params, loaded_pairs, loaded_dvae, _ = dalle_pipeline.load_trained(tmp_path / "run")
    assert loaded.config == model.config
    assert_trees_equal(params, jax.device_get(state.eval_params))
    assert loaded_pairs.tokenizer.__getstate__() == pairs.tokenizer.__getstate__()
    assert loaded_dvae[0] == dvae_model[0]
    assert_trees_equal(loaded_dvae[1], dvae_model[1])

    try:
        ClipTokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"no CLIP vocabulary: {error}")
    clip_config = CLIPConfig.from_name("tiny-vit", context_length=24)
    clip = CLIP(clip_config)
    example = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 24), jnp.int32))
    clip_shapes = nn.meta.unbox(jax.eval_shape(clip.init, jax.random.key(0), *example))
    clip_features = ClipFeatures(clip, _random(clip_shapes, 1, 0.05), batch_size=None)
    reranker = dalle_pipeline.Reranker(
        "rebinding+clip",
        clip=clip_features,
        model=model.config,
        params=state.params,
        tokenizer=pairs.tokenizer,
    )
    test = pairs.splits["test"]
    captions = [str(test[i]["caption"]) for i in range(3)]
    text = np.stack([test[i]["text"] for i in range(3)])
    out = dalle_pipeline.generate(
        model.config,
        state.params,
        text,
        captions,
        dvae=dvae_model,
        reranker=reranker,
        candidates=4,
        rng=jax.random.key(0),
    )
    assert out["images"].shape == (3, 4, 32, 32, 3) and out["images"].dtype == np.uint8
    assert (np.diff(out["scores"], axis=1) <= 0).all()  # best first
    # Images, tokens and every score stay aligned through the reordering.
    decoded = image_tokens.decode_images(*dvae_model, out["tokens"].reshape(12, -1))
    np.testing.assert_array_equal(decoded.reshape(out["images"].shape), out["images"])
    again = reranker.scores(out["images"], out["tokens"], captions)
    assert set(again) == {"clip", "likelihood", "rebinding"}
    for name, scores in again.items():
        np.testing.assert_allclose(scores, out[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reranker.rank_key(again), out["scores"], rtol=1e-5, atol=1e-6)


def test_mismatched_tokenizer_and_vocabulary_is_named(dvae_workdir, tmp_path):
    config = _config(dvae_workdir, tmp_path / "data")
    config.model.text_vocab = 300  # the shapes BPE has ~370 ids
    with pytest.raises(ValueError, match=r"vocabulary is 3\d\d, but the transformer's text_vocab"):
        dalle.build(config, tmp_path)
    config = _config(dvae_workdir, tmp_path / "data")
    config.model.image_vocab = 512
    with pytest.raises(ValueError, match="dVAE's vocabulary is 64, but .* image_vocab is 512"):
        dalle.build(config, tmp_path)


def test_missing_stage_is_named(dvae_workdir, tmp_path):
    config = _config(dvae_workdir, tmp_path / "data")
    config.stages.dvae = "../no_dvae"
    with pytest.raises(FileNotFoundError, match="stage 'dvae' reads the run in .*no_dvae"):
        dalle.build(config, tmp_path)
    # Training stops before its first step when the clip stage it is evaluated with is missing.
    config.stages.clip = "../no_clip"
    with pytest.raises(FileNotFoundError, match="stage 'clip' reads the run in .*no_clip"):
        dalle.train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_recipe_fits_the_dvae_recipe():
    for quick in (False, True):
        model = dalle_config.get_config(quick=quick).model
        dvae = dvae_config.get_config(quick=quick)
        assert model.image_vocab == dvae.model.vocab_size
        downsample = 2 ** (dvae.model.group_count - 1)
        assert model.image_side == dvae.data.resolution // downsample
