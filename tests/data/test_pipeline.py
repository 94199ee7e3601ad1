"""The global batch order: independent of how rows are split over processes, resumable in global
terms, and the one-process order grain's DataLoader gave before; the in-memory array source."""

import grain
import numpy as np
import pytest

from jaxaigc.data.image_text import shapes_source
from jaxaigc.data.pipeline import ArrayRecords, BatchIterator, DataStateMismatch
from jaxaigc.data.preprocess import RandomCrop


def batches(source, *, rows=None, batch_size=8, seed=3):
    it = BatchIterator(source, global_batch_size=batch_size, seed=seed, operations=[RandomCrop(12)])
    if rows is not None:
        it.select_rows(rows)
    return it


@pytest.fixture(scope="module")
def source():
    return shapes_source(40, 16, seed=0, split="train")  # 5 batches of 8 per epoch


def test_processes_rows_make_up_the_one_process_batch(source):
    whole = batches(source)
    # Two "processes" with interleaved rows, as a mesh could give them.
    halves = [batches(source, rows=np.arange(8)[i::2]) for i in range(2)]
    for _ in range(12):  # past two epoch boundaries: every epoch reshuffled
        expected = next(whole)
        parts = [next(h) for h in halves]
        for i, part in enumerate(parts):
            # Same records and the same random crops: each drawn from its global position.
            np.testing.assert_array_equal(part["image"], expected["image"][i::2])
            assert list(part["caption"]) == list(expected["caption"][i::2])


def test_a_position_saved_by_one_split_resumes_on_another(source):
    half = batches(source, rows=np.arange(4, 8))
    for _ in range(7):
        next(half)
    state = half.get_state()
    assert state["batches_consumed"] == 7
    reference = batches(source)
    for _ in range(7):
        next(reference)
    resumed = batches(source)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], next(reference)["image"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(batch_size=16), "global_batch_size: saved 8, now 16"),
        (dict(seed=4), "seed: saved 3, now 4"),
        (
            dict(n=48),
            r"dataset: saved \"ArraySource\('shapes/16/train/seed0', n=40\)\", now .*n=48",
        ),
    ],
)
def test_an_incompatible_position_names_the_setting(source, change, message):
    state = batches(source).get_state()
    other = shapes_source(change.pop("n", 40), 16, seed=0, split="train")
    with pytest.raises(DataStateMismatch, match=message):
        batches(other, **change).set_state(state)


def test_a_grain_per_process_state_is_refused_clearly(source):
    old = {"version": 2, "last_seen_indices": {"0": 7}, "last_worker_index": -1}
    with pytest.raises(DataStateMismatch, match="grain's per-process format"):
        batches(source).set_state(old)


def test_one_process_keeps_the_order_of_grains_dataloader(source):
    # The order (and random crops) of the per-process DataLoader this pipeline replaced, on one
    # process: figures measured before stay reproducible.
    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.samplers.IndexSampler(
            len(source),
            shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
            shuffle=True,
            seed=3,
        ),
        operations=[RandomCrop(12), grain.transforms.Batch(8, drop_remainder=True)],
        worker_count=0,
    )
    ours = batches(source)
    for expected, _ in zip(loader, range(12), strict=False):
        np.testing.assert_array_equal(next(ours)["image"], expected["image"])


def test_bad_rows_and_operations_are_refused(source):
    with pytest.raises(ValueError, match=r"rows \[8\] are not indices into a global batch of 8"):
        batches(source).select_rows([8])
    with pytest.raises(TypeError, match="not a grain Map or RandomMap"):
        BatchIterator(source, global_batch_size=8, seed=0, operations=[grain.transforms.Batch(2)])


def test_array_records_are_rows_of_the_arrays():
    source = ArrayRecords({"x": np.arange(6).reshape(3, 2), "y": np.arange(3)}, name="toy")
    assert len(source) == 3 and repr(source) == "ArrayRecords('toy', n=3)"
    np.testing.assert_array_equal(source[1]["x"], [2, 3])
    assert source[1]["y"] == 1
    with pytest.raises(ValueError, match=r"toy: arrays of different lengths \[2, 3\]"):
        ArrayRecords({"x": np.zeros(3), "y": np.zeros(2)}, name="toy")
