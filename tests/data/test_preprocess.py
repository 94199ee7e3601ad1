import numpy as np
import pytest

from jaxaigc.data import preprocess
from jaxaigc.data.pipeline import BatchIterator


def apply(ops, element, seed=0):
    rng = np.random.default_rng(seed)
    for op in ops:
        element = op.random_map(element, rng) if hasattr(op, "random_map") else op.map(element)
    return element


def grid(h, w, c=1):
    """uint8 image whose pixels encode their position, so crops can be located."""
    y, x = np.mgrid[:h, :w]
    return np.repeat((y * w + x)[..., None] % 251, c, -1).astype(np.uint8)


def test_clip_normalisation_constants_and_output():
    assert preprocess.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert preprocess.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    grey = {"image": np.full((20, 30, 1), 128, np.uint8), "label": 3}
    out = apply(preprocess.clip_ops(16, train=False), grey)
    assert out["label"] == 3 and out["image"].shape == (16, 16, 3)
    assert out["image"].dtype == np.float32
    mean, std = np.array(preprocess.CLIP_MEAN), np.array(preprocess.CLIP_STD)
    expected = np.broadcast_to((128 / 255 - mean) / std, (16, 16, 3))
    np.testing.assert_allclose(out["image"], expected, rtol=1e-5)


def test_resize_keeps_the_aspect_ratio_and_channels():
    out = preprocess.Resize(16).map({"image": grid(20, 40)})["image"]
    assert out.shape == (16, 32, 1) and out.dtype == np.uint8
    rgb = preprocess.Resize(8, method="bilinear").map({"image": grid(40, 20, 3)})["image"]
    assert rgb.shape == (16, 8, 3)


def test_center_crop_takes_the_middle():
    image = grid(10, 12)
    out = preprocess.CenterCrop(4).map({"image": image})["image"]
    np.testing.assert_array_equal(out, image[3:7, 4:8])
    with pytest.raises(ValueError, match="cannot crop"):
        preprocess.CenterCrop(11).map({"image": image})


def test_random_crop_is_a_window_fixed_by_the_generator():
    image = grid(12, 12)
    crop = preprocess.RandomCrop(5)
    offsets = set()
    for seed in range(40):
        out = crop.random_map({"image": image}, np.random.default_rng(seed))["image"]
        again = crop.random_map({"image": image}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(out, again)
        y, x = divmod(int(out[0, 0, 0]), 12)
        np.testing.assert_array_equal(out, image[y : y + 5, x : x + 5])
        offsets.add((y, x))
    assert len(offsets) > 20 and max(max(o) for o in offsets) <= 7


def test_train_ops_draw_crops_from_the_pipeline_seed():
    source = [{"image": grid(28, 28), "label": i} for i in range(16)]

    def crops(seed):
        ops = preprocess.clip_ops(24, train=True)
        batch = next(BatchIterator(source, global_batch_size=16, seed=seed, operations=ops))
        assert batch["image"].shape == (16, 24, 24, 3)
        return batch["image"][np.argsort(batch["label"])]

    np.testing.assert_array_equal(crops(0), crops(0))
    assert not np.array_equal(crops(0), crops(1))
