"""Image grids as PNG: rows of images with an optional caption above each row, a title above each
column and a caption under each image, upscaled without smoothing so small images stay legible.

One writer for every grid of the experiments: samples per caption (DALL-E, unCLIP),
originals over reconstructions (dVAE) and captioned dataset previews.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (64, 64, 64)  # mid grey: both black and white images stand out against it
_TEXT = (255, 255, 255)
_FONT_SIZE = 12


def write_grid(
    path: str | Path,
    rows: Sequence[Sequence[np.ndarray]] | np.ndarray,
    *,
    captions: Sequence[str] | None = None,
    column_titles: Sequence[str] | None = None,
    cell_captions: Sequence[Sequence[str]] | None = None,
    scale: int = 1,
    pad: int = 4,
) -> Path:
    """Writes the images of ``rows`` as a PNG grid, row i left to right, and returns its path.

    Args:
      path: the PNG to write; its folder is created.
      rows: images per row, rows may differ in length: a nested sequence of images or an array
        [rows, columns, h, w(, c)]. An image is [h, w], [h, w, 1], [h, w, 3] or [h, w, 4] (alpha
        dropped), uint8 or float in [0, 1] (``pipelines.unclip.to_uint8`` maps [-1, 1] to uint8).
        Images of different sizes sit top-left in cells of the largest size.
      captions: one per row, word-wrapped above the row across the grid's width.
      column_titles: one per column, word-wrapped above the first row.
      cell_captions: one per image, nested like ``rows``, word-wrapped under the image.
      scale: integer nearest-neighbour upscaling, so every source pixel stays a square.
      pad: pixels of background around and between cells.
    """
    rows = [[_to_rgb(image) for image in row] for row in rows]
    _check(rows, captions, column_titles, cell_captions, scale, pad)
    columns = max(len(row) for row in rows)
    cell_h = scale * max(image.shape[0] for row in rows for image in row)
    cell_w = scale * max(image.shape[1] for row in rows for image in row)
    width = pad + columns * (cell_w + pad)

    font = ImageFont.load_default(size=_FONT_SIZE)
    line_h = font.getbbox("Ag")[3] + 2
    titles = [_wrap(t, font, cell_w) for t in column_titles] if column_titles else []
    labels = [_wrap(c, font, width - 2 * pad) for c in captions] if captions else [[]] * len(rows)
    under = [[_wrap(c, font, cell_w) for c in row] for row in cell_captions or [[]] * len(rows)]

    title_h = line_h * max((len(t) for t in titles), default=0)
    tops, y = [], pad + title_h
    for label, row_under in zip(labels, under, strict=True):
        tops.append(y + line_h * len(label))  # the row's images start under its caption
        y = tops[-1] + cell_h + line_h * max((len(c) for c in row_under), default=0) + pad
    grid = Image.new("RGB", (width, y), _BACKGROUND)
    draw = ImageDraw.Draw(grid)

    def lines(x: int, y: int, text: list[str]) -> None:
        for k, line in enumerate(text):
            draw.text((x, y + k * line_h), line, fill=_TEXT, font=font)

    for j, title in enumerate(titles):
        lines(pad + j * (cell_w + pad), pad, title)
    for i, (row, top) in enumerate(zip(rows, tops, strict=True)):
        lines(pad, top - line_h * len(labels[i]), labels[i])
        for j, image in enumerate(row):
            x = pad + j * (cell_w + pad)
            grid.paste(Image.fromarray(image.repeat(scale, 0).repeat(scale, 1)), (x, top))
            if under[i]:
                lines(x, top + cell_h, under[i][j])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide; a word wider than a
    line is broken between characters, so no text runs into the next cell."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if not lines[-1] or font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
        while font.getlength(lines[-1]) > width and len(lines[-1]) > 1:
            line = lines[-1]
            fits = (k for k in range(1, len(line)) if font.getlength(line[:k]) <= width)
            cut = max(fits, default=1)
            lines[-1:] = [line[:cut], line[cut:]]
    return lines if lines[0] else []


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """One image -> uint8 [h, w, 3]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image is [h, w] or [h, w, 1|3|4], got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.integer):
        image = np.clip(np.round(image * 255.0), 0, 255)
    image = image.astype(np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def _check(rows, captions, column_titles, cell_captions, scale, pad) -> None:
    if not rows or not all(rows):
        raise ValueError(f"every row needs an image; row lengths: {[len(r) for r in rows]}")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} rows: give one per row")
    columns = max(len(row) for row in rows)
    if column_titles is not None and len(column_titles) != columns:
        raise ValueError(f"{len(column_titles)} column titles for {columns} columns")
    if cell_captions is not None:
        got, want = [len(c) for c in cell_captions], [len(r) for r in rows]
        if got != want:
            raise ValueError(f"cell captions per row {got} differ from images per row {want}")
