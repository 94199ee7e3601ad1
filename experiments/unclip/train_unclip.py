"""unCLIP on shapes scenes: the diffusion prior and the diffusion decoder trained on a CLIP run's
features, then text -> image judged by the scene parser.

Needs a trained CLIP (the demo's ``clip`` stage, or ``experiments/clip/tiny_clip.py``):

    python experiments/unclip/train_unclip.py --workdir runs/unclip \
        --config.clip_workdir=runs/demo/clip

The stages train in ``<workdir>/prior`` and ``<workdir>/decoder`` (each resumable). Evaluation on
test scenes (half name a (colour, shape) pair that never occurs in training):

- prior: cos(predicted z_i, true z_i) with one sample and with the paper's best of 2, against the
  baseline cos(z_t, z_i) and a control that pairs each image with another caption's prediction;
- decoder: the round trip cos(CLIP(decode(z_i)), z_i) against an unrelated scene's z_i, and the
  judge's (:func:`jaxaigc.data.shapes.check`) accuracy on images decoded from the true z_i,
  between the ground-truth images (ceiling) and another scene's image (chance);
- pipeline: the judge's caption accuracy of text -> image samples, two-object attribute binding
  (both (colour, shape) objects drawn; colours swapped), and the held-out pairs; the same against
  the decoder's sampler, steps and guidance scale (``config.eval.sweep``, on the first
  ``sweep_scenes`` test scenes);
- beside DALL-E (``config.dalle_workdir``, e.g. the demo's ``dalle`` stage): its figures on the
  same test captions (``config.eval.seed`` is the DALL-E pairs' test stream).

``samples.png``: per caption the ground truth, its decoded z_i, the pipeline's samples, then
DALL-E's CLIP-best of its candidates when a DALL-E run is given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from jaxaigc.cli import run_experiment
from jaxaigc.data import shapes
from jaxaigc.models.prior import sample_prior
from jaxaigc.pipelines import dalle, unclip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics

# experiments/ is not a package: the DALL-E experiment's evaluation is a script beside this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dalle"))
import train_dalle  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = unclip.get_config()
    config.dalle_workdir = ml_collections.FieldReference(None, field_type=str)
    config.eval = ml_collections.ConfigDict(
        dict(
            scenes=200,
            batch=100,
            grid_captions=10,
            seed=0,  # the DALL-E pairs' test stream (TokenPairsConfig.seed): the same captions
            # Decoder sampler method:steps:guidance, each through the whole pipeline.
            sweep="ddim:10:3,ddim:25:3,ddim:50:3,ddim:250:3,ddim:50:1,ddim:50:5,ddpm:100:3",
            sweep_scenes=100,
        )
    )
    return config


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


def _rate(verdicts: list[dict], key: str) -> float | None:
    values = [v[key] for v in verdicts if key in v]
    return float(np.mean(values)) if values else None


def attribute_rates(images: np.ndarray, captions: list[str]) -> dict[str, float | None]:
    """The fraction of ``images`` showing each attribute of their caption (``shapes.attributes``;
    position over the one-object captions only)."""
    verdicts = [shapes.attributes(image, c) for image, c in zip(images, captions, strict=True)]
    return {name: _rate(verdicts, name) for name in shapes.ATTRIBUTES}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, -1)))


def _batches(n: int, size: int):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def evaluate_prior(prior, test: unclip.SceneFeatures, config, rng) -> dict:
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


def evaluate_decoder(decoder, clip, test: unclip.SceneFeatures, config, rng) -> tuple[dict, list]:
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
    truth = [shapes.verdict(image, c) for image, c in zip(test.images, test.captions, strict=True)]
    other = np.roll(test.images, 1, axis=0)
    chance = [shapes.verdict(image, c) for image, c in zip(other, test.captions, strict=True)]
    decoded = [shapes.verdict(image, c) for image, c in zip(images, test.captions, strict=True)]
    report = {
        "round_trip_cos": _cos(z, test.image_embedding),
        "round_trip_cos_unrelated": _cos(z, np.roll(test.image_embedding, 1, axis=0)),
        "judge_accuracy_decoded": _rate(decoded, "correct"),
        "judge_accuracy_ground_truth": _rate(truth, "correct"),
        "judge_accuracy_other_scene": _rate(chance, "correct"),
        "attributes_decoded": attribute_rates(images, test.captions),
        "attributes_other_scene": attribute_rates(other, test.captions),
    }
    return report, images


def evaluate_pipeline(prior, decoder, clip, test, config, rng) -> tuple[dict, np.ndarray]:
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
    held_out = test.held_out
    groups = {"all": [], "seen": [], "held_out": []}
    for k, caption in enumerate(test.captions):
        verdicts = [shapes.verdict(image, caption) for image in images[k]]
        groups["all"] += verdicts
        groups["held_out" if held_out[k] else "seen"] += verdicts
    report = {
        name: {
            "samples": len(verdicts),
            "judge_accuracy": _rate(verdicts, "correct"),
            "two_object_binding": _rate(verdicts, "bound"),
            "two_object_swapped": _rate(verdicts, "swapped"),
        }
        for name, verdicts in groups.items()
    }
    report["all"]["clip_score"] = float(clip_score.mean())
    report["all"]["attributes"] = attribute_rates(images[:, 0], test.captions)
    # The same score of the ground-truth images, and of each caption against another scene's.
    report["all"]["clip_score_ground_truth"] = _cos(test.image_embedding, test.text_embedding)
    report["all"]["clip_score_other_scene"] = _cos(
        np.roll(test.image_embedding, 1, axis=0), test.text_embedding
    )
    return report, images


def sweep_pipeline(prior, decoder, clip, test, config, rng) -> dict:
    """The pipeline's judge figures on the first ``config.eval.sweep_scenes`` test scenes for each
    decoder sampler of ``config.eval.sweep`` (the prior samples as configured)."""
    n = min(config.eval.sweep_scenes, len(test))
    head = dataclasses.replace(
        test, **{f.name: getattr(test, f.name)[:n] for f in dataclasses.fields(test)}
    )
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


def evaluate_dalle(config, test: unclip.SceneFeatures) -> tuple[dict, np.ndarray]:
    """The DALL-E run in ``config.dalle_workdir`` on the same test captions, with its own
    experiment's evaluation (``train_dalle.evaluate``: its CLIP reranks its candidates); returns
    its figures and CLIP's best image for each grid caption."""
    model, params, pairs, dvae, run_config = dalle.load_trained(config.dalle_workdir)
    split = pairs.splits["test"]
    captions = [str(split[i]["caption"]) for i in range(min(len(test), len(split)))]
    if captions != test.captions:
        raise ValueError(
            f"the DALL-E run's {len(split)} test captions are not the unCLIP test captions: set "
            f"config.eval.seed to its pairs' seed {run_config.data.seed} and config.eval.scenes "
            f"to at most {len(split)}"
        )
    run_config.eval.update(dict(captions=len(test), grid_captions=config.eval.grid_captions))
    reranker = dalle.load_reranker(run_config.clip_workdir)
    report, images, _ = train_dalle.evaluate(
        model.config, params, pairs, dvae, reranker, run_config
    )
    return report, images[:, 0]


def write_samples(path: Path, rows: list[list[np.ndarray]], captions: list[str], *, scale=3):
    """A PNG with one row per caption: the caption, then its images left to right."""
    columns, side = max(len(r) for r in rows), rows[0][0].shape[0] * scale
    pad, label = 4, 12
    grid = Image.new(
        "RGB", (columns * (side + pad) + pad, len(rows) * (side + pad + label) + pad), (64,) * 3
    )
    draw = ImageDraw.Draw(grid)
    for i, (images, caption) in enumerate(zip(rows, captions, strict=True)):
        y = pad + i * (side + pad + label)
        draw.text((pad, y), caption, fill=(255, 255, 255))
        for j, image in enumerate(images):
            tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + j * (side + pad), y + label))
    grid.save(path)


def _losses(workdir: Path) -> dict:
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    return {
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {"step": last["step"], "loss": last["train/loss"]},
    }


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains both stages (resuming from ``workdir``), evaluates, writes the report and grid."""
    workdir = Path(workdir)
    if config.clip_workdir is None:
        raise ValueError("config.clip_workdir is required: the CLIP run whose features unCLIP uses")
    clip = unclip.load_clip(config.clip_workdir)
    text_len, data = config.prior.model.text_len, config.data
    features = unclip.encode_scenes(
        clip, data.scenes, split="train", seed=data.seed, text_len=text_len, batch=data.encode_batch
    )
    stages = {}
    for name, build in (("prior", unclip.build_prior), ("decoder", unclip.build_decoder)):
        model, task, batches = build(config, clip, features=features)
        state = train(task, batches, config[name], workdir / name)
        stages[name] = (model, state.eval_params)

    test = unclip.encode_scenes(
        clip, config.eval.scenes, split="test", seed=config.eval.seed, text_len=text_len,
        batch=data.encode_batch,
    )  # fmt: skip
    rng = jax.random.key(config.prior.seed)
    prior_rng, decoder_rng, pipeline_rng = jax.random.split(rng, 3)
    prior_report = evaluate_prior(stages["prior"], test, config, prior_rng)
    decoder_report, decoded = evaluate_decoder(stages["decoder"], clip, test, config, decoder_rng)
    pipeline_report, generated = evaluate_pipeline(
        stages["prior"], stages["decoder"], clip, test, config, pipeline_rng
    )
    sweep = sweep_pipeline(stages["prior"], stages["decoder"], clip, test, config, pipeline_rng)
    n = min(config.eval.grid_captions, len(test))
    rows = [[test.images[k], decoded[k], *generated[k]] for k in range(n)]
    report = {
        "prior": {**_losses(workdir / "prior"), **prior_report},
        "decoder": {**_losses(workdir / "decoder"), **decoder_report},
        "pipeline": pipeline_report,
        "sweep": sweep,
        "test_scenes": len(test),
        "held_out_scenes": int(test.held_out.sum()),
        "sample": config.sample.to_dict(),
    }
    if config.dalle_workdir is not None:
        report["dalle"], dalle_images = evaluate_dalle(config, test)
        rows = [row + [image] for row, image in zip(rows, dalle_images, strict=True)]
    if jax.process_index() != 0:  # every process evaluates; process 0 writes
        return report
    write_samples(workdir / "samples.png", rows, test.captions[:n])
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print(report, workdir)
    return report


def _print(report: dict, workdir: Path) -> None:
    p, d, g = report["prior"], report["decoder"], report["pipeline"]
    k = p["candidates"]
    for name in ("prior", "decoder"):
        r = report[name]
        print(
            f"{name} loss {r['first_logged']['loss']:.4f} (step {r['first_logged']['step']}) -> "
            f"{r['final']['loss']:.4f} (step {r['final']['step']})"
        )
    print(
        f"  prior cos(predicted z_i, z_i) {p[f'cos_prior_best_of_{k}']:.3f} best of {k} "
        f"({p['cos_prior_single']:.3f} single, gain {p['best_of_n_gain']:+.3f}); baseline "
        f"cos(z_t, z_i) {p['cos_text_baseline']:.3f}; unrelated caption "
        f"{p['cos_prior_unrelated_caption']:.3f}"
    )
    print(
        f"  decoder round trip cos(CLIP(decode(z_i)), z_i) {d['round_trip_cos']:.3f} (unrelated "
        f"scene's z_i {d['round_trip_cos_unrelated']:.3f})"
    )
    print(
        f"  decoder judge accuracy on decode(true z_i) {d['judge_accuracy_decoded']:.1%} "
        f"(ground-truth images {d['judge_accuracy_ground_truth']:.1%}, another scene's image "
        f"{d['judge_accuracy_other_scene']:.1%})"
    )
    print(
        f"    its attributes: {attribute_summary(d['attributes_decoded'])} (another scene's "
        f"image: {attribute_summary(d['attributes_other_scene'])})"
    )
    print(
        f"  text -> image CLIP score cos(CLIP(image), z_t) {g['all']['clip_score']:.3f} "
        f"(ground-truth images {g['all']['clip_score_ground_truth']:.3f}, another scene's "
        f"{g['all']['clip_score_other_scene']:.3f})"
    )
    for name in ("all", "seen", "held_out"):
        r = g[name]
        binding = (
            ""
            if r["two_object_binding"] is None
            else f"; two objects bound {r['two_object_binding']:.1%} (colours swapped "
            f"{r['two_object_swapped']:.1%})"
        )
        print(
            f"  text -> image, {name} test captions ({r['samples']} samples): judge accepts "
            f"{r['judge_accuracy']:.1%} (another scene's image "
            f"{d['judge_accuracy_other_scene']:.1%}){binding}"
        )
    print(f"  text -> image attributes (first sample): {attribute_summary(g['all']['attributes'])}")
    for name, r in report["sweep"].items():
        print(
            f"  decoder sampler {name} ({r['samples']} captions): judge accepts "
            f"{r['judge_accuracy']:.1%} (held-out pairs {r['held_out_judge_accuracy']:.1%}), "
            f"two objects bound {_percent(r['two_object_binding'])}; CLIP score "
            f"{r['clip_score']:.3f}; {r['seconds']:.0f} s"
        )
    if "dalle" in report:
        r, k = report["dalle"], report["dalle"]["candidates"]
        for name in ("all", "seen", "held_out"):
            print(
                f"  DALL-E on the same {name} captions ({r[name]['captions']}): single sample "
                f"{r[name]['single_sample_accuracy']:.1%}, CLIP best of {k} "
                f"{r[name]['best_of_n_accuracy']:.1%}; two objects bound "
                f"{_percent(r[name]['two_object_binding_single_sample'])} of single samples "
                f"(colours swapped {_percent(r[name]['two_object_swapped_single_sample'])})"
            )
    print(f"  samples: {workdir / 'samples.png'}")


def attribute_summary(rates: dict) -> str:
    """Attribute rates as "count 97%, colours 96%, ..."."""
    return ", ".join(f"{name} {rate:.0%}" for name, rate in rates.items() if rate is not None)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def summary(report: dict) -> str:
    """One line for the demo's closing summary."""
    p, d, g = report["prior"], report["decoder"], report["pipeline"]
    k = p["candidates"]
    line = (
        f"prior cos(z_i) {p[f'cos_prior_best_of_{k}']:.3f} vs text baseline "
        f"{p['cos_text_baseline']:.3f}; decoder judge on decode(true z_i) "
        f"{d['judge_accuracy_decoded']:.1%}; text -> image judge {g['all']['judge_accuracy']:.1%} "
        f"(held-out pairs {g['held_out']['judge_accuracy']:.1%}), two-object binding "
        f"{_percent(g['all']['two_object_binding'])}"
    )
    if "dalle" in report:
        r = report["dalle"]["all"]
        line += (
            f"; DALL-E on the same {r['captions']} captions: single sample "
            f"{r['single_sample_accuracy']:.1%}, binding "
            f"{_percent(r['two_object_binding_single_sample'])}"
        )
    return line


if __name__ == "__main__":
    run_experiment(run, get_config())
