"""A CLIP trained on your pairs, judged on held-out pairs (``config.data.eval_source``, its first
``config.eval.pairs`` readable records): image->text and text->image recall at 1, 5 and 10 among
them, beside chance (k / n), as Radford et al. 2021 report COCO and Flickr30k retrieval."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from jaxaigc.data import shards
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.evaluate import zero_shot
from jaxaigc.pipelines.clip import load_clip
from jaxaigc.train.metrics import read_metrics

KS = (1, 5, 10)


def held_out_pairs(spec: str, n: int, resolution: int) -> tuple[np.ndarray, list[str], int]:
    """The first ``n`` readable pairs of ``spec`` as CLIP's evaluation preprocesses them:
    ``(pixels float32 [n, r, r, 3], captions, skipped)``."""
    source = shards.image_text_source(spec)
    records, skipped = shards.head(source, n, clip_ops(resolution, train=False))
    captions = [r["caption"] for r in records]
    if len(captions) < 2:
        raise ValueError(f"{spec} has {len(captions)} readable pairs; retrieval needs 2 or more")
    return np.stack([r["image"] for r in records]), captions, skipped


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Retrieval recalls on ``config.data.eval_source`` beside chance, and the training loss."""
    workdir = Path(workdir)
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    (first_step, first), (final_step, final) = losses[0], losses[-1]
    figures, details = [], {}
    if config.data.eval_source:
        features = load_clip(workdir, batch_size=config.eval.batch_size)
        pixels, captions, skipped = held_out_pairs(
            config.data.eval_source, config.eval.pairs, features.image_size
        )
        n = len(captions)
        recalls = zero_shot.retrieval_recall(
            features.encode_pixels(pixels), features.encode_text(captions), KS
        )
        details = dict(eval_source=config.data.eval_source, pairs=n, skipped=skipped, **recalls)
        for direction in ("image_to_text", "text_to_image"):
            for k in KS:
                figures.append(
                    {
                        "name": f"held-out pairs: {direction.replace('_', '-')} R@{k} among {n:,}",
                        "value": recalls[f"{direction}_R@{k}"],
                        "baseline": min(k / n, 1.0),
                        "baseline_name": "chance",
                        "unit": "%",
                    }
                )
    figures.append(
        {
            "name": f"training loss at step {final_step}",
            "value": final,
            "baseline": first,
            "baseline_name": f"step {first_step}",
        }
    )
    title = "SigLIP" if config.loss == "sigmoid" else "CLIP"
    return {
        "title": f"{title} on your pairs: retrieval on held-out pairs",
        "figures": figures,
        "first_logged_loss": {"step": first_step, "loss": first},
        "final_loss": {"step": final_step, "loss": final},
        **details,
    }
