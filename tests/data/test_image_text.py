"""Image-caption sources: concatenation, stable captions, tokenisation."""

import numpy as np
import pytest

from jaxaigc.data import image_text, wordnet


def test_concatenate_indexes_across_sources():
    a = image_text.shapes_source(3, 16, seed=0, split="train")
    b = image_text.ArraySource(np.zeros((2, 16, 16, 3), np.uint8), ["x", "y"], name="b")
    both = image_text.Concatenate([a, b])
    assert len(both) == 5
    assert both[2]["caption"] == a[2]["caption"]
    assert both[3]["caption"] == "x" and both[4]["caption"] == "y"
    np.testing.assert_array_equal(both[0]["image"], a[0]["image"])
    with pytest.raises(IndexError):
        both[5]
    assert repr(both) == repr(image_text.Concatenate([a, b]))


def test_array_source_checks_lengths():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        image_text.ArraySource(np.zeros((3, 4, 4, 3), np.uint8), ["a", "b"], name="bad")


def test_tokenize_truncates_and_keeps_image():
    def encode(texts, *, context_length, truncate):
        assert truncate
        ids = [len(w) for w in texts[0].split()][:context_length]
        return np.array([ids + [0] * (context_length - len(ids))])

    op = image_text.Tokenize(encode, context_length=3)
    out = op.map({"image": np.ones((2, 2, 3), np.uint8), "caption": "a bb ccc dddd"})
    assert set(out) == {"image", "tokens"}
    np.testing.assert_array_equal(out["tokens"], [1, 2, 3])
    assert out["tokens"].dtype == np.int32


def _asymmetric_image() -> np.ndarray:
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :4] = (255, 0, 0)  # a red band on the left
    image[4:8, 8:] = (0, 0, 255)
    return image


def _draws(record: dict, op: image_text.CaptionTrueAugment, n: int = 64) -> list[dict]:
    return [op.random_map(record, np.random.default_rng(seed)) for seed in range(n)]


def test_caption_true_augment_leaves_unmarked_records_alone():
    image = _asymmetric_image()
    source = image_text.Concatenate(
        [image_text.ArraySource(image[None], ["a small red square"], name="shapes")]
    )
    for out in _draws(source[0], image_text.CaptionTrueAugment(greyscale=1.0, word_dropout=0.9)):
        assert out.keys() == {"image", "caption"}
        np.testing.assert_array_equal(out["image"], image)
        assert out["caption"] == "a small red square"


def test_caption_true_augment_keeps_directions_and_colours_true():
    image = _asymmetric_image()
    marked = image_text.Augmentable(
        image_text.ArraySource(
            np.stack([image] * 3), ["leftwards arrow", "red apple", "tool box"], name="emoji"
        )
    )
    op = image_text.CaptionTrueAugment(crop_scale=1.0, greyscale=0.5)

    def band_on_left(out):
        return out["image"][:, 0].astype(int).sum() > out["image"][:, -1].astype(int).sum()

    assert all(band_on_left(out) for out in _draws(marked[0], op))  # never mirrored
    assert all(out["image"][..., 0].max() == 255 for out in _draws(marked[1], op))  # never grey
    plain = _draws(marked[2], op)
    assert 0 < sum(band_on_left(out) for out in plain) < len(plain)  # mirrored sometimes
    grey = [np.ptp(out["image"].astype(int), axis=-1).max() == 0 for out in plain]
    assert 0 < sum(grey) < len(grey)
    repeat = op.random_map(marked[2], np.random.default_rng(7))
    np.testing.assert_array_equal(repeat["image"], plain[7]["image"])


def test_caption_true_augment_crops_and_drops_words():
    marked = image_text.Augmentable(
        image_text.ArraySource(
            _asymmetric_image()[None], ["grinning face with big eyes"], name="emoji"
        )
    )
    op = image_text.CaptionTrueAugment(crop_scale=0.25, flip=False, greyscale=0.0, word_dropout=0.5)
    outs = _draws(marked[0], op)
    assert all(out["image"].shape == (16, 16, 3) for out in outs)
    assert any(not np.array_equal(out["image"], _asymmetric_image()) for out in outs)
    words = ["grinning", "face", "with", "big", "eyes"]
    captions = [out["caption"].split() for out in outs]
    assert all(c and all(w in words for w in c) for c in captions)
    assert any(len(c) < len(words) for c in captions)


def test_caption_true_augment_shrinks_onto_the_corner_colour_and_restyles():
    image = np.full((16, 16, 3), 255, np.uint8)
    image[4:12, 4:12] = (200, 40, 40)  # a red square on white
    marked = image_text.Augmentable(image_text.ArraySource(image[None], ["tool"], name="emoji"))
    op = image_text.CaptionTrueAugment(crop_scale=1.0, shrink=0.5, flip=False, greyscale=0.0)
    outs = [out["image"] for out in _draws(marked[0], op)]
    assert all(out.shape == image.shape for out in outs)
    red = [int((out[..., 0].astype(int) > out[..., 1].astype(int) + 80).sum()) for out in outs]
    assert min(red) < 30 < 64 == max(red)  # smaller squares (16 to 64 pixels), never larger
    restyle = image_text.CaptionTrueAugment(crop_scale=1.0, flip=False, greyscale=0.0, style=1.0)
    styled = _draws(marked[0], restyle)
    assert any(not np.array_equal(out["image"], image) for out in styled)
    for out in styled:  # hues kept: the square stays red, the background white or grey
        square, corner = out["image"][6:10, 6:10].astype(int), out["image"][0, 0].astype(int)
        assert (square[..., 0] > square[..., 1] + 40).all() and np.ptp(corner) < 8


@pytest.mark.skipif(
    not (wordnet.WORDNET_DIR / "index.noun").exists(),
    reason="sudo apt-get install -y wordnet-base for WordNet definitions in captions",
)
def test_caption_true_augment_appends_a_definition_of_the_name_or_a_word():
    marked = image_text.Augmentable(
        image_text.ArraySource(
            np.stack([_asymmetric_image()] * 2), ["dog face", "zzyzx"], name="emoji"
        )
    )
    op = image_text.CaptionTrueAugment(flip=False, greyscale=0.0, word_dropout=0.5, gloss=0.5)
    definitions = wordnet.name_definitions("dog face")
    captions = {out["caption"] for out in _draws(marked[0], op, n=200)}
    explained = {c for c in captions if c.startswith("dog face: ")}
    assert {c.removeprefix("dog face: ") for c in explained} == set(definitions)
    assert captions - explained <= {"dog face", "dog", "face"}  # else: word dropout
    assert {out["caption"] for out in _draws(marked[1], op)} == {"zzyzx"}  # nothing to define


def test_text_pairs_are_drawn_by_the_record_generator_and_tokenized():
    pairs = [("eagle", "bird"), ("puppy", "dog"), ("oak", "tree")]

    def encode(texts, context_length, truncate):
        return np.array([[len(t)] * context_length for t in texts], np.int32)

    op = image_text.TextPairs(pairs, encode, 4)
    element = {"image": np.zeros((2, 2, 3), np.uint8), "tokens": np.zeros(4, np.int32)}
    outs = [op.random_map(element, np.random.default_rng(seed)) for seed in (0, 0, 1, 2, 3)]
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert {(int(o["pair_a"][0]), int(o["pair_b"][0])) for o in outs} <= {(5, 4), (5, 3), (3, 4)}
    assert outs[0]["image"] is element["image"] and outs[0]["pair_a"].shape == (4,)
