"""Your own image-caption data: WebDataset shards as img2dataset writes them and a captioned
folder, read record by record; corrupt images skipped and counted, never shifting a pairing;
the global order and resumption of the embedded sources; the CLIP recipe trains on shards."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxaigc.data import shards
from jaxaigc.data.image_text import Concatenate
from jaxaigc.data.pipeline import BatchIterator, CorruptRecord
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.run import get_config
from jaxaigc.systems import clip


def _image(i: int, size: int = 20) -> np.ndarray:
    """A picture that says which record it is: its colour is the record's number."""
    image = np.zeros((size, size + i % 3, 3), np.uint8)
    image[..., 0], image[..., 1] = i, 255 - i
    return image


def _encoded(image: np.ndarray, kind: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[kind],
                                **({"lossless": True} if kind == "webp" else {}))  # fmt: skip
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard_dir(tmp_path):
    """Two shards of 6 keys each: png, webp and jpg images with captions (some with json), one
    corrupt image (key 3 of each shard) and one image without a caption (key 5)."""
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for k in range(6):
                i = 6 * shard + k
                key = f"{i:09d}"
                kind = ("png", "webp", "jpg")[k % 3]
                data = b"not an image" if k == 3 else _encoded(_image(i), kind)
                _add(tar, f"{key}.{kind}", data)
                if k != 5:
                    _add(tar, f"{key}.txt", f"record {i}".encode())
                if k == 0:
                    _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return tmp_path


def test_shards_are_read_record_by_record(shard_dir):
    source = shards.WebDataset(str(shard_dir / "{00000..00001}.tar"))
    assert len(source) == 10 and source.skipped_at_index == 2
    assert source.paths == shards.expand(str(shard_dir / "*.tar"))
    for index in range(len(source)):
        shard, key = source.index[index][:2]
        i = int(key)
        if i % 6 == 3:
            with pytest.raises(CorruptRecord, match=f"{key}: the image does not decode"):
                source[index]
            continue
        record = source[index]
        assert record["caption"] == f"record {i}"
        tolerance = 3 if i % 3 == 2 else 0  # JPEG is lossy
        np.testing.assert_allclose(record["image"], _image(i), atol=tolerance)
        assert bool(record["json"]) == (i % 6 == 0)


def test_corrupt_records_are_skipped_counted_and_order_is_global(shard_dir):
    def iterator():
        source = Concatenate([shards.WebDataset(str(shard_dir / "*.tar"))])
        return BatchIterator(
            source, global_batch_size=4, seed=0, operations=clip_ops(16, train=False)
        )

    whole = iterator()
    batches = [next(whole) for _ in range(2)]
    assert whole.skipped_records > 0  # 2 corrupt records among 10, 8 rows read
    for batch in batches:
        assert batch["image"].shape == (4, 16, 16, 3)
        assert all(c.startswith("record ") and int(c.split()[1]) % 6 not in (3, 5)
                   for c in batch["caption"])  # fmt: skip

    # Two processes reading two rows each get the same global batches.
    halves = [iterator(), iterator()]
    for rows, half in zip(([0, 1], [2, 3]), halves, strict=True):
        half.select_rows(np.array(rows))
    first = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([f["image"] for f in first]), batches[0]["image"])

    # Resumed from its saved position, the iterator continues with the same batch.
    state = halves[0].get_state()
    resumed = iterator()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], batches[1]["image"])


def test_a_missing_or_broken_shard_is_named(shard_dir):
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        shards.WebDataset(str(shard_dir / "{00000..00002}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        shards.WebDataset(str(shard_dir / "*.zip"))
    (shard_dir / "broken.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(OSError, match="broken.tar cannot be read as a tar file"):
        shards.WebDataset(str(shard_dir / "broken.tar"))
    with pytest.raises(ValueError, match="unknown data source 'parquet:x'"):
        shards.image_text_source("parquet:x")


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_captioned_folder(tmp_path, kind):
    rows = []
    for i in range(4):
        Image.fromarray(_image(i)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"record {i}" if i != 2 else ""})
    (tmp_path / "broken.png").write_bytes(b"nope")
    rows.append({"file_name": "broken.png", "caption": "broken"})
    path = tmp_path / f"captions.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = shards.image_text_source(f"folder:{path}")
    assert len(source) == 4 and source.skipped_at_index == 1  # the row without a caption
    assert source[1]["caption"] == "record 1"
    np.testing.assert_array_equal(source[1]["image"], _image(1))
    with pytest.raises(CorruptRecord, match="broken.png"):
        source[3]
    path.write_text("name,words\n0.png,zero\n" if kind == "csv" else '{"name": "0.png"}\n')
    with pytest.raises(ValueError, match="needs an image column"):
        shards.CaptionedFolder(str(path))


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Five images, each with a list of captions as COCO's (the first says which image); the
    third has none."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing to locate: the examples are generated here

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            texts = [] if i == 2 else [f"record {i}", "another caption"]
            yield i, {"image": _encoded(_image(i), "png"), "captions": {"text": texts}}


def test_a_tfds_dataset_by_name(tmp_path):
    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    spec = f"tfds:tiny_captions:train?caption=captions/text&data_dir={tmp_path}"
    source = shards.image_text_source(spec)
    assert len(source) == 5 and repr(source).startswith("TfdsCaptions(tiny_captions/1.0.0:train")
    seen = set()
    for index in range(5):
        try:
            record = source[index]
        except CorruptRecord as error:
            assert "no caption" in str(error)
            continue
        i = int(record["caption"].split()[1])
        np.testing.assert_array_equal(record["image"], _image(i))  # pairing kept
        seen.add(i)
    assert seen == {0, 1, 3, 4}
    with pytest.raises(ValueError, match="no feature 'caption'"):
        shards.image_text_source(f"tfds:tiny_captions:train?data_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="'not_prepared_here' .* is not prepared"):
        shards.image_text_source(f"tfds:not_prepared_here?data_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['label'\]"):
        shards.image_text_source(f"tfds:tiny_captions?label=x&data_dir={tmp_path}")


def _folder_spec(folder) -> str:
    rows = []
    for i in range(8):
        Image.fromarray(_image(i)).save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": f"record {i}"}) + "\n")
    (folder / "captions.jsonl").write_text("".join(rows))
    return f"folder:{folder}/captions.jsonl"


def _tfds_spec(folder) -> str:
    TinyCaptions(data_dir=str(folder), file_format="array_record").download_and_prepare()
    return f"tfds:tiny_captions:train?caption=captions/text&data_dir={folder}"


@pytest.mark.parametrize("kind", ["webdataset", "folder", "tfds"])
def test_each_kind_resumes_its_global_order_on_another_process_count(kind, shard_dir, tmp_path):
    spec = {
        "webdataset": lambda: f"webdataset:{shard_dir}/*.tar",
        "folder": lambda: _folder_spec(tmp_path),
        "tfds": lambda: _tfds_spec(tmp_path),
    }[kind]()

    def iterator():
        source = shards.image_text_source(spec)
        ops = clip_ops(8, train=True)  # a random crop: its draws must resume too
        return BatchIterator(source, global_batch_size=2, seed=3, operations=ops)

    whole = iterator()
    expected = [next(whole) for _ in range(3)]
    first = iterator()
    next(first)
    # Two processes, one row each, resume after the first batch from the one process's state.
    halves = [iterator(), iterator()]
    for row, half in enumerate(halves):
        half.set_state(first.get_state())
        half.select_rows(np.array([row]))
    for batch in expected[1:]:
        rows = [next(half) for half in halves]
        np.testing.assert_array_equal(np.concatenate([r["image"] for r in rows]), batch["image"])
        assert [r["caption"][0] for r in rows] == list(batch["caption"])


@pytest.mark.slow
def test_the_clip_recipe_trains_on_shards(shard_dir, tmp_path):
    config = get_config("clip", quick=True)
    config.data.source = f"webdataset:{shard_dir}/*.tar"
    config.train.update(dict(batch_size=8, steps=2, log_every=1, checkpoint_every=2))
    _, _, batches, _ = clip.build(config)
    spec = clip.batch_spec(config)
    batch = next(batches)
    assert {k: batch[k].shape[1:] for k in spec} == {k: s for k, (s, _) in spec.items()}
    clip.train(config, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert metrics[-1]["step"] == 2 and "data/skipped_records" in metrics[-1]
