"""The unCLIP decoder alone on shapes scenes: trained on a CLIP run's image embeddings, then judged
on images decoded from test scenes' true z_i under several samplers (the recipe search).

    python experiments/unclip/decoder_recipe.py --workdir runs/unclip_decoder \
        --config.clip_workdir=runs/demo/clip --config.decoder.train.steps=1000 \
        --config.eval.samplers=ddim:25:1,ddim:25:3,ddpm:100:3

Per sampler ``method:steps:guidance``: the round trip cos(CLIP(decode(z_i)), z_i) and the judge's
accuracy on the decoded images (``train_unclip.evaluate_decoder``). Beside them, what z_i itself
identifies: the judge on the training scene whose z_i is nearest each test z_i (a decoder that
reproduced its nearest training scene would score this), between the ground truth (100%) and
another test scene's image. ``config.eval.checkpoints`` also evaluates earlier checkpoints of the
run (their EMA parameters when ``train.ema_decay`` > 0). ``decoded.png``: per scene the ground
truth, then one image per checkpoint and sampler.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import train_unclip

from jaxaigc.cli import run_experiment
from jaxaigc.data import shapes
from jaxaigc.pipelines import unclip
from jaxaigc.train import checkpoint
from jaxaigc.train.loop import train


def get_config() -> ml_collections.ConfigDict:
    config = train_unclip.get_config()
    # checkpoints: earlier steps of the same run also evaluated, e.g. "500,1500" (each must be
    # saved: a multiple of train.checkpoint_every, among the last train.keep_checkpoints).
    config.eval.update(dict(scenes=100, samplers="ddim:25:1,ddim:25:3,ddpm:100:3", checkpoints=""))
    return config


def nearest_training_scene(
    train_set: unclip.SceneFeatures, test: unclip.SceneFeatures
) -> tuple[float, dict]:
    """The judge's accuracy, and each attribute's, on the training image whose z_i is nearest
    (cosine) each test z_i."""
    nearest = np.argmax(test.image_embedding @ train_set.image_embedding.T, axis=1)
    images = train_set.images[nearest]
    judge = np.mean([shapes.check(im, c) for im, c in zip(images, test.captions, strict=True)])
    return float(judge), train_unclip.attribute_rates(images, test.captions)


def _steps(config: ml_collections.ConfigDict) -> list[int]:
    return [int(step) for step in filter(None, str(config.eval.checkpoints).split(","))]


def _checkpoint(model, workdir: Path, step: int) -> tuple:
    """``(model, params)`` of the run's checkpoint at ``step`` (its EMA when the run kept one)."""
    _, variables, _ = checkpoint.load_trained(
        workdir, lambda _: unclip.decoder_init(model), step=step
    )
    return model, variables["params"]


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    if config.clip_workdir is None:
        raise ValueError(
            "config.clip_workdir is required: the CLIP run whose z_i the decoder reads"
        )
    samplers = train_unclip.parse_samplers(config.eval.samplers)
    clip = unclip.load_clip(config.clip_workdir)
    data, text_len = config.data, config.prior.model.text_len
    features = unclip.encode_scenes(
        clip, data.scenes, split="train", seed=data.seed, text_len=text_len, batch=data.encode_batch
    )
    model, task, batches = unclip.build_decoder(config, clip, features=features)
    start = time.perf_counter()
    state = train(task, batches, config.decoder, workdir)
    train_seconds = time.perf_counter() - start
    decoders = {step: _checkpoint(model, workdir, step) for step in _steps(config)}
    decoders[config.decoder.train.steps] = (model, state.eval_params)
    test = unclip.encode_scenes(
        clip, config.eval.scenes, split="test", seed=config.eval.seed, text_len=text_len,
        batch=data.encode_batch,
    )  # fmt: skip
    nearest_judge, nearest_attributes = nearest_training_scene(features, test)
    report = {
        "decoder": train_unclip._losses(workdir),
        "train_seconds": train_seconds,
        "nearest_training_scene_judge": nearest_judge,
        "nearest_training_scene_attributes": nearest_attributes,
        "checkpoints": {},
    }
    columns = [test.images]
    for step, decoder in sorted(decoders.items()):
        figures_by_sampler = report["checkpoints"][step] = {}
        for sampler in samplers:
            start = time.perf_counter()
            figures, images = train_unclip.evaluate_decoder(
                decoder, clip, test, train_unclip.with_sampler(config, sampler),
                jax.random.key(config.decoder.seed),
            )  # fmt: skip
            figures["seconds"] = time.perf_counter() - start
            figures_by_sampler["{}:{}:{:g}".format(*sampler)] = figures
            columns.append(images)
    n = config.eval.grid_captions
    train_unclip.write_samples(
        workdir / "decoded.png", [[c[k] for c in columns] for k in range(n)], test.captions[:n]
    )
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print(report, workdir)
    return report


def _print(report: dict, workdir: Path) -> None:
    d = report["decoder"]
    print(
        f"decoder loss {d['first_logged']['loss']:.4f} (step {d['first_logged']['step']}) -> "
        f"{d['final']['loss']:.4f} (step {d['final']['step']}) in {report['train_seconds']:.0f} s"
    )
    nearest = train_unclip.attribute_summary(report["nearest_training_scene_attributes"])
    print(
        f"  judge on the nearest training scene by z_i {report['nearest_training_scene_judge']:.1%}"
        f"; its attributes: {nearest}"
    )
    for step, by_sampler in report["checkpoints"].items():
        for name, r in by_sampler.items():
            print(
                f"  step {step}, {name}: judge on decode(true z_i) "
                f"{r['judge_accuracy_decoded']:.1%} (ground truth "
                f"{r['judge_accuracy_ground_truth']:.1%}, another scene's image "
                f"{r['judge_accuracy_other_scene']:.1%}); round trip cos "
                f"{r['round_trip_cos']:.3f} (unrelated {r['round_trip_cos_unrelated']:.3f}); "
                f"{r['seconds']:.0f} s"
            )
            decoded, other = (
                train_unclip.attribute_summary(r[key])
                for key in ("attributes_decoded", "attributes_other_scene")
            )
            print(f"    attributes of decode(true z_i): {decoded} (another scene's: {other})")
    print(f"  grid: {workdir / 'decoded.png'}")


if __name__ == "__main__":
    run_experiment(run, get_config())
