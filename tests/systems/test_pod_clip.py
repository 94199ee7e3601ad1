"""The full-size CLIP and SigLIP recipes with tiny sizes substituted: they build, shard over 8
devices (FSDP), train on WebDataset shards, resume bit-identically after a crash, and report
retrieval on held-out pairs."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from jaxaigc import run
from jaxaigc.configs.saved import save_run
from jaxaigc.systems import clip
from jaxaigc.train import checkpoint, loop
from tests.data.test_shards import _add, _encoded
from tests.helpers import assert_trees_equal

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def _write_shards(
    folder, shards: int, per_shard: int, *, first: int = 0, corrupt: tuple[int, ...] = ()
) -> str:
    """Shards of distinct pictures (a colour per record) captioned with their colour; the
    records numbered in ``corrupt`` hold bytes that decode to no image."""
    rng = np.random.default_rng(first)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for k in range(per_shard):
                i = first + shard * per_shard + k
                colour = rng.integers(0, 256, 3)
                image = np.broadcast_to(colour, (24, 28, 3)).astype(np.uint8)
                data = b"not a png" if i in corrupt else _encoded(image, "png")
                _add(tar, f"{i:06d}.png", data)
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


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    """``jaxaigc train`` on shards with a corrupt record, SIGKILLed once its first checkpoint is
    on disk and resumed by a new process, ends where an uninterrupted run ends."""
    # 32 records, 2 batches of 16 an epoch: each epoch meets the corrupt record once, and each
    # checkpoint (every 4 steps) falls between epochs.
    (tmp_path / "train").mkdir()
    (tmp_path / "held_out").mkdir()
    source = _write_shards(tmp_path / "train", 2, 16, corrupt=(5,))
    eval_source = _write_shards(tmp_path / "held_out", 1, 16, first=1000)
    steps = 16

    def train(workdir) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "jaxaigc", "train", "clip-vit-b32", "--quick",
            "--workdir", str(workdir), f"--config.data.source={source}",
            f"--config.data.eval_source={eval_source}", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=4", "--config.eval.pairs=16",
        ]  # fmt: skip
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def finish(process: subprocess.Popen) -> str:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]
        return out

    straight = tmp_path / "straight"
    finish(train(straight))

    killed = tmp_path / "killed"
    process = train(killed)
    deadline = time.monotonic() + 600
    # Orbax writes a checkpoint under a temporary name and renames it to its step when complete.
    while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "report.json").exists()
    resumed = finish(train(killed))
    start = int(re.search(r"resumed from step (\d+)", resumed).group(1))
    assert 4 <= start < steps and start % 4 == 0

    config = run.get_config("clip-vit-b32", quick=True)
    _, task = clip.make_task(config)
    final = [checkpoint.load_trained(w, lambda _: task.init) for w in (straight, killed)]
    assert final[0][2] == final[1][2] == steps
    assert_trees_equal(final[1][1], final[0][1])
    # The count is each process's own: one corrupt record an epoch read since it started.
    for workdir, epochs in ((straight, steps // 2), (killed, (steps - start) // 2)):
        records = (workdir / "metrics.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, records) if r["step"] == steps][-1]
        assert last["data/skipped_records"] == epochs
