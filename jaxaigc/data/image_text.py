"""Image-caption pairs for contrastive and text-to-image training: in-memory and TFDS sources,
their concatenation, and the caption-tokenising transform.

Every record is ``{"image": uint8 [h, w, c], "caption": str}``; sources have stable ``repr``s
so grain can check a restored iterator state against them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from jaxaigc.data import builders, shapes, wordnet

# Captions of the Fashion-MNIST *training* images. Zero-shot evaluation uses other templates
# (jaxaigc.evaluate.zero_shot.DEFAULT_TEMPLATES), so no evaluation prompt is ever a training
# caption.
FASHION_TRAIN_TEMPLATES = (
    "{}",
    "a {}",
    "a black and white photo of a {}.",
    "a small grey picture of a {}.",
    "a low resolution {}.",
)


class ArraySource:
    """Images [n, h, w, c] uint8 with one caption each, held in memory."""

    def __init__(self, images: np.ndarray, captions: Sequence[str], *, name: str):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions, self.name = images, list(captions), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, n={len(self)})"


def shapes_source(n: int, size: int, *, seed: int, split: str) -> ArraySource:
    """``n`` procedural scenes of ``split`` (see :mod:`jaxaigc.data.shapes`)."""
    images, captions, _ = shapes.generate(n, size, seed=seed, split=split)
    return ArraySource(images, captions, name=f"shapes/{size}/{split}/seed{seed}")


def _stable_choice(index: int, options: Sequence[str]) -> str:
    digest = hashlib.sha256(str(index).encode()).digest()
    return options[int.from_bytes(digest[:4], "little") % len(options)]


class CaptionedFashionMnist:
    """Fashion-MNIST with a caption per image from ``templates``, fixed by the record index."""

    def __init__(self, source: builders.Source, templates: Sequence[str]):
        self.source, self.templates = source, tuple(templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        template = _stable_choice(index, self.templates)
        caption = builders.fashion_mnist_prompt(int(record["label"]), template=template)
        return {"image": record["image"], "caption": caption}

    def __repr__(self) -> str:
        return f"CaptionedFashionMnist({self.source!r}, {self.templates!r})"


class Augmentable:
    """A source whose records :class:`CaptionTrueAugment` may change (``"augment": True``)."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        return {"image": record["image"], "caption": record["caption"], "augment": True}

    def __repr__(self) -> str:
        return f"Augmentable({self.source!r})"


# A mirror image falsifies a caption containing these (leftwards, left-pointing, clockwise, ...).
DIRECTION_PARTS = ("left", "right", "clockwise")


@dataclasses.dataclass(frozen=True)
class CaptionTrueAugment(grain.transforms.RandomMap):
    """Random changes that keep a caption true, applied to records marked ``augment``.

    A crop of a random fraction of the area in ``[crop_scale, 1]`` resized back, then shrunk by
    a factor in ``[shrink, 1]`` onto the colour of its corner at a random place; a mirror image
    unless the caption names a direction; greyscale with probability ``greyscale`` unless it
    names a colour; with probability ``style`` one drawing-style change that keeps hues
    (:data:`STYLES`: fewer shades, dark outlines, blur, contrast); with probability ``gloss``
    the caption followed by the WordNet definition of the name or of one of its words
    (:func:`wordnet.name_definitions`; "dog face: a member of the genus Canis ...", which ties
    the definition's words to the image), else each caption word dropped with probability
    ``word_dropout`` (at least one kept: a looser description, not always a true one, e.g. "no
    entry" -> "entry"). Unmarked records (shapes: their captions name positions, sizes and
    colours) pass unchanged; the mark is removed.
    """

    crop_scale: float = 0.5
    shrink: float = 1.0
    flip: bool = True
    greyscale: float = 0.2
    style: float = 0.0
    word_dropout: float = 0.0
    gloss: float = 0.0

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image, caption = element["image"], element["caption"]
        if not element.get("augment", False):
            return {"image": image, "caption": caption}
        words = caption.split()
        h, w = image.shape[:2]
        area = rng.uniform(self.crop_scale, 1.0)
        side_h, side_w = max(1, round(h * area**0.5)), max(1, round(w * area**0.5))
        y, x = int(rng.integers(h - side_h + 1)), int(rng.integers(w - side_w + 1))
        crop = image[y : y + side_h, x : x + side_w]
        grey_image = crop.shape[-1] == 1
        pil = Image.fromarray(crop[..., 0] if grey_image else crop)
        image = np.asarray(pil.resize((w, h), Image.Resampling.BICUBIC)).reshape(h, w, -1)
        if self.shrink < 1:
            factor = rng.uniform(self.shrink, 1.0)
            small_h, small_w = max(1, round(h * factor)), max(1, round(w * factor))
            pil = Image.fromarray(image[..., 0] if grey_image else image)
            small = np.asarray(pil.resize((small_w, small_h), Image.Resampling.BICUBIC))
            y, x = int(rng.integers(h - small_h + 1)), int(rng.integers(w - small_w + 1))
            image = np.broadcast_to(image[:1, :1], image.shape).copy()
            image[y : y + small_h, x : x + small_w] = small.reshape(small_h, small_w, -1)
        directed = any(part in caption for part in DIRECTION_PARTS)
        if self.flip and rng.random() < 0.5 and not directed:
            image = image[:, ::-1]
        if (
            not grey_image
            and rng.random() < self.greyscale
            and not builders.COLOUR_WORDS.intersection(words)
        ):
            grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            image = np.repeat(grey.round().astype(np.uint8)[..., None], image.shape[-1], -1)
        if not grey_image and rng.random() < self.style:
            name = STYLES[int(rng.integers(len(STYLES)))]
            image = np.asarray(_restyle(Image.fromarray(np.ascontiguousarray(image)), name, rng))
        definitions = wordnet.name_definitions(caption) if self.gloss > 0 else ()
        if definitions and rng.random() < self.gloss:
            caption = f"{caption}: {definitions[int(rng.integers(len(definitions)))]}"
        elif self.word_dropout > 0 and len(words) > 1:
            kept = [word for word in words if rng.random() >= self.word_dropout]
            caption = " ".join(kept or [words[int(rng.integers(len(words)))]])
        return {"image": np.ascontiguousarray(image), "caption": caption}


# Drawing styles of the same picture (emoji fonts differ in shading, outlines and detail).
STYLES = ("posterize", "outline", "blur", "contrast")


def _restyle(image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image)
    if name == "posterize":  # flat colours: 3 to 5 levels per channel, white stays white
        step = 255 / int(rng.integers(2, 5))
        return Image.fromarray((np.round(pixels / step) * step).astype(np.uint8))
    if name == "outline":  # dark lines where the picture has edges (not at its border)
        edges = np.asarray(image.convert("L").filter(ImageFilter.FIND_EDGES)) > 64
        edges[[0, -1]], edges[:, [0, -1]] = False, False
        return Image.fromarray(np.where(edges[..., None], 0, pixels).astype(np.uint8))
    if name == "blur":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0)))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.5))


class Concatenate:
    """Records of several sources one after another, as one random-access source."""

    def __init__(self, sources: Sequence[Any]):
        if not sources:
            raise ValueError("Concatenate needs at least one source")
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        which = int(np.searchsorted(self.offsets, index, side="right")) - 1
        record = self.sources[which][index - int(self.offsets[which])]
        return {
            "image": record["image"],
            "caption": record["caption"],
            "augment": record.get("augment", False),
        }

    def __repr__(self) -> str:
        return f"Concatenate({self.sources!r})"


@dataclasses.dataclass(frozen=True)
class TextPairs(grain.transforms.RandomMap):
    """Adds a text pair drawn uniformly from ``pairs`` to each record, as token ids ``pair_a``
    and ``pair_b`` (int32 [context_length]): a text-only contrastive task carried by the image
    batches (``clip_loss_fn(text_pairs=...)``); image and tokens pass unchanged."""

    pairs: Sequence[tuple[str, str]] = dataclasses.field(repr=False)
    encode: Callable[..., np.ndarray]
    context_length: int

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        tokens = self.encode(list(pair), context_length=self.context_length, truncate=True)
        return {**element, "pair_a": tokens[0], "pair_b": tokens[1]}


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
    """Replaces ``caption`` with ``tokens`` int32 [context_length] (long captions truncated)."""

    encode: Callable[..., np.ndarray]
    context_length: int

    def map(self, element: dict) -> dict:
        tokens = self.encode(
            [element["caption"]], context_length=self.context_length, truncate=True
        )
        return {"image": element["image"], "tokens": np.asarray(tokens[0], np.int32)}
