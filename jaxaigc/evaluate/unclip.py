"""unCLIP's evaluation from the checkpoints of its prior and decoder, on test scenes (about half
name a (colour, shape) pair that training never shows):

- prior: cos(predicted z_i, true z_i) with one sample and with the paper's best of 2, against the
  baseline cos(z_t, z_i) and a control that pairs each image with another caption's prediction;
- decoder: the round trip cos(CLIP(decode(z_i)), z_i) against an unrelated scene's z_i, and the
  judge's accuracy on images decoded from the true z_i, between the ground-truth images (ceiling)
  and another scene's image (chance);
- pipeline: the judge's rates (:func:`jaxaigc.evaluate.judge.rates`) of text -> image samples:
  caption accuracy, two-object attribute binding (colours swapped), the held-out pairs, and the
  CLIP score cos(CLIP(image), z_t); the same for each decoder sampler of ``config.eval.sweep``;
- beside DALL-E (the ``dalle`` stage's run, when it holds checkpoints): its figures on the same
  test captions (``config.eval.seed`` is the DALL-E pairs' test stream).

``samples.png`` (key "text_to_image"): per caption the ground truth, the decoder on its true z_i,
then the pipeline's samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.configs.stages import stage_dir, trained_run
from jaxaigc.data import shapes
from jaxaigc.evaluate import dalle as dalle_eval
from jaxaigc.evaluate import judge
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.pipelines import dalle, unclip
from jaxaigc.pipelines.clip import load_clip
from jaxaigc.sample.diffusion import sample_prior
from jaxaigc.systems.unclip import SceneFeatures, encode_scenes, training_scenes
from jaxaigc.train.metrics import read_metrics

GRID = "samples.png"


def parse_samplers(text: str) -> list[tuple[str, int, float]]:
    """``"ddim:25:3,ddpm:100:1"`` -> ``[("ddim", 25, 3.0), ("ddpm", 100, 1.0)]``; "" -> []."""
    samplers = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("ddim", "ddpm"):
            raise ValueError(f"sampler {item!r} is not method:steps:guidance with ddim or ddpm")
        samplers.append((parts[0], int(parts[1]), float(parts[2])))
    return samplers


def with_sampler(config: ml_collections.ConfigDict, sampler: tuple[str, int, float]):
    """A copy of ``config`` whose decoder samples with ``(method, steps, guidance)``."""
    config = config.copy_and_resolve_references()
    method, steps, guidance = sampler
    config.sample.update(
        dict(decoder_method=method, decoder_steps=steps, decoder_guidance=guidance)
    )
    return config


def _attributes(rates: dict) -> dict[str, float | None]:
    return {name: rates[name] for name in shapes.ATTRIBUTES}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, -1)))


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def evaluate_prior(prior, test: SceneFeatures, config, rng: jax.Array) -> dict:
    """The prior's z_i against the true z_i, single sample and best of ``prior_candidates``."""
    model, params = prior
    sc = config.sample
    chosen = {1: [], sc.prior_candidates: []}
    for i, rows in enumerate(_batches(len(test), config.eval.batch)):
        for candidates in chosen:
            chosen[candidates].append(
                sample_prior(
                    model,
                    params,
                    model.config.diffusion(),
                    test.text_tokens[rows],
                    test.text_embedding[rows],
                    jax.random.fold_in(rng, i),
                    text_mask=test.text_mask[rows],
                    steps=sc.prior_steps,
                    guidance_scale=sc.prior_guidance,
                    candidates=candidates,
                )
            )
    single, best = (np.concatenate(chosen[c]) for c in chosen)
    z_i, z_t = test.image_embedding, test.text_embedding
    return {
        "cos_prior_single": _cos(single, z_i),
        f"cos_prior_best_of_{sc.prior_candidates}": _cos(best, z_i),
        "cos_text_baseline": _cos(z_t, z_i),
        # Each image against the prediction for the next test caption (an unrelated scene).
        "cos_prior_unrelated_caption": _cos(np.roll(best, 1, axis=0), z_i),
        "best_of_n_gain": _cos(best, z_i) - _cos(single, z_i),
        "candidates": sc.prior_candidates,
    }


def evaluate_decoder(
    decoder, clip, test: SceneFeatures, config, rng: jax.Array, *, chance: dict
) -> tuple[dict, np.ndarray]:
    """The decoder on the true z_i of the test scenes (``chance``: :func:`chance_rates` of
    ``test``): the report and the decoded images."""
    sc = config.sample
    images = np.concatenate(
        [
            unclip.decode(
                decoder,
                test.image_embedding[rows],
                jax.random.fold_in(rng, i),
                steps=sc.decoder_steps,
                guidance_scale=sc.decoder_guidance,
                method=sc.decoder_method,
                text=test.tokens[rows],
            )
            for i, rows in enumerate(_batches(len(test), config.eval.batch))
        ]
    )
    z = clip.encode_images(images)
    decoded = judge.rates(images, test.captions, attributes=True)["all"]
    other = chance["all"]
    report = {
        "round_trip_cos": _cos(z, test.image_embedding),
        "round_trip_cos_unrelated": _cos(z, np.roll(test.image_embedding, 1, axis=0)),
        "judge_accuracy_decoded": decoded["accuracy"],
        "judge_accuracy_ground_truth": judge.rates(test.images, test.captions)["all"]["accuracy"],
        "judge_accuracy_other_scene": other["accuracy"],
        "attributes_decoded": _attributes(decoded),
        "attributes_other_scene": _attributes(other),
    }
    return report, images


def chance_rates(test: SceneFeatures) -> dict:
    """The judge's rates of each caption against another scene's true image (chance)."""
    return judge.rates(np.roll(test.images, 1, axis=0), test.captions, attributes=True)


def nearest_training_scene(train: SceneFeatures, test: SceneFeatures) -> dict:
    """The judge on the training scene whose z_i is nearest (cosine) each test z_i: what a decoder
    that reproduced its nearest training scene would score."""
    nearest = np.argmax(test.image_embedding @ train.image_embedding.T, axis=1)
    rates = judge.rates(train.images[nearest], test.captions, attributes=True)["all"]
    return {
        "nearest_training_scene_judge": rates["accuracy"],
        "nearest_training_scene_attributes": _attributes(rates),
    }


def evaluate_pipeline(prior, decoder, clip, test, config, rng) -> tuple[dict, np.ndarray]:
    """Text -> image on the test captions: the judge's rates per group of captions, attributes
    and CLIP scores; returns them and the images uint8 [n, candidates, r, r, 3]."""
    sc = config.sample
    outputs = [
        unclip.generate(
            test.captions[rows],
            prior=prior,
            decoder=decoder,
            clip=clip,
            rng=jax.random.fold_in(rng, i),
            prior_steps=sc.prior_steps,
            decoder_steps=sc.decoder_steps,
            prior_guidance=sc.prior_guidance,
            decoder_guidance=sc.decoder_guidance,
            candidates=sc.candidates,
            prior_candidates=sc.prior_candidates,
            decoder_method=sc.decoder_method,
        )["images"]
        for i, rows in enumerate(_batches(len(test), config.eval.batch))
    ]
    images = np.concatenate(outputs)  # (n, candidates, r, r, 3)
    # CLIP score: cos(CLIP(image), z_t of its caption), graded where the judge is all or nothing.
    z = clip.encode_images(images.reshape(-1, *images.shape[2:])).reshape(*images.shape[:2], -1)
    clip_score = np.einsum("ncd,nd->nc", z, test.text_embedding)
    rates = judge.rates(images, test.captions, attributes=True)
    report = {
        group: {
            "samples": r["samples"],
            "judge_accuracy": r["accuracy"],
            "two_object_binding": r["binding"],
            "two_object_swapped": r["swapped"],
        }
        for group, r in rates.items()
    }
    report["all"]["clip_score"] = float(clip_score.mean())
    report["all"]["attributes"] = _attributes(rates["all"])  # over every sample
    # The same score of the ground-truth images, and of each caption against another scene's.
    report["all"]["clip_score_ground_truth"] = _cos(test.image_embedding, test.text_embedding)
    report["all"]["clip_score_other_scene"] = _cos(
        np.roll(test.image_embedding, 1, axis=0), test.text_embedding
    )
    return report, images


def sweep_pipeline(prior, decoder, clip, test, config, rng) -> dict:
    """The pipeline's judge figures on the first ``config.eval.sweep_scenes`` test scenes for each
    decoder sampler of ``config.eval.sweep`` (the prior samples as configured)."""
    head = test.head(min(config.eval.sweep_scenes, len(test)))
    report = {}
    for sampler in parse_samplers(config.eval.sweep):
        start = time.perf_counter()
        figures, _ = evaluate_pipeline(
            prior, decoder, clip, head, with_sampler(config, sampler), rng
        )
        report["{}:{}:{:g}".format(*sampler)] = {
            **figures["all"],
            "held_out_judge_accuracy": figures["held_out"]["judge_accuracy"],
            "seconds": time.perf_counter() - start,
        }
    return report


def evaluate_dalle(dalle_dir: Path, test: SceneFeatures) -> dict:
    """The DALL-E run in ``dalle_dir`` on the same test captions, with DALL-E's own judged
    figures (:func:`jaxaigc.evaluate.dalle.judge_samples`: its CLIP reranks its candidates)."""
    model, params, pairs, dvae, run_config = dalle.load_trained(dalle_dir)
    split = pairs.splits["test"]
    captions = [str(split[i]["caption"]) for i in range(min(len(test), len(split)))]
    if captions != test.captions:
        raise ValueError(
            f"the DALL-E run's {len(split)} test captions are not the unCLIP test captions: set "
            f"config.eval.seed to its pairs' seed {run_config.data.seed} and config.eval.scenes "
            f"to at most {len(split)}"
        )
    run_config.eval.captions = len(test)
    # As DALL-E's own evaluation reranks (jaxaigc.evaluate.dalle.evaluate).
    reranker = load_clip(trained_run(run_config, dalle_dir, "clip"), batch_size=None)
    report, _, _ = dalle_eval.judge_samples(model.config, params, pairs, dvae, reranker, run_config)
    return report


def losses(directory: str | Path) -> dict:
    """The first and the last logged training loss of the run in ``directory``, with steps."""
    records = [r for r in read_metrics(directory) if "train/loss" in r]
    first, last = records[0], records[-1]
    return {
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {"step": last["step"], "loss": last["train/loss"]},
    }


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the unCLIP run in ``workdir`` (schema: :mod:`jaxaigc.evaluate.report`), from
    the prior's and the decoder's checkpoints and the ``clip`` stage's run; writes the grid."""
    workdir = Path(workdir)
    clip = unclip.clip_features(config, workdir)
    test = encode_scenes(
        clip, config.eval.scenes, split="test", seed=config.eval.seed,
        text_len=config.prior.model.text_len,
    )  # fmt: skip
    dirs = {name: stage_dir(config, workdir, name) for name in ("prior", "decoder")}
    prior, decoder = (unclip.load_stage(dirs[name], name)[:2] for name in dirs)
    prior_rng, decoder_rng, pipeline_rng = jax.random.split(jax.random.key(config.prior.seed), 3)
    prior_report = evaluate_prior(prior, test, config, prior_rng)
    chance = chance_rates(test)
    decoder_report, decoded = evaluate_decoder(
        decoder, clip, test, config, decoder_rng, chance=chance
    )
    if config.eval.nearest_training_scene:
        decoder_report |= nearest_training_scene(training_scenes(config, clip), test)
    pipeline_report, generated = evaluate_pipeline(prior, decoder, clip, test, config, pipeline_rng)
    report = {
        "title": "unCLIP: a diffusion prior and decoder on CLIP features of shapes scenes",
        "prior": {**losses(dirs["prior"]), **prior_report},
        "decoder": {**losses(dirs["decoder"]), **decoder_report},
        "pipeline": pipeline_report,
        "sweep": sweep_pipeline(prior, decoder, clip, test, config, pipeline_rng),
        "test_scenes": len(test),
        "held_out_scenes": int(test.held_out.sum()),
        "sample": config.sample.to_dict(),
    }
    dalle_dir = stage_dir(config, workdir, "dalle")
    if (dalle_dir / "checkpoints").is_dir():
        report["dalle"] = evaluate_dalle(dalle_dir, test)
    report["figures"] = figures(report, chance)

    n = min(config.eval.grid_captions, len(test))
    k = generated.shape[1]
    samples = ["text -> image"] if k == 1 else [f"text -> image {j + 1}" for j in range(k)]
    if jax.process_index() == 0:  # every process evaluates; process 0 writes
        write_grid(
            workdir / GRID, [[test.images[i], decoded[i], *generated[i]] for i in range(n)],
            captions=test.captions[:n], column_titles=["truth", "decode(true z_i)", *samples],
            scale=3,
        )  # fmt: skip
    report["images"] = [
        {
            "path": GRID,
            "caption": f"unCLIP on {n} test captions: the true scene, the decoder on its true "
            f"CLIP image embedding, then text -> image (prior, then decoder)",
            "key": "text_to_image",
        }
    ]
    return report


def figures(report: dict, chance: dict) -> list[dict]:
    """The report's headline figures, each with its baseline (``chance``: the judge's rates of
    another scene's true image)."""
    p, d, g = report["prior"], report["decoder"], report["pipeline"]
    k = p["candidates"]

    def judged(name: str, value: float | None, baseline: float | None) -> dict:
        return {"name": name, "value": value, "baseline": baseline, "baseline_name": "chance",
                "unit": "%"}  # fmt: skip

    out = [
        judged(f"text -> image judge, {g['all']['samples']} samples",
               g["all"]["judge_accuracy"], chance["all"]["accuracy"]),
        judged("text -> image judge, held-out (colour, shape) pairs",
               g["held_out"]["judge_accuracy"], chance["held_out"]["accuracy"]),
        judged("two-object binding (both objects drawn)",
               g["all"]["two_object_binding"], chance["all"]["binding"]),
        {"name": "CLIP score cos(CLIP(image), z_t)", "value": g["all"]["clip_score"],
         "baseline": g["all"]["clip_score_other_scene"], "baseline_name": "another scene's image",
         "unit": ""},
        {"name": f"prior cos(predicted z_i, z_i), best of {k}",
         "value": p[f"cos_prior_best_of_{k}"], "baseline": p["cos_text_baseline"],
         "baseline_name": "text baseline cos(z_t, z_i)", "unit": ""},
        {"name": "decoder round trip cos(CLIP(decode(z_i)), z_i)", "value": d["round_trip_cos"],
         "baseline": d["round_trip_cos_unrelated"], "baseline_name": "an unrelated scene's z_i",
         "unit": ""},
        judged("judge on decode(true z_i)", d["judge_accuracy_decoded"],
               d["judge_accuracy_other_scene"]),
    ]  # fmt: skip
    if "nearest_training_scene_judge" in d:
        out.append(
            judged("judge on the training scene nearest by z_i",
                   d["nearest_training_scene_judge"], d["judge_accuracy_other_scene"])
        )  # fmt: skip
    if "dalle" in report:
        r = report["dalle"]["all"]
        out += [
            judged("DALL-E on the same captions, judge, one sample",
                   r["single_sample_accuracy"], chance["all"]["accuracy"]),
            judged("DALL-E on the same captions, two-object binding, one sample",
                   r["two_object_binding_single_sample"], chance["all"]["binding"]),
        ]  # fmt: skip
    return [f for f in out if f["value"] is not None]
