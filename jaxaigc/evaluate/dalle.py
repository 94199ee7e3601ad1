"""DALL-E's evaluation: text -> image on test-split captions the model never trained on, half of
them naming a (colour, shape) pair that never occurs in training, judged by the scene parser
(:mod:`jaxaigc.evaluate.judge`).

For each caption ``config.sample.candidates`` images are drawn; the judge scores a single sample
(the mean over all candidates), CLIP's best of N, and whether any candidate is right (the
ceiling of reranking); attribute binding on two-object captions: both (colour, shape) objects
present, and how often the two colours come out swapped. The baselines: the same rates of each
caption against another test scene's true image (chance). ``samples.png`` shows each grid
caption's candidates, CLIP's choice first.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.configs import stages
from jaxaigc.data import image_tokens, shapes
from jaxaigc.evaluate import judge
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.models.dalle import DALLEConfig
from jaxaigc.pipelines import dalle
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.train.metrics import read_metrics

GRID = "samples.png"


def judge_samples(
    model: DALLEConfig,
    params,
    pairs: image_tokens.TokenPairs,
    dvae: tuple,
    reranker: ClipFeatures,
    config: ml_collections.ConfigDict,
) -> tuple[dict, np.ndarray, list[str]]:
    """The judged figures of ``config.sample.candidates`` samples for each of the first
    ``config.eval.captions`` test captions, drawn ``config.eval.batch_captions`` captions at a
    time from keys ``fold_in(key(config.seed), first caption)`` and reranked by ``reranker``.

    Returns:
      The report (``"all"``, ``"seen"``, ``"held_out"`` captions: the rates of the module
      docstring; ``"candidates"``), the images uint8 [grid_captions, grid_candidates, H, W, 3]
      of the first ``config.eval.grid_captions`` captions (CLIP's choice first) and those captions.
    """
    ev, sc = config.eval, config.sample
    test = pairs.splits["test"]
    records = [test[i] for i in range(min(ev.captions, len(test)))]
    captions = [str(r["caption"]) for r in records]
    images = []
    for start in range(0, len(records), ev.batch_captions):
        batch = records[start : start + ev.batch_captions]
        out = dalle.generate(
            model,
            params,
            np.stack([r["text"] for r in batch]),
            captions[start : start + len(batch)],
            dvae=dvae,
            reranker=reranker,
            candidates=sc.candidates,
            rng=jax.random.fold_in(jax.random.key(config.seed), start),
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
        )
        images.append(out["images"])
    images = np.concatenate(images)  # (n, candidates, H, W, 3), CLIP's choice first
    samples = judge.rates(images, captions, held_out=pairs.config.held_out)
    best = judge.rates(images[:, 0], captions, held_out=pairs.config.held_out)
    report = {
        group: {
            "captions": samples[group]["captions"],
            "single_sample_accuracy": samples[group]["accuracy"],
            "best_of_n_accuracy": best[group]["accuracy"],
            "any_of_n_accuracy": samples[group]["any_accuracy"],
            "two_object_binding_best_of_n": best[group]["binding"],
            "two_object_swapped_best_of_n": best[group]["swapped"],
            "two_object_binding_single_sample": samples[group]["binding"],
            "two_object_swapped_single_sample": samples[group]["swapped"],
        }
        for group in judge.GROUPS
    }
    report["candidates"] = sc.candidates
    grid = images[: ev.grid_captions, : ev.grid_candidates]
    return report, grid, captions[: ev.grid_captions]


def another_scene(pairs: image_tokens.TokenPairs, n: int) -> dict:
    """The judge's rates of each of the first ``n`` test captions against the next test scene's
    true image: the chance level of every rate."""
    cfg, test = pairs.config, pairs.splits["test"]
    images, captions, _ = shapes.generate(
        n, cfg.resolution, seed=cfg.seed, split="test", held_out=cfg.held_out
    )
    # The cached pairs are these scenes, drawn from the same stream.
    if captions != [str(test[i]["caption"]) for i in range(n)]:
        raise ValueError("the test scenes drawn again differ from the cached pairs' captions")
    return judge.rates(np.roll(images, 1, axis=0), captions, held_out=cfg.held_out)


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Judged text -> image figures of the run in ``workdir``, reranked by its ``clip`` stage."""
    workdir = Path(workdir)
    model, params, pairs, dvae, _ = dalle.load_trained(workdir)
    # One call per sample batch, as the candidates are scored when generating.
    reranker = load_clip(stages.trained_run(config, workdir, "clip"), batch_size=None)
    scores, images, grid_captions = judge_samples(
        model.config, params, pairs, dvae, reranker, config
    )
    chance = another_scene(pairs, scores["all"]["captions"])
    if jax.process_index() == 0:
        write_grid(
            workdir / GRID,
            images,
            captions=grid_captions,
            column_titles=[f"CLIP's #{j + 1}" for j in range(images.shape[1])],
            scale=3,
        )

    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    n, k, a, h = scores["all"]["captions"], scores["candidates"], scores["all"], chance["all"]
    figures = [
        {
            "name": f"judge accepts CLIP's best of {k}, {n} test captions",
            "value": a["best_of_n_accuracy"],
            "baseline": a["single_sample_accuracy"],
            "baseline_name": "single sample",
            "unit": "%",
        },
        {
            "name": "judge accepts a single sample",
            "value": a["single_sample_accuracy"],
            "baseline": h["accuracy"],
            "baseline_name": "chance",
            "unit": "%",
        },
        {
            "name": f"judge accepts one of the {k} (the reranking ceiling)",
            "value": a["any_of_n_accuracy"],
            "baseline": a["best_of_n_accuracy"],
            "baseline_name": "CLIP's choice",
            "unit": "%",
        },
        {
            "name": f"held-out colour-shape pairs: judge accepts CLIP's best of {k} "
            f"({scores['held_out']['captions']} captions)",
            "value": scores["held_out"]["best_of_n_accuracy"],
            "baseline": chance["held_out"]["accuracy"],
            "baseline_name": "chance",
            "unit": "%",
        },
        {
            "name": f"two objects: both (colour, shape) drawn, CLIP's best of {k}",
            "value": a["two_object_binding_best_of_n"],
            "baseline": h["binding"],
            "baseline_name": "chance",
            "unit": "%",
        },
        {
            "name": f"two objects: colours swapped, CLIP's best of {k}",
            "value": a["two_object_swapped_best_of_n"],
            "baseline": h["swapped"],
            "baseline_name": "chance",
            "unit": "%",
        },
        {
            "name": f"image NLL at step {last['step']} (nats/token)",
            "value": last["train/image_nll"],
            "baseline": math.log(model.config.image_vocab),
            "baseline_name": "uniform",
            "unit": "",
        },
    ]
    return {
        "title": "DALL-E on shapes scenes: text -> image, reranked by CLIP",
        "figures": figures,
        "images": [
            {
                "path": GRID,
                "caption": f"the first {len(images)} test captions, {images.shape[1]} of their "
                f"{k} samples each in CLIP's order (its choice first)",
                "key": "text_to_image",
            }
        ],
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {
            "step": last["step"],
            "loss": last["train/loss"],
            "image_nll": last["train/image_nll"],
            "text_nll": last["train/text_nll"],
        },
        **scores,
        "chance": chance,
    }
