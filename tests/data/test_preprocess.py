import numpy as np
import pytest
from PIL import Image

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


def _openai_clip_transform(image: np.ndarray, size: int) -> np.ndarray:
    """``clip.load``'s transform written out with torchvision's formulas (torchvision does not
    import beside this torch): Resize(size, BICUBIC) -> CenterCrop(size) -> RGB -> ToTensor ->
    Normalize."""
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)  # torchvision _compute_resized_output_size
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))  # torchvision center_crop
    left = int(round((new_w - size) / 2.0))
    pil = pil.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(pil, np.float32) / 255.0
    return (x - np.array(preprocess.CLIP_MEAN, np.float32)) / np.array(
        preprocess.CLIP_STD, np.float32
    )


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [
        (37, 23, 13),
        (23, 37, 13),
        (61, 45, 16),
        (45, 61, 16),
        (50, 33, 15),
        (33, 33, 9),
        (80, 31, 24),
        (24, 40, 24),  # already the size: no resampling
        (31, 31, 31),
    ],
)
def test_eval_ops_equal_openai_clip_transform_on_odd_sizes(h, w, size):
    rng = np.random.default_rng(h * w + size)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = apply(preprocess.clip_ops(size, train=False), {"image": image})["image"]
    np.testing.assert_array_equal(out, _openai_clip_transform(image, size))


def test_center_crop_offsets_round_halves_to_even_as_torchvision():
    # (h - size) / 2 = 1.5 -> 2 (// 2 would give 1); 2.5 -> 2; 0.5 -> 0.
    for h, top in [(7, 2), (9, 2), (5, 0)]:
        image = grid(h, h)
        out = preprocess.CenterCrop(4).map({"image": image})["image"]
        np.testing.assert_array_equal(out, image[top : top + 4, top : top + 4])
