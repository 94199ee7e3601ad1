"""DALL-E on shapes scenes: the sparse transformer trained on caption and dVAE tokens, then text ->
image with CLIP reranking, judged by the scene parser.

Needs a trained dVAE and CLIP (the demo's ``dvae`` and ``clip`` stages, or their scripts):

    python experiments/dalle/train_dalle.py --workdir runs/dalle \
        --config.dvae_workdir=runs/demo/dvae --config.clip_workdir=runs/demo/clip

Evaluation on test-split captions the model never trained on, half of them naming a (colour,
shape) pair that never occurs in training. For each caption ``candidates`` images are drawn;
the judge (:func:`jaxaigc.data.shapes.check`) scores a single sample (the mean over all
candidates), CLIP's best of N, and whether any candidate is right (the ceiling of reranking).
Attribute binding on two-object captions: both (colour, shape) objects present, and how often
the two colours come out swapped. ``samples.png`` shows each caption's candidates, CLIP's choice
first.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from jaxaigc.cli import run_experiment
from jaxaigc.data import shapes
from jaxaigc.pipelines import dalle
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = dalle.get_config()
    config.eval = ml_collections.ConfigDict(
        dict(captions=200, batch_captions=50, grid_captions=12, grid_candidates=8)
    )
    return config


def _rates(verdicts: list[dict], key: str) -> float | None:
    values = [v[key] for v in verdicts if key in v]
    return float(np.mean(values)) if values else None


def write_samples(path: Path, images: np.ndarray, captions: list[str], *, scale: int = 3) -> None:
    """A PNG with one row per caption: the caption, then its candidates (CLIP's choice first)."""
    rows, columns, side = images.shape[0], images.shape[1], images.shape[2] * scale
    pad, label = 4, 12
    grid = Image.new(
        "RGB", (columns * (side + pad) + pad, rows * (side + pad + label) + pad), (64, 64, 64)
    )
    draw = ImageDraw.Draw(grid)
    for i in range(rows):
        y = pad + i * (side + pad + label)
        draw.text((pad, y), captions[i], fill=(255, 255, 255))
        for j in range(columns):
            tile = Image.fromarray(images[i, j]).resize((side, side), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + j * (side + pad), y + label))
    grid.save(path)


def evaluate(model, params, pairs, dvae, reranker, config) -> tuple[dict, np.ndarray, list]:
    """Judged text -> image figures on the test captions; returns the report, the reranked images
    of the grid's captions and those captions."""
    ev, sc = config.eval, config.sample
    test = pairs.splits["test"]
    records = [test[i] for i in range(min(ev.captions, len(test)))]
    groups = {"all": [], "seen": [], "held_out": []}
    grid_images, grid_captions = [], []
    for start in range(0, len(records), ev.batch_captions):
        batch = records[start : start + ev.batch_captions]
        captions = [str(r["caption"]) for r in batch]
        out = dalle.generate(
            model,
            params,
            np.stack([r["text"] for r in batch]),
            captions,
            dvae=dvae,
            reranker=reranker,
            candidates=sc.candidates,
            rng=jax.random.fold_in(jax.random.key(config.seed), start),
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
        )
        for record, caption, images in zip(batch, captions, out["images"], strict=True):
            verdicts = [shapes.verdict(image, caption) for image in images]
            entry = {
                "single": float(np.mean([v["correct"] for v in verdicts])),
                "best": verdicts[0],  # CLIP's choice
                "any": any(v["correct"] for v in verdicts),
                "samples": verdicts,
            }
            groups["all"].append(entry)
            groups["held_out" if record["held_out"] else "seen"].append(entry)
        if len(grid_captions) < ev.grid_captions:
            take = ev.grid_captions - len(grid_captions)
            grid_images.append(out["images"][:take, : ev.grid_candidates])
            grid_captions += captions[:take]

    report = {}
    for name, entries in groups.items():
        best = [e["best"] for e in entries]
        samples = [v for e in entries for v in e["samples"]]
        report[name] = {
            "captions": len(entries),
            "single_sample_accuracy": float(np.mean([e["single"] for e in entries])),
            "best_of_n_accuracy": _rates(best, "correct"),
            "any_of_n_accuracy": float(np.mean([e["any"] for e in entries])),
            "two_object_binding_best_of_n": _rates(best, "bound"),
            "two_object_swapped_best_of_n": _rates(best, "swapped"),
            "two_object_binding_single_sample": _rates(samples, "bound"),
            "two_object_swapped_single_sample": _rates(samples, "swapped"),
        }
    report["candidates"] = sc.candidates
    return report, np.concatenate(grid_images), grid_captions


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from ``workdir``), generates for the test captions, writes the report."""
    workdir = Path(workdir)
    model, task, batches, pairs, dvae_model = dalle.build(config)
    if config.clip_workdir is None:
        raise ValueError("config.clip_workdir is required: the CLIP run that reranks samples")
    state = train(task, batches, config, workdir)
    reranker = dalle.load_reranker(config.clip_workdir)
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    scores, images, captions = evaluate(
        model.config, state.eval_params, pairs, dvae_model, reranker, config
    )
    report = {
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {
            "step": last["step"],
            "loss": last["train/loss"],
            "image_nll": last["train/image_nll"],
            "text_nll": last["train/text_nll"],
        },
        **scores,
    }
    if jax.process_index() != 0:  # every process evaluates; process 0 reports
        return report
    write_samples(workdir / "samples.png", images, captions)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"loss {first['train/loss']:.3f} (step {first['step']}) -> {last['train/loss']:.3f} "
        f"(step {last['step']}); image NLL {last['train/image_nll']:.3f} nats/token"
    )
    for name in ("all", "seen", "held_out"):
        r = report[name]
        print(
            f"  {name} test captions ({r['captions']}): single sample "
            f"{r['single_sample_accuracy']:.1%}, "
            f"CLIP best of {config.sample.candidates} {r['best_of_n_accuracy']:.1%}, any of "
            f"{config.sample.candidates} {r['any_of_n_accuracy']:.1%}; two objects bound "
            f"{r['two_object_binding_best_of_n']:.1%} (colours swapped "
            f"{r['two_object_swapped_best_of_n']:.1%})"
        )
    print(f"  samples: {workdir / 'samples.png'}")
    return report


def summary(report: dict) -> str:
    """One line for the demo's closing summary."""
    r, held = report["all"], report["held_out"]
    return (
        f"test captions: judge accepts {r['single_sample_accuracy']:.1%} of single samples, "
        f"{r['best_of_n_accuracy']:.1%} of CLIP's best of {report['candidates']} "
        f"(held-out colour-shape pairs {held['best_of_n_accuracy']:.1%}); two-object binding "
        f"{r['two_object_binding_best_of_n']:.1%}"
    )


if __name__ == "__main__":
    run_experiment(run, get_config())
