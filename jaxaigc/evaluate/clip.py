"""The CLIP's evaluation: transfer to images and names it never trained on, each figure with its
chance level (Radford et al. 2021, section 3.1 zero-shot transfer).

On images never trained on except the first, a memorisation reference:

- The Noto emoji trained on, among all emoji names: how well the captions were learnt.
- Fashion-MNIST test by class prompts (templates not among the training captions), top-1 / top-5
  (chance 10% / 50%): *prompted classification of classes seen in training* when Fashion-MNIST
  is in the mix, zero-shot only when it is not.
- Emoji among all emoji names (those of Noto's train and test splits): held-out Noto emoji (new
  names; also the subset whose names use only words of trained names), and OpenMoji (another
  style, never trained on) for trained names (style shift only) and held-out names (new concept
  and new style).
- Shapes, compositional zero-shot: one-object test scenes of the held-out (colour, shape) pairs,
  classified among all colour-shape prompts (beside the seen pairs).
- Retrieval image<->caption, R@1 / R@5, on held-out emoji (test split) and on shapes test scenes.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.data import builders, image_text, shapes
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.evaluate import zero_shot
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.train.metrics import read_metrics

# The emoji training captions are the bare names; the shapes captions name a size.
EMOJI_TEMPLATES = ("{}",)
SHAPE_TEMPLATES = ("a small {}", "a large {}")
GUESSES = 3  # names shown under each example emoji
# Report key -> what its images are, and what its classes are called.
# The headline first (the demo's summary shows each stage's first figure).
CLASSIFIED = {
    "noto_held_out_names": ("held-out Noto emoji (zero-shot)", "names"),
    "fashion_mnist": ("Fashion-MNIST test", "classes"),
    "noto_trained_images": ("Noto emoji trained on (memorisation, not transfer)", "names"),
    "noto_held_out_names_of_trained_words": (
        "held-out Noto emoji named only with words of trained names",
        "names",
    ),
    "openmoji_trained_names": ("OpenMoji, trained names (style shift)", "names"),
    "openmoji_held_out_names": ("OpenMoji, held-out names (zero-shot)", "names"),
    "shapes_held_out_pairs": ("shapes, held-out colour-shape pairs (zero-shot)", "pairs"),
    "shapes_seen_pairs": ("shapes, seen colour-shape pairs", "pairs"),
}
RETRIEVED = {"emoji_test": "held-out Noto emoji", "shapes_test": "shapes test scenes"}


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", name.lower()))


def _images(source, ops, indices) -> np.ndarray:
    """The images of records ``indices`` after ``ops`` (deterministic transforms only)."""
    out = []
    for i in indices:
        record = source[i]
        for op in ops:
            record = op.map(record)
        out.append(record["image"])
    return np.stack(out)


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the CLIP trained in ``workdir``: :func:`transfer`'s accuracies and recalls
    as figures beside their chance levels, and a grid of held-out emoji with the model's
    guesses (written on process 0)."""
    workdir = Path(workdir)
    results, examples = transfer(load_clip(workdir, batch_size=config.eval.batch_size), config)
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    (first_step, first), (final_step, final) = losses[0], losses[-1]
    grid = "held_out_emoji.png"
    if jax.process_index() == 0:
        _write_examples(workdir / grid, examples)
    return {
        "title": "CLIP transfer to held-out emoji names, OpenMoji, shapes and Fashion-MNIST",
        "figures": [
            *_figures(results),
            {
                "name": f"training loss at step {final_step}",
                "value": final,
                "baseline": first,
                "baseline_name": f"step {first_step}",
                "unit": "",
            },
        ],
        "images": [
            {
                "path": grid,
                "caption": "held-out Noto emoji (names never trained on), each under its "
                f"name -> the model's top-{GUESSES} of all emoji names",
                "key": "zero_shot",
            }
        ],
        "first_logged_loss": {"step": first_step, "loss": first},
        "final_loss": {"step": final_step, "loss": final},
        **results,
        "held_out_examples": [
            {"name": name, "guesses": guesses}
            for name, guesses in zip(examples["names"], examples["guesses"], strict=True)
        ],
    }


def transfer(features: ClipFeatures, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """Zero-shot accuracies and retrieval recalls of a CLIP, each with its chance level.

    Returns:
      ``(results, examples)``: results per image set (the report's keys, see the module
      docstring); examples: the first ``config.eval.examples`` held-out Noto emoji as
      ``{"images": uint8 [n, 32, 32, 3], "names": [n], "guesses": [n][GUESSES]}``.
    """
    cfg, ev = features.config, config.eval
    ops = clip_ops(cfg.image_resolution, train=False)

    def accuracy(images, names, labels, templates) -> tuple[dict, np.ndarray]:
        """Top-1 / top-5 with their chance levels, and the cosines [n, len(names)]."""
        logits = features.encode_pixels(images) @ features.class_embeddings(names, templates).T
        top = zero_shot.topk_accuracy(logits, np.asarray(labels))
        return {**top, "chance_top1": 1 / len(names), "chance_top5": min(1, 5 / len(names))}, logits

    results = {}
    fashion = builders.load(
        "fashion_mnist", split="test", data_dir=config.data.data_dir, in_memory=True
    )
    n = min(ev.fashion_mnist, len(fashion))
    seen = bool(config.data.fashion_mnist)
    top, _ = accuracy(
        _images(fashion, ops, range(n)),
        builders.FASHION_MNIST_NAMES,
        [fashion[i]["label"] for i in range(n)],
        zero_shot.DEFAULT_TEMPLATES,
    )
    results["fashion_mnist"] = {
        **top,
        "classes_in_training": seen,
        "kind": "prompted classification of classes seen in training" if seen else "zero-shot",
        "n": n,
    }

    # Emoji among every name of both Noto splits.
    noto = {
        s: builders.load(
            "emoji", split=s, data_dir=config.data.data_dir, resolution=32, in_memory=True
        )
        for s in ("train", "test")
    }
    split_names = {s: [src[i]["caption"] for i in range(len(src))] for s, src in noto.items()}
    names = split_names["train"] + split_names["test"]
    label = {name: i for i, name in enumerate(names)}
    held_out = set(split_names["test"])
    trained_words = {w for name in split_names["train"] for w in _words(name)}
    openmoji = tuple(
        builders.load(
            "openmoji", split=s, data_dir=config.data.data_dir, resolution=32, in_memory=True
        )
        for s in ("test", "train")
    )
    emoji_sets = {
        "noto_trained_images": [(noto["train"], i) for i in range(len(noto["train"]))],
        "noto_held_out_names": [(noto["test"], i) for i in range(len(noto["test"]))],
        # Held-out names made only of words that training names have: new combinations of known
        # words. A name with a word no caption has (most held-out names) names a concept
        # these captions never taught.
        "noto_held_out_names_of_trained_words": [
            (noto["test"], i)
            for i in range(len(noto["test"]))
            if _words(noto["test"][i]["caption"]) <= trained_words
        ],
        "openmoji_trained_names": [
            (src, i)
            for src in openmoji
            for i in range(len(src))
            if src[i]["caption"] in label and src[i]["caption"] not in held_out
        ],
        "openmoji_held_out_names": [
            (src, i) for src in openmoji for i in range(len(src)) if src[i]["caption"] in held_out
        ],
    }
    logits = {}
    for key, records in emoji_sets.items():
        images = np.stack([_images(src, ops, [i])[0] for src, i in records])
        labels = [label[src[i]["caption"]] for src, i in records]
        top, logits[key] = accuracy(images, names, labels, EMOJI_TEMPLATES)
        results[key] = {**top, "n": len(records)}
    shown = emoji_sets["noto_held_out_names"][: ev.examples]
    ranked = np.argsort(-logits["noto_held_out_names"], axis=1, kind="stable")[:, :GUESSES]
    examples = {
        "images": [src[i]["image"] for src, i in shown],
        "names": [src[i]["caption"] for src, i in shown],
        "guesses": [[names[j] for j in row] for row in ranked[: len(shown)]],
    }

    # One-object test scenes, held-out and seen (colour, shape) pairs, among all 40 pairs.
    pair_names = [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    images, _, scenes = shapes.generate(
        ev.shape_scenes, cfg.image_resolution, seed=config.seed, split="test"
    )
    singles = [(i, sc.objects[0]) for i, sc in enumerate(scenes) if len(sc.objects) == 1]
    for key, want in (("shapes_held_out_pairs", True), ("shapes_seen_pairs", False)):
        chosen = [(i, o) for i, o in singles if ((o.colour, o.shape) in shapes.HELD_OUT) == want]
        top, _ = accuracy(
            _images(
                image_text.ArraySource(images, [""] * len(images), name="eval"),
                ops,
                [i for i, _ in chosen],
            ),
            pair_names,
            [pair_names.index(f"{o.colour} {o.shape}") for _, o in chosen],
            SHAPE_TEMPLATES,
        )
        results[key] = {**top, "n": len(chosen)}

    pairs = {
        "emoji_test": noto["test"],
        "shapes_test": image_text.shapes_source(
            ev.shapes, cfg.image_resolution, seed=config.seed, split="test"
        ),
    }
    for key, source in pairs.items():
        images = _images(source, ops, range(len(source)))
        captions = [source[i]["caption"] for i in range(len(source))]
        recall = zero_shot.retrieval_recall(
            features.encode_pixels(images), features.encode_text(captions), ks=(1, 5)
        )
        results[key] = {
            **recall,
            "chance_R@1": 1 / len(source),
            "chance_R@5": 5 / len(source),
            "n": len(source),
        }
    return results, examples


def _write_examples(path: Path, examples: dict, *, columns: int = 8) -> None:
    """``examples`` (from :func:`transfer`) as a grid, each emoji over its name and guesses."""
    captions = [
        f"{name} -> {' / '.join(guesses)}"
        for name, guesses in zip(examples["names"], examples["guesses"], strict=True)
    ]
    rows = range(0, len(captions), columns)
    write_grid(
        path,
        [examples["images"][i : i + columns] for i in rows],
        cell_captions=[captions[i : i + columns] for i in rows],
        scale=4,
    )


def _figures(results: dict) -> list[dict]:
    """Every top-k accuracy and retrieval recall of ``results`` beside its chance level."""
    figures = []
    for key, (images, kind) in CLASSIFIED.items():
        r = results[key]
        if key == "fashion_mnist":
            images = f"{images}, {r['kind']}"
        classes = round(1 / r["chance_top1"])
        for k in (5, 1):
            figures.append(
                {
                    "name": f"{images}: top-{k} of {classes:,} {kind} (n={r['n']:,})",
                    "value": r[f"top{k}"],
                    "baseline": r[f"chance_top{k}"],
                    "baseline_name": "chance",
                    "unit": "%",
                }
            )
    for key, images in RETRIEVED.items():
        r = results[key]
        for direction in ("image_to_text", "text_to_image"):
            for k in (1, 5):
                figures.append(
                    {
                        "name": f"{images}: {direction.replace('_', '-')} R@{k} among "
                        f"{r['n']:,} pairs",
                        "value": r[f"{direction}_R@{k}"],
                        "baseline": r[f"chance_R@{k}"],
                        "baseline_name": "chance",
                        "unit": "%",
                    }
                )
    return figures
