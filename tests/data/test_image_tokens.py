"""DALL-E's cached (caption tokens, image tokens) pairs: exact against direct encoding, reused
only while the fingerprint matches, readable and resumable through grain; and the loader of a
trained dVAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc import parallel
from jaxaigc.configs import dvae as dvae_recipe
from jaxaigc.data import image_tokens, shapes
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.tokenizers import BPETokenizer
from jaxaigc.models.dvae import DVAEConfig, encode, init_dvae, init_train_variables
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.train.checkpoint import Checkpointer
from jaxaigc.train.state import TrainState
from tests.helpers import assert_trees_equal

# 32 px -> 8 x 8 tokens like the demo's dVAE, narrower; random parameters: the tokens need not
# mean anything for the cache to be tested.
MODEL = DVAEConfig(n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=64, n_init=8)
CONFIG = image_tokens.TokenPairsConfig(train=64, validation=24, test=24)


class CountingEncoder:
    """Wraps ``image_tokens.encode_images`` and counts the images it encodes."""

    def __init__(self, monkeypatch):
        self.images, self._encode = 0, image_tokens.encode_images
        monkeypatch.setattr(image_tokens, "encode_images", self)

    def __call__(self, model, variables, images, **kwargs):
        self.images += len(images)
        return self._encode(model, variables, images, **kwargs)


def random_variables(seed: int) -> dict:
    """Normal(0, 0.5) variables of ``MODEL`` drawn with NumPy (compiling Flax's initialisers,
    eagerly or jitted, takes 10-20 s on 2 busy cores); wide enough to give varied tokens."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_dvae(MODEL, jax.random.key(0))))
    return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def variables():
    return random_variables(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensorflow_datasets")


@pytest.fixture(scope="module")
def pairs(variables, data_dir):
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = CountingEncoder(monkeypatch)
        built = image_tokens.load(CONFIG, MODEL, variables, dvae_step=None, data_dir=data_dir)
    assert counter.images == CONFIG.train + CONFIG.validation + CONFIG.test
    return built


def records(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_cached_records_equal_direct_encoding(pairs, variables, split):
    images, captions, scenes = shapes.generate(
        CONFIG.sizes[split], CONFIG.resolution, seed=CONFIG.seed, split=split
    )
    cached = records(pairs.splits[split])
    assert [r["caption"] for r in cached] == captions  # record i is scene i
    tokens = np.stack([r["image"] for r in cached])
    assert tokens.dtype == np.int32 and tokens.shape == (len(images), 64)
    assert len(np.unique(tokens)) >= 5  # not one constant token: the comparisons below bite
    # Unjitted, whole split at once; and jitted in batches that do not divide the split.
    direct = np.asarray(encode(MODEL, variables, images)).reshape(len(images), -1)
    np.testing.assert_array_equal(tokens, direct)
    np.testing.assert_array_equal(
        tokens, image_tokens.encode_images(MODEL, variables, images, batch_size=7)
    )
    text = np.stack([r["text"] for r in cached])
    np.testing.assert_array_equal(
        text, pairs.tokenizer.encode(captions, length=CONFIG.text_len, eos=True)
    )
    held = [any((o.colour, o.shape) in shapes.HELD_OUT for o in s.objects) for s in scenes]
    assert [bool(r["held_out"]) for r in cached] == held
    decoded = image_tokens.decode_images(MODEL, variables, tokens[:5], batch_size=2)
    assert decoded.shape == (5, 32, 32, 3) and decoded.dtype == np.uint8


def test_held_out_pairs_stay_out_of_training(pairs):
    train = records(pairs.splits["train"])
    assert not any(r["held_out"] for r in train)
    assert any(r["held_out"] for r in records(pairs.splits["validation"]))


def test_captions_round_trip_through_the_saved_tokenizer(pairs):
    saved = BPETokenizer.load(pairs.directory / image_tokens.TOKENIZER_FILE)
    assert saved.__getstate__() == pairs.tokenizer.__getstate__()
    assert saved.vocab_size <= CONFIG.bpe_vocab_size
    for split in shapes.SPLITS:
        cached = records(pairs.splits[split])
        text = np.stack([r["text"] for r in cached])
        assert saved.decode(text) == [r["caption"] for r in cached]
        for row in text:  # ids, EOS, then only pad ids
            n = int((row != saved.pad_id).sum())
            assert row[n - 1] == saved.eos_id and (row[n:] == saved.pad_id).all()


def test_cache_is_reused_while_the_fingerprint_matches(pairs, variables, data_dir, monkeypatch):
    counter = CountingEncoder(monkeypatch)
    again = image_tokens.load(CONFIG, MODEL, variables, dvae_step=None, data_dir=data_dir)
    assert counter.images == 0
    assert again.fingerprint == pairs.fingerprint and again.directory == pairs.directory
    assert repr(again.splits["train"]) == repr(pairs.splits["train"])


@pytest.mark.parametrize(
    "change",
    [
        dict(variables=1),  # new dVAE parameters
        dict(dvae_step=500),  # another checkpoint
        dict(config=CONFIG.replace(seed=1)),
        dict(config=CONFIG.replace(text_len=24)),
    ],
    ids=["params", "step", "seed", "text_len"],
)
def test_cache_is_rebuilt_when_an_input_changes(pairs, variables, data_dir, monkeypatch, change):
    counter = CountingEncoder(monkeypatch)
    config = change.get("config", CONFIG)
    if "variables" in change:
        variables = random_variables(change["variables"])
    rebuilt = image_tokens.load(
        config, MODEL, variables, dvae_step=change.get("dvae_step"), data_dir=data_dir
    )
    assert counter.images == config.train + config.validation + config.test
    assert rebuilt.fingerprint != pairs.fingerprint
    assert rebuilt.directory != pairs.directory and pairs.directory.is_dir()


def test_long_caption_raises_unless_truncated(variables, tmp_path, monkeypatch):
    counter = CountingEncoder(monkeypatch)
    short = CONFIG.replace(text_len=6)
    with pytest.raises(ValueError, match=r"is \d+ tokens, longer than length 6.*truncate=True"):
        image_tokens.load(short, MODEL, variables, dvae_step=None, data_dir=tmp_path)
    assert counter.images == 0  # checked before any image is encoded
    cut = image_tokens.load(
        short.replace(truncate=True), MODEL, variables, dvae_step=None, data_dir=tmp_path
    )
    text = np.stack([r["text"] for r in records(cut.splits["train"])])
    assert text.shape == (CONFIG.train, 6) and (text[:, -1] == cut.tokenizer.eos_id).all()


def test_dvae_grid_must_match_image_side(variables, tmp_path):
    with pytest.raises(ValueError, match=r"8 x 8 token grid, but image_side is 4"):
        image_tokens.load(
            CONFIG.replace(image_side=4), MODEL, variables, dvae_step=None, data_dir=tmp_path
        )
    with pytest.raises(ValueError, match=r"7.5 x 7.5 token grid, but image_side is 8"):
        image_tokens.check_grid(MODEL, resolution=30, image_side=8)


def test_batch_iterator_shapes_and_exact_resume(pairs):
    def batches():
        return BatchIterator(pairs.splits["train"], global_batch_size=8, seed=3)

    it = batches()
    first = next(it)
    assert first["text"].shape == (8, CONFIG.text_len) and first["text"].dtype == np.int32
    assert first["image"].shape == (8, CONFIG.image_side**2) and first["image"].dtype == np.int32
    assert len(first["caption"]) == 8 and isinstance(first["caption"][0], str)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(10)]  # crosses the epoch boundary (64 records)
    resumed = batches()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("text", "image", "held_out"):
            np.testing.assert_array_equal(got[key], want[key])
        assert list(got["caption"]) == list(want["caption"])


def test_load_trained_reads_the_latest_checkpoint(mesh_2x2x2, tmp_path):
    config = dvae_recipe.get_config()
    config.model.update(dict(n_hid=MODEL.n_hid, vocab_size=MODEL.vocab_size, n_init=MODEL.n_init))
    with pytest.raises(FileNotFoundError, match="no dVAE checkpoint"):
        dvae_pipeline.load_trained(tmp_path)

    # Sharded over 8 devices by the parameters' logical axes, as in training; placed with
    # device_put rather than a jitted init, which compiles for seconds on this mesh.
    boxed = jax.eval_shape(lambda: init_train_variables(MODEL, jax.random.key(0)))
    shardings = parallel.logical_shardings(boxed, mesh_2x2x2, parallel.make_rules())["params"]
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    saved = {}
    for step, ema_decay in ((1, 0.0), (3, 0.99)):
        variables = random_variables(step)
        params = {half: variables[half]["params"] for half in ("encoder", "decoder")}
        # The EMA differs from the raw parameters, so the test sees which one is read.
        ema = jax.tree.map(lambda p: p + 1.0, params) if ema_decay else None
        state = TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=jax.device_put(params, shardings),
            opt_state={"mu": jax.device_put(params, shardings)},
            model_state={},
            ema_params=None if ema is None else jax.device_put(ema, shardings),
        )
        config.train.ema_decay = ema_decay
        checkpointer.save(step, state, data_state={}, config=config.to_dict(), force=True)
        saved[step] = jax.device_get(params if ema is None else ema)
    checkpointer.close()

    for step, want in ((None, 3), (1, 1), (3, 3)):
        model, variables, got = dvae_pipeline.load_trained(tmp_path, step=step)
        assert model == MODEL and got == want
        assert_trees_equal(variables, {half: {"params": p} for half, p in saved[want].items()})
        assert {leaf.sharding.device_set.pop() for leaf in jax.tree.leaves(variables)} == {
            jax.local_devices()[0]
        }
    with pytest.raises(ValueError, match=r"no checkpoint at step 2 .* holds \[1, 3\]"):
        dvae_pipeline.load_trained(tmp_path, step=2)
