"""The shared text -> image judge: every rate is exact on the true scenes and falls to its chance
level on another scene's image."""

import numpy as np
import pytest

from jaxaigc.data import shapes
from jaxaigc.evaluate import judge


@pytest.fixture(scope="module")
def scenes():
    images, captions, _ = shapes.generate(200, 32, seed=0, split="test")
    return images, captions


def test_true_scenes_pass_every_rate(scenes):
    images, captions = scenes
    out = judge.rates(images, captions, attributes=True)
    assert out["all"]["captions"] == out["all"]["samples"] == 200
    assert out["seen"]["captions"] + out["held_out"]["captions"] == 200
    assert out["held_out"]["captions"] > 50  # half the test scenes hold a held-out pair
    for group in judge.GROUPS:
        r = out[group]
        assert r["swapped"] == 0.0
        for name in ("accuracy", "any_accuracy", "binding", *shapes.ATTRIBUTES):
            assert r[name] == 1.0, (group, name)


def test_another_scene_falls_to_chance(scenes):
    images, captions = scenes
    out = judge.rates(np.roll(images, 1, axis=0), captions, attributes=True)["all"]
    assert out["accuracy"] < 0.05 and out["binding"] < 0.05
    assert 0.3 < out["count"] < 0.7  # one or two objects, each half the time


def test_samples_per_caption(scenes):
    """k samples per caption: accuracy counts every sample, any_accuracy every caption."""
    images, captions = scenes
    samples = np.stack([images, np.roll(images, 1, axis=0)], axis=1)  # (n, 2, h, w, 3)
    out = judge.rates(samples, captions)["all"]
    assert out["samples"] == 400 and out["captions"] == 200
    assert out["any_accuracy"] == 1.0
    assert 0.5 <= out["accuracy"] < 0.55
    assert "count" not in out


def test_held_out_names_the_caption_pair():
    assert judge.names_held_out("a small purple triangle on the left")
    assert judge.names_held_out("a large red square left of a small green circle")
    assert not judge.names_held_out("a small purple circle on the left")
