"""The full-size CLIP and SigLIP recipes with tiny sizes substituted: they build, shard over 8
devices (FSDP), train on WebDataset shards, resume bit-identically after a crash, and report
retrieval on held-out pairs."""

import tarfile

import numpy as np
import pytest

from jaxaigc import run
from jaxaigc.configs.saved import save_run
from jaxaigc.systems import clip
from jaxaigc.train import loop
from tests.data.test_shards import _add, _encoded
from tests.helpers import assert_trees_equal

pytestmark = pytest.mark.slow


def _write_shards(folder, shards: int, per_shard: int, *, first: int = 0) -> str:
    """Shards of distinct pictures (a colour per record) captioned with their colour."""
    rng = np.random.default_rng(first)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for k in range(per_shard):
                i = first + shard * per_shard + k
                colour = rng.integers(0, 256, 3)
                image = np.broadcast_to(colour, (24, 28, 3)).astype(np.uint8)
                _add(tar, f"{i:06d}.png", _encoded(image, "png"))
                _add(tar, f"{i:06d}.txt", "a picture coloured {} {} {}".format(*colour).encode())
    return f"webdataset:{folder}/{{{0:05d}..{shards - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    train, held_out = tmp_path_factory.mktemp("train"), tmp_path_factory.mktemp("held_out")
    return _write_shards(train, 2, 24), _write_shards(held_out, 1, 20, first=1000)


@pytest.mark.parametrize("recipe", ["clip-vit-b32", "siglip-vit-b16"])
def test_trains_sharded_resumes_and_reports(recipe, pairs, tmp_path):
    config = run.get_config(recipe, quick=True)
    config.data.source, config.data.eval_source = pairs
    assert config.model.dtype == "bfloat16" and config.model.scan_layers
    _, task, batches, _ = clip.build(config)
    straight = loop.train(task, batches, config, tmp_path / "straight")

    def crash(step, state, metrics):
        if step == 2:  # after step 2's checkpoint
            raise KeyboardInterrupt

    workdir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        loop.train(task, clip.build(config)[2], config, workdir, hooks=[crash])
    resumed = loop.train(task, clip.build(config)[2], config, workdir)
    assert int(resumed.step) == config.train.steps
    assert_trees_equal(resumed.params, straight.params)
    # The parameters were sharded over all 8 devices (FSDP), as on a pod.
    embedding = resumed.params["token_embedding"]
    assert len(embedding.sharding.device_set) == 8

    save_run(workdir, recipe, config.to_dict())
    report = run.evaluate_run(workdir)
    recall = next(f for f in report["figures"] if "image-to-text R@1 among 20" in f["name"])
    assert recall["baseline"] == pytest.approx(1 / 20) and 0 <= recall["value"] <= 1
    assert report["pairs"] == 20 and (workdir / "report.html").exists()


def test_the_full_size_recipe_needs_its_data(tmp_path):
    config = run.get_config("clip-vit-b16")
    assert (config.model.vision_patch_size, config.train.batch_size) == (16, 32_768)
    with pytest.raises(ValueError, match="config.data.source is empty"):
        clip.train_on_pairs(config, tmp_path)
    assert not any(tmp_path.iterdir())
