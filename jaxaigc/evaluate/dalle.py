"""DALL-E's evaluation: text -> image on test-split captions the model never trained on, half of
them naming a (colour, shape) pair that never occurs in training, judged by the scene parser
(:mod:`jaxaigc.evaluate.judge`); and apart, on the binding set: two-object test captions whose
objects differ in both colour and shape (:func:`jaxaigc.data.shapes.generate_binding`), the only
captions where a sample can bind either attribute to the wrong object.

For each caption ``config.sample.candidates`` images are drawn; the judge scores a single sample
(the mean over all candidates: a random choice), the best of N by each reranking rule
(:data:`jaxaigc.pipelines.dalle.RULES`: CLIP's, the transformer's own likelihood and its
rebinding classifier, alone and with CLIP's), and whether any candidate is right (the ceiling of
reranking); attribute binding on two-object captions: both (colour, shape) objects present, and
how often the two colours come out swapped. The baselines: the same rates of each caption
against another scene's true image (chance). ``samples.png`` shows each grid caption's
candidates in the order of the recipe's rule (``config.sample.rerank``), its choice first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
BINDING_GRID = "binding_samples.png"


def judge_candidates(
    images: np.ndarray,
    scores: dict[str, np.ndarray],
    captions: Sequence[str],
    reranker: dalle.Reranker,
    *,
    held_out,
) -> dict:
    """The judged rates of k candidates of each caption, per group of :data:`judge.GROUPS`.

    Args:
      images: uint8 [n, k, H, W, 3]; scores: :meth:`Reranker.scores` of the same candidates.

    Returns:
      ``{group: {"captions", "single_sample_accuracy" (a random choice), "best_of_n_accuracy"
      (by the reranker's rule), "any_of_n_accuracy", binding and swap rates of the best and of
      a single sample, "best_of_n_accuracy_by_rule" and "two_object_binding_best_of_n_by_rule"
      ({rule: rate} for every rule of :data:`dalle.RULES`)}}``.
    """
    samples = judge.rates(images, captions, held_out=held_out)
    rows = np.arange(len(images))
    best = {
        rule: judge.rates(
            images[rows, np.argmax(reranker.rank_key(scores, rule), axis=1)],
            captions,
            held_out=held_out,
        )
        for rule in dalle.RULES
    }
    own = best[reranker.rule]
    return {
        group: {
            "captions": samples[group]["captions"],
            "single_sample_accuracy": samples[group]["accuracy"],
            "best_of_n_accuracy": own[group]["accuracy"],
            "any_of_n_accuracy": samples[group]["any_accuracy"],
            "two_object_binding_best_of_n": own[group]["binding"],
            "two_object_swapped_best_of_n": own[group]["swapped"],
            "two_object_binding_single_sample": samples[group]["binding"],
            "two_object_swapped_single_sample": samples[group]["swapped"],
            "best_of_n_accuracy_by_rule": {r: best[r][group]["accuracy"] for r in best},
            "two_object_binding_best_of_n_by_rule": {r: best[r][group]["binding"] for r in best},
        }
        for group in judge.GROUPS
    }


def reranker_of(
    model: DALLEConfig,
    params,
    pairs: image_tokens.TokenPairs,
    clip: ClipFeatures,
    config: ml_collections.ConfigDict,
) -> dalle.Reranker:
    """The reranker of ``config.sample.rerank`` with every score: CLIP's and the transformer's."""
    return dalle.Reranker(
        config.sample.rerank, clip=clip, model=model, params=params, tokenizer=pairs.tokenizer
    )


def draw_candidates(
    model: DALLEConfig,
    params,
    text: np.ndarray,
    captions: Sequence[str],
    dvae: tuple,
    reranker: dalle.Reranker,
    config: ml_collections.ConfigDict,
    *,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``config.sample.candidates`` images of each caption, best first by the reranker's rule,
    and every score of them; drawn ``config.eval.batch_captions`` captions at a time from keys
    ``fold_in(key(seed), first caption)``."""
    ev, sc = config.eval, config.sample
    images, scores = [], []
    for start in range(0, len(captions), ev.batch_captions):
        stop = start + ev.batch_captions
        out = dalle.generate(
            model,
            params,
            text[start:stop],
            captions[start:stop],
            dvae=dvae,
            reranker=reranker,
            candidates=sc.candidates,
            rng=jax.random.fold_in(jax.random.key(seed), start),
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
        )
        images.append(out.pop("images"))
        scores.append(out)
    scores = {name: np.concatenate([s[name] for s in scores]) for name in scores[0]}
    return np.concatenate(images), scores


def _judged_candidates(
    model: DALLEConfig,
    params,
    pairs: image_tokens.TokenPairs,
    dvae: tuple,
    clip: ClipFeatures,
    config: ml_collections.ConfigDict,
    text: np.ndarray,
    captions: Sequence[str],
    *,
    seed: int,
) -> tuple[dict, np.ndarray]:
    """:func:`judge_candidates` of ``captions``' candidates (:func:`draw_candidates`), and the
    images [grid_captions, grid_candidates, H, W, 3] of the first captions, best first."""
    reranker = reranker_of(model, params, pairs, clip, config)
    images, scores = draw_candidates(
        model, params, text, captions, dvae, reranker, config, seed=seed
    )
    report = judge_candidates(images, scores, captions, reranker, held_out=pairs.config.held_out)
    return report, images[: config.eval.grid_captions, : config.eval.grid_candidates]


def judge_samples(
    model: DALLEConfig,
    params,
    pairs: image_tokens.TokenPairs,
    dvae: tuple,
    clip: ClipFeatures,
    config: ml_collections.ConfigDict,
) -> tuple[dict, np.ndarray, list[str]]:
    """The judged figures (:func:`judge_candidates`) of ``config.sample.candidates`` samples for
    each of the first ``config.eval.captions`` test captions, reranked by ``clip`` and the
    transformer as ``config.sample.rerank`` says (keys from ``config.seed``).

    Returns:
      The report (``"all"``, ``"seen"``, ``"held_out"`` captions; ``"candidates"``), the images
      uint8 [grid_captions, grid_candidates, H, W, 3] of the first ``config.eval.grid_captions``
      captions (the rule's choice first) and those captions.
    """
    test = pairs.splits["test"]
    records = [test[i] for i in range(min(config.eval.captions, len(test)))]
    captions = [str(r["caption"]) for r in records]
    text = np.stack([r["text"] for r in records])
    report, grid = _judged_candidates(
        model, params, pairs, dvae, clip, config, text, captions, seed=config.seed
    )
    report["candidates"] = config.sample.candidates
    return report, grid, captions[: config.eval.grid_captions]


def judge_binding_set(
    model: DALLEConfig,
    params,
    pairs: image_tokens.TokenPairs,
    dvae: tuple,
    clip: ClipFeatures,
    config: ml_collections.ConfigDict,
) -> tuple[dict, np.ndarray, list[str]]:
    """:func:`judge_samples` on the binding set: the first ``config.eval.binding_captions``
    scenes of :func:`shapes.generate_binding` (test split, ``config.eval.binding_seed``; a stream
    neither training nor the test captions draw from), with its chance (``"chance"``: each
    caption against the next scene's true image)."""
    cfg, ev = pairs.config, config.eval
    true_images, captions, _ = shapes.generate_binding(
        ev.binding_captions, cfg.resolution, seed=ev.binding_seed, held_out=cfg.held_out
    )
    text = pairs.tokenizer.encode(captions, length=model.text_len, eos=True)
    report, grid = _judged_candidates(
        model, params, pairs, dvae, clip, config, text, captions, seed=ev.binding_seed
    )
    report["chance"] = judge.rates(np.roll(true_images, 1, axis=0), captions, held_out=cfg.held_out)
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


RULE_NAMES = {
    "clip": "CLIP",
    "likelihood": "DALL-E's likelihood",
    "rebinding": "DALL-E's rebinding classifier",
    "rebinding+clip": "DALL-E's rebinding classifier with CLIP",
}


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Judged text -> image figures of the run in ``workdir``, reranked with its ``clip`` stage
    and its transformer; writes ``samples.png`` and ``binding_samples.png``."""
    workdir = Path(workdir)
    model, params, pairs, dvae, _ = dalle.load_trained(workdir)
    # One call per sample batch, as the candidates are scored when generating.
    clip = load_clip(stages.trained_run(config, workdir, "clip"), batch_size=None)
    scores, images, grid_captions = judge_samples(model.config, params, pairs, dvae, clip, config)
    binding, binding_images, binding_captions = judge_binding_set(
        model.config, params, pairs, dvae, clip, config
    )
    chance = another_scene(pairs, scores["all"]["captions"])
    rule = config.sample.rerank
    if jax.process_index() == 0:
        for name, grid, captions in (
            (GRID, images, grid_captions),
            (BINDING_GRID, binding_images, binding_captions),
        ):
            write_grid(
                workdir / name,
                grid,
                captions=captions,
                column_titles=[f"#{j + 1}" for j in range(grid.shape[1])],
                scale=3,
            )

    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    n, k, a, h = scores["all"]["captions"], scores["candidates"], scores["all"], chance["all"]
    b, bc = binding["all"], binding["chance"]["all"]

    def figure(name, value, baseline, baseline_name, unit="%"):
        return dict(
            name=name, value=value, baseline=baseline, baseline_name=baseline_name, unit=unit
        )

    others = [r for r in dalle.RULES if r != rule]
    figures = [
        figure(
            f"judge accepts the best of {k} by {RULE_NAMES[rule]}, {n} test captions",
            a["best_of_n_accuracy"], a["single_sample_accuracy"], "a random choice",
        ),
        figure("judge accepts a single sample", a["single_sample_accuracy"], h["accuracy"],
               "chance"),
        figure(
            f"judge accepts one of the {k} (the reranking ceiling)", a["any_of_n_accuracy"],
            a["best_of_n_accuracy"], RULE_NAMES[rule],
        ),
        *[
            figure(f"judge accepts the best of {k} by {RULE_NAMES[r]}",
                   a["best_of_n_accuracy_by_rule"][r], a["single_sample_accuracy"],
                   "a random choice")
            for r in others
        ],
        figure(
            f"held-out colour-shape pairs: judge accepts the best of {k} "
            f"({scores['held_out']['captions']} captions)",
            scores["held_out"]["best_of_n_accuracy"], chance["held_out"]["accuracy"], "chance",
        ),
        figure(f"two objects: both (colour, shape) drawn, best of {k}",
               a["two_object_binding_best_of_n"], h["binding"], "chance"),
        figure(f"two objects: colours swapped, best of {k}", a["two_object_swapped_best_of_n"],
               h["swapped"], "chance"),
        figure(
            f"binding set ({b['captions']} two-object captions, colours and shapes differ): "
            f"judge accepts the best of {k} by {RULE_NAMES[rule]}",
            b["best_of_n_accuracy"], b["single_sample_accuracy"], "a random choice",
        ),
        figure(f"binding set: judge accepts one of the {k} (the reranking ceiling)",
               b["any_of_n_accuracy"], b["single_sample_accuracy"], "a random choice"),
        *[
            figure(f"binding set: judge accepts the best of {k} by {RULE_NAMES[r]}",
                   b["best_of_n_accuracy_by_rule"][r], b["single_sample_accuracy"],
                   "a random choice")
            for r in others
        ],
        figure(f"binding set: both (colour, shape) drawn, best of {k}",
               b["two_object_binding_best_of_n"], bc["binding"], "chance"),
        figure(f"binding set: colours swapped, best of {k}", b["two_object_swapped_best_of_n"],
               bc["swapped"], "chance"),
        figure(f"image NLL at step {last['step']} (nats/token)", last["train/image_nll"],
               math.log(model.config.image_vocab), "uniform", unit=""),
    ]  # fmt: skip
    order = f"in the order of {RULE_NAMES[rule]} (its choice first)"
    return {
        "title": f"DALL-E on shapes scenes: text -> image, reranked by {RULE_NAMES[rule]}",
        "figures": figures,
        "images": [
            {
                "path": GRID,
                "caption": f"the first {len(images)} test captions, {images.shape[1]} of their "
                f"{k} samples each {order}",
                "key": "text_to_image",
            },
            {
                "path": BINDING_GRID,
                "caption": f"the first {len(binding_images)} captions of the binding set, "
                f"{binding_images.shape[1]} of their {k} samples each {order}",
                "key": "binding",
            },
        ],
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {
            "step": last["step"],
            "loss": last["train/loss"],
            "image_nll": last["train/image_nll"],
            "text_nll": last["train/text_nll"],
        },
        **scores,
        "rerank": rule,
        "binding_set": binding,
        "chance": chance,
    }
