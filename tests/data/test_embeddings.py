"""clip-retrieval's output folders as a source: rows aligned across a shard's three files and read
by offset, captionless rows skipped and counted, broken shards named; images joined to their
embeddings by key."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jaxaigc.data.embeddings import ClipEmbeddings, EmbeddedImages, npy_rows
from jaxaigc.data.shards import WebDataset


def embedding(i: int, width: int, kind: str) -> np.ndarray:
    """Sample ``i``'s unit-norm embedding of ``kind`` (image or text), float16 as clip-retrieval
    writes it."""
    rng = np.random.default_rng([i, kind == "text"])
    x = rng.normal(size=width)
    return (x / np.linalg.norm(x)).astype(np.float16)


def write_clip_retrieval(folder, shards, *, width=8, captionless=(), key_column=True):
    """A clip-retrieval output folder: shard ``name`` holds the samples of ``shards[name]`` (ints;
    key ``f"{i:09d}"``, caption ``f"caption {i}"``, None for those in ``captionless``)."""
    for name in ("img_emb", "text_emb", "metadata"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        for kind, prefix in (("image", "img_emb"), ("text", "text_emb")):
            rows = np.stack([embedding(i, width, kind) for i in samples])
            np.save(folder / prefix / f"{prefix}_{name}.npy", rows)
        columns = {
            "image_path": [f"{i:09d}" for i in samples],
            "caption": [None if i in captionless else f"caption {i}" for i in samples],
        }
        if key_column:
            columns = {"url": [f"http://x/{i}" for i in samples], "key": columns["image_path"],
                       "caption": columns["caption"]}  # fmt: skip
        pq.write_table(pa.table(columns), folder / "metadata" / f"metadata_{name}.parquet")
    return folder


def test_rows_are_read_aligned_by_offset(tmp_path):
    folder = write_clip_retrieval(
        tmp_path / "emb", {"00": range(5), "01": range(5, 12)}, captionless={2, 9}
    )
    source = ClipEmbeddings(str(folder))
    assert len(source) == 10 and source.skipped_at_index == 2 and source.width == 8
    samples = [i for i in range(12) if i not in (2, 9)]
    for index, i in enumerate(samples):
        record = source[index]
        assert record["key"] == f"{i:09d}" and record["caption"] == f"caption {i}"
        for kind in ("image", "text"):
            got = record[f"{kind}_embedding"]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, embedding(i, 8, kind).astype(np.float32))
    assert list(source.keys()) == [f"{i:09d}" for i in samples]
    assert repr(source) == repr(ClipEmbeddings(str(folder)))
    assert "2 shards, 10 samples, width 8" in repr(source)
    layout = npy_rows(folder / "img_emb" / "img_emb_01.npy")
    assert (layout.rows, layout.width, layout.dtype) == (7, 8, np.float16)


def test_shard_numbers_sort_numerically_and_image_path_is_the_key(tmp_path):
    folder = write_clip_retrieval(
        tmp_path, {"10": [10], "2": [2], "1": [1]}, key_column=False
    )  # fmt: skip
    assert list(ClipEmbeddings(str(folder)).keys()) == [f"{i:09d}" for i in (1, 2, 10)]


def test_broken_shards_are_named(tmp_path):
    folder = write_clip_retrieval(tmp_path / "a", {"0": range(3), "1": range(3, 6)})
    (folder / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard 1 of .*: no .*text_emb_1.npy"):
        ClipEmbeddings(str(folder))

    folder = write_clip_retrieval(tmp_path / "b", {"0": range(3)})
    np.save(folder / "text_emb" / "text_emb_0.npy", np.zeros((4, 8), np.float16))
    with pytest.raises(ValueError, match="shard 0 of .*: 3 image embeddings, 4 text embeddings"):
        ClipEmbeddings(str(folder))

    folder = write_clip_retrieval(tmp_path / "c", {"0": range(3)})
    path = folder / "img_emb" / "img_emb_0.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(OSError, match="img_emb_0.npy is truncated"):
        ClipEmbeddings(str(folder))
    path.write_bytes(b"not numpy")
    with pytest.raises(OSError, match="img_emb_0.npy cannot be read as a .npy file"):
        ClipEmbeddings(str(folder))

    folder = write_clip_retrieval(tmp_path / "d", {"0": range(3)})
    (folder / "metadata" / "metadata_0.parquet").write_bytes(b"not parquet")
    with pytest.raises(OSError, match="metadata_0.parquet cannot be read as a parquet file"):
        ClipEmbeddings(str(folder))

    folder = write_clip_retrieval(tmp_path / "e", {"0": range(2), "1": range(2, 4)})
    np.save(folder / "img_emb" / "img_emb_1.npy", np.zeros((2, 4), np.float16))
    np.save(folder / "text_emb" / "text_emb_1.npy", np.zeros((2, 4), np.float16))
    with pytest.raises(ValueError, match="shard 1 .* 4 wide, text 4; the first shard's are 8"):
        ClipEmbeddings(str(folder))

    with pytest.raises(FileNotFoundError, match="holds no img_emb_N.npy"):
        ClipEmbeddings(str(tmp_path / "e" / "metadata"))
    with pytest.raises(FileNotFoundError, match="no such embeddings folder"):
        ClipEmbeddings(str(tmp_path / "missing"))


def write_shard(path, samples, shape=(6, 6)):
    """A WebDataset shard of samples ``samples``: a PNG of value i and ``caption i`` each."""
    with tarfile.open(path, "w") as tar:
        for i in samples:
            image = io.BytesIO()
            Image.fromarray(np.full((*shape, 3), i, np.uint8)).save(image, format="PNG")
            for name, data in ((f"{i:09d}.png", image.getvalue()),
                               (f"{i:09d}.txt", f"caption {i}".encode())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_images_join_their_embeddings_by_key(tmp_path):
    # The embeddings in another order than the images; sample 4 has none, sample 6 no caption.
    folder = write_clip_retrieval(tmp_path / "emb", {"0": [7, 3, 5], "1": [0, 6, 1, 2]},
                                  captionless={6})  # fmt: skip
    write_shard(tmp_path / "00000.tar", range(4))
    write_shard(tmp_path / "00001.tar", range(4, 8))
    joined = EmbeddedImages(WebDataset(str(tmp_path / "*.tar")), ClipEmbeddings(str(folder)))
    assert len(joined) == 6 and joined.skipped_at_index == 2
    for index, i in enumerate([0, 1, 2, 3, 5, 7]):
        record = joined[index]
        assert record["caption"] == f"caption {i}" and int(record["image"][0, 0, 0]) == i
        expected = embedding(i, 8, "image").astype(np.float32)
        np.testing.assert_array_equal(record["image_embedding"], expected)
    assert repr(joined).startswith("EmbeddedImages(WebDataset(2 shards")

    write_clip_retrieval(tmp_path / "twice", {"0": [1], "1": [1]})
    with pytest.raises(ValueError, match="key '000000001' has several embeddings"):
        EmbeddedImages(WebDataset(str(tmp_path / "*.tar")), ClipEmbeddings(tmp_path / "twice"))
