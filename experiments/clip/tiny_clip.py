"""A small CLIP trained on CPU on the embedded image-caption data, then scored zero-shot.

The model and training mix are :mod:`jaxaigc.pipelines.clip` (shapes scenes, Noto emoji and
Fashion-MNIST training images with caption templates). Evaluation, all on data never trained on:

- Fashion-MNIST test, zero-shot: classes are represented only by prompts built from the class
  names with templates that are not among the training captions; top-1 / top-5 (chance 10% / 50%).
- Retrieval image<->caption, R@1 / R@5, on held-out emoji (test split) and on shapes test scenes.

    python experiments/clip/tiny_clip.py --workdir runs/clip --config.train.steps=1000
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np

from jaxaigc import zero_shot
from jaxaigc.cli import run_experiment
from jaxaigc.compile_options import jit_inference
from jaxaigc.data import builders, image_text
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.pipelines import clip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = clip.get_config()
    config.train.steps = 1000
    config.train.log_every = 25
    config.train.checkpoint_every = 250
    config.eval = ml_collections.ConfigDict(
        dict(fashion_mnist=10_000, shapes=1_000, batch_size=500)
    )
    return config


def _images(source, ops, n: int) -> np.ndarray:
    """The first ``n`` records' images after ``ops`` (deterministic transforms only)."""
    out = []
    for i in range(min(n, len(source))):
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
        return np.concatenate(
            [
                np.asarray(fn(array[i : i + ev.batch_size]))
                for i in range(0, len(array), ev.batch_size)
            ]
        )

    def tokenize(texts):
        return tokenizer.encode(texts, context_length=cfg.context_length, truncate=True)

    results = {}
    fashion = builders.load("fashion_mnist", split="test", data_dir=config.data.data_dir)
    n = min(ev.fashion_mnist, len(fashion))
    labels = np.array([fashion[i]["label"] for i in range(n)])
    weights = zero_shot.class_weights(
        lambda t: embed(encode_text, t), tokenize, builders.FASHION_MNIST_NAMES
    )
    accuracy = zero_shot.classify(embed(encode_image, _images(fashion, ops, n)), weights, labels)
    results["fashion_mnist_zero_shot"] = {
        **accuracy,
        "chance_top1": 0.1,
        "chance_top5": 0.5,
        "n": n,
    }

    pairs = {
        "emoji_test": builders.load(
            "emoji", split="test", data_dir=config.data.data_dir, resolution=32
        ),
        "shapes_test": image_text.shapes_source(
            ev.shapes, cfg.image_resolution, seed=config.seed, split="test"
        ),
    }
    for name, source in pairs.items():
        images = _images(source, ops, len(source))
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


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, writes the report."""
    workdir = Path(workdir)
    model, task, batches, tokenizer = clip.build(config)
    state = train(task, batches, config, workdir)
    variables = state.eval_variables  # with EMA, the averaged weights and BatchNorm statistics
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    report = {
        "first_logged_loss": {"step": losses[0][0], "loss": losses[0][1]},
        "final_loss": {"step": losses[-1][0], "loss": losses[-1][1]},
        **evaluate(model, variables, tokenizer, config),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    zs = report["fashion_mnist_zero_shot"]
    print(
        f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
        f"(step {losses[-1][0]}); Fashion-MNIST zero-shot top-1 {zs['top1']:.1%} "
        f"(chance 10%), top-5 {zs['top5']:.1%}"
    )
    for name in ("emoji_test", "shapes_test"):
        r = report[name]
        print(
            f"  {name}: image->text R@1 {r['image_to_text_R@1']:.1%} R@5 "
            f"{r['image_to_text_R@5']:.1%}, text->image R@1 {r['text_to_image_R@1']:.1%} "
            f"(chance R@1 {r['chance_R@1']:.1%}, n={r['n']})"
        )
    return report


if __name__ == "__main__":
    run_experiment(run, get_config())
