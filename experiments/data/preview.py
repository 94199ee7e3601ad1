"""Writes one captioned PNG grid per image dataset (shapes, the emoji styles, fashion_mnist) to
eyeball them.

Small images are upscaled without smoothing so pixels and captions stay legible. Emoji and
Fashion-MNIST are built on first use (see ``jaxaigc.data.builders``).

    python experiments/data/preview.py --out_dir /tmp/preview --size 64 --n 24
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

from jaxaigc.data import builders, shapes

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/preview", "Where the PNG grids are written.")
_SIZE = flags.DEFINE_integer("size", 64, "Side of shapes and emoji images (emoji: 16/32/64/128).")
_N = flags.DEFINE_integer("n", 24, "Images per grid.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built datasets; default: $JAXAIGC_DATA_DIR.")

_COLUMNS = 8
_EMOJI = ("emoji", "openmoji", "symbola", "emojione")  # one builder per drawing style
_MIN_SIDE = 128  # upscale images smaller than this
_PAD = 6


def examples(name: str, n: int, size: int, data_dir: str | None) -> tuple[list, list[str]]:
    """The first ``n`` training images (uint8 ``(h, w, c)``) of ``name`` with their captions."""
    if name == "shapes":
        images, captions, _ = shapes.generate(n, size, seed=0)
        return list(images), captions
    config = {"resolution": size} if name in _EMOJI else {}
    source = builders.load(name, split="train", data_dir=data_dir, **config)
    records = [source[i] for i in range(n)]
    return [r["image"] for r in records], [r["caption"] for r in records]


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def caption_grid(images: list[np.ndarray], captions: list[str]) -> Image.Image:
    """Images in rows of ``_COLUMNS``, each with its wrapped caption underneath."""
    h, w = images[0].shape[:2]
    scale = max(1, math.ceil(_MIN_SIDE / h))  # integer scale keeps pixels square
    side = w * scale
    font = ImageFont.load_default(size=13)
    wrapped = [wrap(c, font, side) for c in captions]
    line_height = font.getbbox("Ag")[3] + 2
    cell_w = side + 2 * _PAD
    cell_h = h * scale + 2 * _PAD + line_height * max(map(len, wrapped))
    rows = math.ceil(len(images) / _COLUMNS)
    grid = Image.new("RGB", (cell_w * min(len(images), _COLUMNS), cell_h * rows), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % _COLUMNS) * cell_w + _PAD, (i // _COLUMNS) * cell_h + _PAD
        tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        grid.paste(tile.resize((side, h * scale), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + h * scale + 2 + j * line_height), line, fill="black", font=font)
    return grid


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out_dir = Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("shapes", *_EMOJI, "fashion_mnist"):
        images, captions = examples(name, _N.value, _SIZE.value, _DATA_DIR.value)
        path = out_dir / f"{name}.png"
        caption_grid(images, captions).save(path)
        print(f"{name:<14} {path}")


if __name__ == "__main__":
    app.run(main)
