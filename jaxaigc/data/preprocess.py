"""Image preprocessing as grain transforms, and CLIP's train and eval recipes (Radford et al.).

Each op changes the ``image`` of a record dict and keeps the other fields. Resizing and cropping
work on uint8 ``(h, w, c)`` images, so they come before :class:`ToFloat`. :class:`RandomCrop` draws
from the generator grain derives from the sampler seed and the record's position, so a pipeline
restored from its state repeats the same crops. There are no flips: captions say "left of".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _crop(element: dict, key: str, size: int, y: int, x: int) -> dict:
    return {**element, key: element[key][y : y + size, x : x + size]}


def _check_fits(image: np.ndarray, size: int) -> None:
    if min(image.shape[:2]) < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of shape {image.shape}")


@dataclasses.dataclass(frozen=True)
class ToRGB(grain.transforms.Map):
    """Repeats a single grey channel three times; RGB images pass unchanged."""

    _: dataclasses.KW_ONLY
    key: str = "image"

    def map(self, element: dict) -> dict:
        image = element[self.key]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return {**element, self.key: image}


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
    """Resizes a uint8 image so its shorter side is ``size``, keeping the aspect ratio."""

    size: int
    _: dataclasses.KW_ONLY
    method: str = "bicubic"  # one of "nearest", "bilinear", "bicubic", "lanczos"
    key: str = "image"

    def map(self, element: dict) -> dict:
        image = element[self.key]
        h, w, c = image.shape
        # torchvision's rule (so OpenAI's CLIP transform is matched pixel for pixel): the long
        # side is int(size * long / short), truncated.
        short, long = min(h, w), max(h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        if (new_h, new_w) == (h, w):  # PIL would return a copy
            return element
        # PIL has no single-channel (h, w, 1) mode: resize the (h, w) plane.
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        resized = np.asarray(pil.resize((new_w, new_h), _RESAMPLE[self.method]))
        return {**element, self.key: resized.reshape(new_h, new_w, c)}


@dataclasses.dataclass(frozen=True)
class CenterCrop(grain.transforms.Map):
    """The central ``size x size`` window, placed as torchvision's ``CenterCrop`` places it."""

    size: int
    _: dataclasses.KW_ONLY
    key: str = "image"

    def map(self, element: dict) -> dict:
        image = element[self.key]
        _check_fits(image, self.size)
        h, w = image.shape[:2]
        # torchvision's offsets: int(round(...)) rounds halves to even, unlike // 2.
        top, left = int(round((h - self.size) / 2)), int(round((w - self.size) / 2))
        return _crop(element, self.key, self.size, top, left)


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """A uniformly placed ``size x size`` window."""

    size: int
    _: dataclasses.KW_ONLY
    key: str = "image"

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element[self.key]
        _check_fits(image, self.size)
        h, w = image.shape[:2]
        y, x = rng.integers(h - self.size + 1), rng.integers(w - self.size + 1)
        return _crop(element, self.key, self.size, int(y), int(x))


@dataclasses.dataclass(frozen=True)
class ToFloat(grain.transforms.Map):
    """uint8 ``[0, 255]`` to float32 ``[0, 1]``."""

    _: dataclasses.KW_ONLY
    key: str = "image"

    def map(self, element: dict) -> dict:
        return {**element, self.key: element[self.key].astype(np.float32) / 255.0}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """``(image - mean) / std`` per channel of a float image."""

    mean: tuple[float, ...] | float
    std: tuple[float, ...] | float
    _: dataclasses.KW_ONLY
    key: str = "image"

    def map(self, element: dict) -> dict:
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return {**element, self.key: (element[self.key] - mean) / std}


def clip_ops(
    resolution: int, *, train: bool, crop_fraction: float = 0.875, key: str = "image"
) -> list[Any]:
    """CLIP's preprocessing to float32 ``(resolution, resolution, 3)`` normalised images.

    Eval resizes the shorter side to ``resolution`` (bicubic) and takes the centre crop, as CLIP
    does. Train resizes to ``resolution / crop_fraction`` and takes a random crop, CLIP's only
    augmentation.
    """
    if train:
        ops = [Resize(round(resolution / crop_fraction), key=key), RandomCrop(resolution, key=key)]
    else:
        ops = [Resize(resolution, key=key), CenterCrop(resolution, key=key)]
    return [
        ToRGB(key=key),
        *ops,
        ToFloat(key=key),
        Normalize(CLIP_MEAN, CLIP_STD, key=key),
    ]
