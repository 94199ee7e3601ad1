"""Writes one captioned PNG grid per image dataset (shapes, the emoji styles, fashion_mnist) to
look at them.

Small images are upscaled without smoothing so pixels and captions stay legible. Emoji and
Fashion-MNIST are built on first use (see ``jaxaigc.data.builders``).

    python -m jaxaigc.data.preview --out_dir runs/preview --size 64 --n 24
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from jaxaigc.data import builders, shapes
from jaxaigc.evaluate.grids import write_grid

EMOJI = ("emoji", "openmoji", "symbola", "emojione")  # one builder per drawing style
COLUMNS = 8
MIN_SIDE = 128  # upscale images smaller than this


def examples(name: str, n: int, size: int, data_dir: str | None) -> tuple[list, list[str]]:
    """The first ``n`` training images (uint8 ``(h, w, c)``) of ``name`` with their captions."""
    if name == "shapes":
        images, captions, _ = shapes.generate(n, size, seed=0)
        return list(images), captions
    config = {"resolution": size} if name in EMOJI else {}
    source = builders.load(name, split="train", data_dir=data_dir, **config)
    records = [source[i] for i in range(n)]
    return [r["image"] for r in records], [r["caption"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="runs/preview", help="where the grids are written")
    parser.add_argument("--size", type=int, default=64, help="side of shapes and emoji images")
    parser.add_argument("--n", type=int, default=24, help="images per grid")
    parser.add_argument("--data_dir", help="built datasets; default: $JAXAIGC_DATA_DIR")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    for name in ("shapes", *EMOJI, "fashion_mnist"):
        images, captions = examples(name, args.n, args.size, args.data_dir)
        rows = [images[i : i + COLUMNS] for i in range(0, len(images), COLUMNS)]
        cell_captions = [captions[i : i + COLUMNS] for i in range(0, len(captions), COLUMNS)]
        scale = max(1, math.ceil(MIN_SIDE / images[0].shape[0]))
        path = write_grid(out_dir / f"{name}.png", rows, cell_captions=cell_captions, scale=scale)
        print(f"{name:<14} {path}")


if __name__ == "__main__":
    main()
