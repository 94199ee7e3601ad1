"""Image-caption sources: concatenation, stable captions, tokenisation."""

import numpy as np
import pytest

from jaxaigc.data import image_text


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
