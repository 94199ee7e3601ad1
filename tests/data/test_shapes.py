import numpy as np
import pytest

from jaxaigc.data import shapes
from jaxaigc.data.shapes import Obj, Scene


@pytest.mark.parametrize("size", [32, 64])
def test_judge_accepts_true_captions_and_rejects_one_attribute_changes(size):
    images, captions, scenes = shapes.generate(300, size, seed=7, split="test")
    rng = np.random.default_rng(0)
    accepted = np.mean([shapes.check(im, c) for im, c in zip(images, captions, strict=True)])
    wrong = [shapes.caption(shapes.perturb(s, rng), rng) for s in scenes]
    rejected = np.mean([not shapes.check(im, c) for im, c in zip(images, wrong, strict=True)])
    assert accepted >= 0.99 and rejected >= 0.99, (accepted, rejected)
    assert images.shape == (300, size, size, 3) and images.dtype == np.uint8


def test_generate_is_deterministic_by_seed_and_split():
    a_images, a_captions, _ = shapes.generate(20, 32, seed=3)
    b_images, b_captions, _ = shapes.generate(20, 32, seed=3)
    np.testing.assert_array_equal(a_images, b_images)
    assert a_captions == b_captions
    for split in ("validation", "test"):
        assert shapes.generate(20, 32, seed=3, split=split)[1] != a_captions
    assert shapes.generate(20, 32, seed=4)[1] != a_captions
    with pytest.raises(ValueError, match="unknown split"):
        shapes.generate(1, 32, seed=0, split="held_out")


def pairs(scenes):
    return {(o.colour, o.shape) for s in scenes for o in s.objects}


def test_held_out_pairs_never_in_train_and_common_in_test():
    assert not pairs(shapes.generate(2000, 32, seed=0)[2]) & shapes.HELD_OUT
    test_scenes = shapes.generate(200, 32, seed=0, split="test")[2]
    assert pairs(test_scenes) >= shapes.HELD_OUT
    assert np.mean([bool(pairs([s]) & shapes.HELD_OUT) for s in test_scenes]) > 0.4
    custom = {("red", "square")}
    assert ("red", "square") not in pairs(shapes.generate(500, 32, seed=0, held_out=custom)[2])


def test_caption_parser_inverts_every_template():
    rng = np.random.default_rng(0)
    one = Scene((Obj("cross", "orange", "large", "top"),))
    two = Scene((Obj("circle", "red", "small"), Obj("square", "blue", "large")), "right of")
    texts = {scene: {shapes.caption(scene, rng) for _ in range(200)} for scene in (one, two)}
    assert len(texts[one]) == len(shapes._ONE_TEMPLATES)
    assert len(texts[two]) == 2 * len(shapes._TWO_TEMPLATES)
    for scene, captions in texts.items():
        assert all(shapes.parse_caption(c) == scene for c in captions)
    with pytest.raises(ValueError, match="no caption template"):
        shapes.parse_caption("a small red circle near a large blue square")


def test_hand_written_scenes():
    image = np.zeros((32, 32, 3), np.uint8)
    image[4:11, 2:9] = shapes.PALETTE["red"]  # small red square, top left
    assert shapes.check(image, "a small red square on the left")
    assert not shapes.check(image, "a small red square on the right")
    image[10:23, 18:31][shapes._mask("circle", 13, 13)] = shapes.PALETTE["blue"]
    assert shapes.check(image, "A small red square to the left of a large blue circle.")
    assert shapes.check(image, "there is a large blue circle right of a small red square")
    assert not shapes.check(image, "a small red square above a large blue circle")
    assert not shapes.check(image, "a small red square left of a large blue diamond")


def test_verdict_separates_binding_from_swapped_colours():
    caption = "a large red circle left of a large blue square"
    scene = shapes.parse_caption(caption)
    boxes = [(4, 8, 13), (18, 8, 13)]  # (x, y, side) of each object, 2 px apart at least
    right = shapes.render(scene, boxes, 32)
    assert shapes.verdict(right, caption) == {"correct": True, "bound": True, "swapped": False}
    (a, b) = scene.objects
    swapped = Scene((Obj(a.shape, b.colour, a.size), Obj(b.shape, a.colour, b.size)), "left of")
    got = shapes.verdict(shapes.render(swapped, boxes, 32), caption)
    assert got == {"correct": False, "bound": False, "swapped": True}
    # Same shapes: exchanging the colours draws the same objects, so it is no swap.
    same = "a large red circle left of a large blue circle"
    twin = shapes.parse_caption("a large blue circle left of a large red circle")
    got = shapes.verdict(shapes.render(twin, boxes, 32), same)
    assert got == {"correct": False, "bound": True, "swapped": False}
    assert "bound" not in shapes.verdict(right, "a large red circle on the left")


def test_attributes_judge_each_attribute_on_its_own():
    caption = "a large red circle left of a small blue square"
    boxes = [(2, 8, 13), (20, 10, 7)]
    right = shapes.render(shapes.parse_caption(caption), boxes, 32)
    assert shapes.attributes(right, caption) == dict.fromkeys(
        ("count", "colours", "shapes", "sizes"), True
    )
    # The shapes exchanged: every attribute but the shapes as a multiset still holds.
    other = shapes.render(
        shapes.parse_caption("a large red square left of a small blue circle"), boxes, 32
    )
    assert shapes.attributes(other, caption) == dict(
        count=True, colours=True, shapes=True, sizes=True
    )
    wrong_shape = shapes.render(
        shapes.parse_caption("a large red diamond left of a small blue square"), boxes, 32
    )
    assert shapes.attributes(wrong_shape, caption)["shapes"] is False
    assert not shapes.check(wrong_shape, caption)
    one = "a small green cross on the right"
    image = shapes.render(shapes.parse_caption(one), [(22, 12, 7)], 32)
    assert shapes.attributes(image, one) == dict(
        count=True, colours=True, shapes=True, sizes=True, position=True
    )
    got = shapes.attributes(image, "a large green cross on the left")
    assert got == dict(count=True, colours=True, shapes=True, sizes=False, position=False)
    got = shapes.attributes(np.zeros((32, 32, 3), np.uint8), one)
    assert not any(got.values())


def test_rebindings_are_captions_of_the_same_words_bound_otherwise():
    _, captions, scenes = shapes.generate(200, 32, seed=2, split="test")
    for text, scene in zip(captions, scenes, strict=True):
        rebound = shapes.rebindings(text)
        if len(scene.objects) == 1:
            assert rebound == []
            continue
        # Every distinct binding but the caption's own: 2 ** 4 exchanges, less the ones that
        # exchange equal attributes, halved (exchanging every object attribute and reversing the
        # relation states the same scene).
        same = sum(getattr(scene.objects[0], f) == getattr(scene.objects[1], f) for f in _FIELDS)
        assert len(rebound) == 2 ** (4 - same) // 2 - 1, (text, rebound)
        seen = {scene.canonical()}
        for other in rebound:
            parsed = shapes.parse_caption(other)  # a valid caption
            assert parsed.relation in (scene.relation, shapes._FLIP[scene.relation])
            assert parsed.canonical() not in seen  # differs from the caption and the others
            seen.add(parsed.canonical())
            for field in _FIELDS:  # the same attributes, maybe on the other object
                assert sorted(getattr(o, field) for o in parsed.objects) == sorted(
                    getattr(o, field) for o in scene.objects
                )
            # The template is kept: only attribute words and the relation's direction change.
            assert len(other.split()) == len(text.split())
    colour_only = shapes.rebindings(
        "a small red circle left of a small blue circle", fields=("colour",)
    )
    assert colour_only == ["a small blue circle left of a small red circle"]
    assert shapes.rebindings(
        "there is a large purple triangle above a small blue diamond", fields=("shape", "relation")
    ) == [  # fmt: skip
        "there is a large purple triangle below a small blue diamond",
        "there is a large purple diamond above a small blue triangle",
        "there is a large purple diamond below a small blue triangle",
    ]
    assert shapes.rebindings("a picture of a large red cross at the top") == []
    with pytest.raises(ValueError, match="no caption template"):
        shapes.rebindings("a red circle near a blue square")
    with pytest.raises(ValueError, match="unknown fields"):
        shapes.rebindings("a small red circle left of a small blue circle", fields=("texture",))


_FIELDS = ("colour", "shape", "size")


def test_binding_scenes_differ_in_colour_and_shape():
    images, captions, scenes = shapes.generate_binding(50, 32, seed=1)
    assert len(captions) == len(scenes) == 50 and images.shape == (50, 32, 32, 3)
    for image, text, scene in zip(images, captions, scenes, strict=True):
        a, b = shapes.parse_caption(text).objects
        assert a.colour != b.colour and a.shape != b.shape and scene == shapes.parse_caption(text)
        assert shapes.check(image, text)
    # The first of generate's stream that qualify, in its order (a longer set extends it).
    _, all_captions, all_scenes = shapes.generate(400, 32, seed=1, split="test")
    kept = [c for c, s in zip(all_captions, all_scenes, strict=True)
            if shapes.colours_and_shapes_differ(s)]  # fmt: skip
    assert captions == kept[:50] and shapes.generate_binding(60, 32, seed=1)[1][:50] == captions
    assert not shapes.colours_and_shapes_differ(
        shapes.parse_caption("a small red circle on the left")
    )
