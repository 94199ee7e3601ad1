"""A small CLIP trained on CPU on the embedded image-caption data, then scored on transfer.

The model and training mix are :mod:`jaxaigc.pipelines.clip`: shapes scenes, Noto emoji and the
same names drawn by Symbola, with caption-true augmentation; Fashion-MNIST training images join
with ``--config.data.fashion_mnist=True``. Evaluation, each figure with its chance level, on
images never trained on except the first, a memorisation reference:

- The Noto emoji trained on, among all emoji names: how well the captions were learnt.
- Fashion-MNIST test by class prompts (templates not among the training captions), top-1 / top-5
  (chance 10% / 50%): *prompted classification of classes seen in training* when Fashion-MNIST
  is in the mix, zero-shot only when it is not.
- Emoji among all emoji names (the 1,361 of Noto's train and test splits): held-out Noto emoji
  (new names; also the subset whose names use only words of trained names), and OpenMoji
  (another style, never trained on) for trained names (style shift only) and held-out names
  (new concept and new style).
- Shapes, compositional zero-shot: one-object test scenes of the held-out (colour, shape) pairs,
  classified among all colour-shape prompts (beside the seen pairs).
- Retrieval image<->caption, R@1 / R@5, on held-out emoji (test split) and on shapes test scenes.

    python experiments/clip/tiny_clip.py --workdir runs/clip --config.train.steps=1000
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc import zero_shot
from jaxaigc.cli import run_experiment
from jaxaigc.compile_options import apply_in_batches, jit_inference
from jaxaigc.data import builders, image_text, shapes
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.models.clip import CLIPConfig
from jaxaigc.pipelines import clip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = clip.get_config()
    # The transfer recipe (BUILD_NOTES, "CLIP transfer"): no Fashion-MNIST (its figure is then
    # zero-shot), emoji weighed up and drawn in a second style, caption-true augmentation, and a
    # small ModifiedResNet image tower, which learns the emoji twice as fast per step as tiny-vit's
    # and transfers better to held-out names and OpenMoji's style. 24 tokens hold the longest
    # caption (19), and a 64-wide text tower (at 128 its backward pass took most of a step) and
    # the faster input pipeline run 2,200 steps in the time 1,100 took: the demo's stage took
    # 222-248 s at 2,400 steps, depending on the day, over its 4 minutes on a slow one.
    model = CLIPConfig.from_name(
        "tiny-rn", context_length=24, vision_width=16, transformer_width=64
    )
    config.model = clip.model_fields(model)
    config.data.update(dict(fashion_mnist=False, emoji_repeats=16, symbola_repeats=16))
    config.data.augment.update(dict(enabled=True, word_dropout=0.2))
    config.train.steps = 2200
    config.train.log_every = 25
    config.train.checkpoint_every = 250
    config.eval = ml_collections.ConfigDict(
        dict(fashion_mnist=10_000, shapes=1_000, shape_scenes=2_000, batch_size=500)
    )
    return config


# The emoji training captions are the bare names; the shapes captions name a size.
EMOJI_TEMPLATES = ("{}",)
SHAPE_TEMPLATES = ("a small {}", "a large {}")


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


def evaluate(model, variables, tokenizer, config: ml_collections.ConfigDict) -> dict:
    """Zero-shot Fashion-MNIST accuracy and retrieval recall, each with its chance level."""
    cfg, ev = model.config, config.eval
    ops = clip_ops(cfg.image_resolution, train=False)
    encode_image = jit_inference(lambda x: model.apply(variables, x, method="encode_image"))
    encode_text = jit_inference(lambda t: model.apply(variables, t, method="encode_text"))

    def embed(fn, array):
        return apply_in_batches(fn, array, ev.batch_size)

    def tokenize(texts):
        return tokenizer.encode(texts, context_length=cfg.context_length, truncate=True)

    def accuracy(images, names, labels, templates) -> dict:
        weights = zero_shot.class_weights(
            encode_text, tokenize, names, templates, batch_size=ev.batch_size
        )
        top = zero_shot.classify(embed(encode_image, images), weights, np.asarray(labels))
        return {**top, "chance_top1": 1 / len(names), "chance_top5": min(1, 5 / len(names))}

    results = {}
    fashion = builders.load(
        "fashion_mnist", split="test", data_dir=config.data.data_dir, in_memory=True
    )
    n = min(ev.fashion_mnist, len(fashion))
    seen = bool(config.data.fashion_mnist)
    results["fashion_mnist"] = {
        **accuracy(
            _images(fashion, ops, range(n)),
            builders.FASHION_MNIST_NAMES,
            [fashion[i]["label"] for i in range(n)],
            zero_shot.DEFAULT_TEMPLATES,
        ),
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
    openmoji = (
        builders.load(
            "openmoji", split="test", data_dir=config.data.data_dir, resolution=32, in_memory=True
        ),
        builders.load(
            "openmoji", split="train", data_dir=config.data.data_dir, resolution=32, in_memory=True
        ),
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
    for key, records in emoji_sets.items():
        images = np.stack([_images(src, ops, [i])[0] for src, i in records])
        labels = [label[src[i]["caption"]] for src, i in records]
        results[key] = {**accuracy(images, names, labels, EMOJI_TEMPLATES), "n": len(records)}

    # One-object test scenes, held-out and seen (colour, shape) pairs, among all 40 pairs.
    pair_names = [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    images, _, scenes = shapes.generate(
        ev.shape_scenes, cfg.image_resolution, seed=config.seed, split="test"
    )
    singles = [(i, sc.objects[0]) for i, sc in enumerate(scenes) if len(sc.objects) == 1]
    for key, want in (("shapes_held_out_pairs", True), ("shapes_seen_pairs", False)):
        chosen = [(i, o) for i, o in singles if ((o.colour, o.shape) in shapes.HELD_OUT) == want]
        results[key] = {
            **accuracy(
                _images(
                    image_text.ArraySource(images, [""] * len(images), name="eval"),
                    ops,
                    [i for i, _ in chosen],
                ),
                pair_names,
                [pair_names.index(f"{o.colour} {o.shape}") for _, o in chosen],
                SHAPE_TEMPLATES,
            ),
            "n": len(chosen),
        }

    pairs = {
        "emoji_test": noto["test"],
        "shapes_test": image_text.shapes_source(
            ev.shapes, cfg.image_resolution, seed=config.seed, split="test"
        ),
    }
    for name, source in pairs.items():
        images = _images(source, ops, range(len(source)))
        texts = tokenize([source[i]["caption"] for i in range(len(source))])
        recall = zero_shot.retrieval_recall(
            embed(encode_image, images), embed(encode_text, texts), ks=(1, 5)
        )
        results[name] = {
            **recall,
            "chance_R@1": 1 / len(source),
            "chance_R@5": 5 / len(source),
            "n": len(source),
        }
    return results


def summary_lines(report: dict) -> list[str]:
    """One line per figure of :func:`evaluate`, each with its chance level."""

    def top(r: dict) -> str:
        return (
            f"top-1 {r['top1']:.1%} (chance {r['chance_top1']:.2%}), top-5 {r['top5']:.1%} "
            f"(chance {r['chance_top5']:.2%}), n={r['n']}"
        )

    fashion = report["fashion_mnist"]
    lines = [
        f"Fashion-MNIST, {fashion['kind']}: {top(fashion)}",
        f"Noto emoji trained on, among all names (memorisation, not transfer): "
        f"{top(report['noto_trained_images'])}",
        f"held-out Noto emoji among all names (zero-shot): {top(report['noto_held_out_names'])}",
        "  of which names made only of words of trained names: "
        f"{top(report['noto_held_out_names_of_trained_words'])}",
        f"OpenMoji, trained names (style shift): {top(report['openmoji_trained_names'])}",
        f"OpenMoji, held-out names (zero-shot): {top(report['openmoji_held_out_names'])}",
        f"shapes, held-out colour-shape pairs (zero-shot): {top(report['shapes_held_out_pairs'])}",
        f"shapes, seen pairs: {top(report['shapes_seen_pairs'])}",
    ]
    for name in ("emoji_test", "shapes_test"):
        r = report[name]
        lines.append(
            f"{name} retrieval: image->text R@1 {r['image_to_text_R@1']:.1%} R@5 "
            f"{r['image_to_text_R@5']:.1%}, text->image R@1 {r['text_to_image_R@1']:.1%} "
            f"(chance R@1 {r['chance_R@1']:.1%}, n={r['n']})"
        )
    return lines


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, writes the report."""
    workdir = Path(workdir)
    model, task, batches, tokenizer = clip.build(config)
    state = train(task, batches, config, workdir)
    # With EMA, the averaged weights and BatchNorm statistics. Evaluation closes over them, so
    # each process needs them whole on its own device (a run of several processes shards them).
    variables = jax.device_put(multihost_utils.process_allgather(state.eval_variables, tiled=True))
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    report = {
        "first_logged_loss": {"step": losses[0][0], "loss": losses[0][1]},
        "final_loss": {"step": losses[-1][0], "loss": losses[-1][1]},
        **evaluate(model, variables, tokenizer, config),
    }
    if jax.process_index() != 0:  # every process evaluates; process 0 reports
        return report
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
        f"(step {losses[-1][0]})"
    )
    for line in summary_lines(report):
        print("  " + line)
    return report


if __name__ == "__main__":
    run_experiment(run, get_config())
