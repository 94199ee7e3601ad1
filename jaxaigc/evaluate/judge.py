"""The text -> image judge shared by DALL-E and unCLIP: :mod:`jaxaigc.data.shapes` parses each
generated image back into a scene and compares it with the caption's scene, so a generator is
scored exactly, over all captions and apart for those naming a (colour, shape) pair that training
never shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxaigc.data import shapes

GROUPS = ("all", "seen", "held_out")


def names_held_out(caption: str, held_out=shapes.HELD_OUT) -> bool:
    """Whether ``caption`` names a (colour, shape) pair of ``held_out``."""
    return any((o.colour, o.shape) in held_out for o in shapes.parse_caption(caption).objects)


def rates(
    images: np.ndarray,
    captions: Sequence[str],
    *,
    held_out=shapes.HELD_OUT,
    attributes: bool = False,
) -> dict[str, dict[str, float | int | None]]:
    """The judge's rates of text -> image samples, per group of captions.

    Each rate is a fraction of the samples it applies to (None when none does). Chance: the rate
    of each caption against another scene's true image (``np.roll(true_images, 1, axis=0)``),
    measured on 2,000 test scenes at 32 px:

    - ``accuracy``: samples :func:`shapes.check` accepts (the whole scene: objects, sizes, places,
      relation). Chance 0.6%.
    - ``any_accuracy``: captions with at least one accepted sample, the ceiling of reranking
      the k samples; equals ``accuracy`` for k = 1. Chance 1 - 0.994^k (9% for k = 16).
    - ``binding``: two-object captions' samples drawing both (colour, shape) objects, whatever
      their sizes and places. Chance 0.1%.
    - ``swapped``: two-object captions' samples drawing the two shapes with each other's
      colours. Chance 0.0%.
    - with ``attributes`` (:func:`shapes.attributes`, each judged on its own): ``count`` 50.9%,
      ``colours`` 7.1%, ``shapes`` 9.5%, ``sizes`` 24.6% and, over one-object captions,
      ``position`` 11.3% at chance.

    Args:
      images: uint8 [n, H, W, 3], or [n, k, H, W, 3] for k samples of each caption.
      captions: the n captions (the templates of :func:`shapes.caption`).
      held_out: the (colour, shape) pairs kept out of training.
      attributes: also the attribute rates (parses every sample a second time).

    Returns:
      ``{"all" | "seen" | "held_out": {"captions", "samples", rate name: rate}}``: all captions,
      those naming no pair of ``held_out`` and those naming one.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, None]
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} rows of images for {len(captions)} captions")
    held_out = frozenset(held_out)
    groups = {name: [] for name in GROUPS}
    for samples, caption in zip(images, captions, strict=True):
        verdicts = [shapes.verdict(image, caption) for image in samples]
        if attributes:
            for verdict, image in zip(verdicts, samples, strict=True):
                verdict.update(shapes.attributes(image, caption))
        groups["all"].append(verdicts)
        groups["held_out" if names_held_out(caption, held_out) else "seen"].append(verdicts)

    out = {}
    for group, per_caption in groups.items():
        flat = [v for verdicts in per_caption for v in verdicts]
        out[group] = {
            "captions": len(per_caption),
            "samples": len(flat),
            "accuracy": _rate(flat, "correct"),
            "any_accuracy": _rate(
                [{"any": any(v["correct"] for v in vs)} for vs in per_caption], "any"
            ),
            "binding": _rate(flat, "bound"),
            "swapped": _rate(flat, "swapped"),
        }
        if attributes:
            out[group] |= {name: _rate(flat, name) for name in shapes.ATTRIBUTES}
    return out


def _rate(verdicts: list[dict], key: str) -> float | None:
    """The fraction of the ``verdicts`` holding ``key`` where it is true."""
    values = [v[key] for v in verdicts if key in v]
    return float(np.mean(values)) if values else None
