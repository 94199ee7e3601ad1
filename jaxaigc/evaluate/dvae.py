"""The dVAE's evaluation on images never trained on: shapes scenes of the test split (half of
them hold a (colour, shape) pair absent from training) and the test emoji.

Each image is encoded to its argmax tokens and decoded, as a text-to-image model uses it;
reported per set: ``psnr`` of the reconstructions (beside the image box-averaged to the token
grid, 8 x 8 pixels for 8 x 8 tokens), ``bits_per_dim`` of the images under the decoder given the
tokens (in the likelihood trained with), codebook ``perplexity`` and ``codes_used`` (fraction of
the vocabulary) of the tokens; on the shapes, ``judge_reconstructions``, the fraction of
reconstructions :func:`jaxaigc.data.shapes.check` accepts for the true caption, beside
``judge_originals``. Originals above their reconstructions go to ``reconstructions.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.compile_options import jit_inference
from jaxaigc.configs import fields
from jaxaigc.data import builders, shapes
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.models.dvae import Decoder, DVAEConfig, Encoder, map_pixels, reconstruct, to_unit_range
from jaxaigc.objectives.dvae import (
    DVAEObjectiveConfig,
    bits_per_dim,
    codebook_usage,
    psnr,
    reconstruction_nll,
)
from jaxaigc.pipelines import dvae
from jaxaigc.train.metrics import read_metrics

GRID = "reconstructions.png"


def autoencode(
    model: DVAEConfig,
    objective: DVAEObjectiveConfig,
    variables: dict,
    images: np.ndarray,
    batch_size: int,
) -> dict:
    """Argmax tokens of ``images`` uint8 [n, H, W, c], their decoding and the NLL given them
    under the likelihood trained with.

    Returns numpy ``ids`` [n, h, w], ``reconstructions`` uint8 [n, H, W, c], ``nll`` [n] (nats).
    """

    @jit_inference
    def step(x):
        x = to_unit_range(x)
        mapped = map_pixels(x)
        logits = Encoder(model).apply(variables["encoder"], mapped)
        ids = jnp.argmax(logits, axis=-1)
        stats = Decoder(model).apply(variables["decoder"], ids)
        out = jnp.round(reconstruct(stats) * 255).astype(jnp.uint8)
        return ids, out, reconstruction_nll(objective, mapped, stats)

    parts = [
        jax.device_get(step(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
    ]
    ids, out, nll = (np.concatenate(p) for p in zip(*parts, strict=True))
    return {"ids": ids, "reconstructions": out, "nll": nll}


def token_grid_baseline(images: np.ndarray, downsample: int) -> np.ndarray:
    """uint8 [n, H, W, c] averaged over ``downsample`` x ``downsample`` boxes, one pixel per token
    of the dVAE's grid, and scaled back up by repetition: what as many pixels as tokens show."""
    n, h, w, c = images.shape
    boxes = images.reshape(n, h // downsample, downsample, w // downsample, downsample, c)
    small = np.round(boxes.astype(np.float32).mean(axis=(2, 4))).astype(np.uint8)
    return small.repeat(downsample, 1).repeat(downsample, 2)


def scores(model: DVAEConfig, images: np.ndarray, result: dict) -> dict:
    """PSNR (and its token-grid baseline), bits/dim and codebook usage of one evaluation set."""
    perplexity, used = codebook_usage(jnp.asarray(result["ids"]), model.vocab_size)
    x = to_unit_range(jnp.asarray(images))
    baseline = to_unit_range(jnp.asarray(token_grid_baseline(images, model.downsample)))
    tokens = result["ids"].size
    return {
        "psnr": float(jnp.mean(psnr(to_unit_range(jnp.asarray(result["reconstructions"])), x))),
        "psnr_token_grid_baseline": float(jnp.mean(psnr(baseline, x))),
        "bits_per_dim": float(bits_per_dim(np.mean(result["nll"]), math.prod(images.shape[1:]))),
        "perplexity": float(perplexity),
        "codes_used": float(used),
        # The expected fraction of codes as many uniform draws would use.
        "codes_used_uniform": 1.0 - (1.0 - 1.0 / model.vocab_size) ** tokens,
        "n": len(images),
    }


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The scores of the shapes and emoji test sets; writes the reconstruction grid."""
    workdir = Path(workdir)
    model, variables, _ = dvae.load_trained(workdir)
    ev, resolution = config.eval, config.data.resolution
    objective = fields.to_dataclass(DVAEObjectiveConfig, config.objective)
    images, captions, _ = shapes.generate(ev.shapes, resolution, seed=config.seed, split="test")
    emoji = builders.load(
        "emoji", split="test", data_dir=config.data.data_dir, resolution=resolution
    )
    sets = {
        "shapes_test": images,
        "emoji_test": np.stack([emoji[i]["image"] for i in range(len(emoji))]),
    }
    report, rows = {}, []
    for name, originals in sets.items():
        result = autoencode(model, objective, variables, originals, ev.batch_size)
        report[name] = scores(model, originals, result)
        rows += [originals[: ev.grid_columns], result["reconstructions"][: ev.grid_columns]]
        if name == "shapes_test":
            pairs = zip(originals, result["reconstructions"], captions, strict=True)
            judged = np.array([(shapes.check(o, c), shapes.check(r, c)) for o, r, c in pairs])
            report[name]["judge_originals"] = float(judged[:, 0].mean())
            report[name]["judge_reconstructions"] = float(judged[:, 1].mean())
    side = resolution // model.downsample
    if jax.process_index() == 0:
        write_grid(
            workdir / GRID,
            rows,
            captions=[
                "test shapes scenes",
                f"their reconstructions from {side} x {side} tokens",
                "test emoji",
                "their reconstructions",
            ],
            scale=4,
        )

    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    s, e = report["shapes_test"], report["emoji_test"]
    figures = [
        {
            "name": f"judge accepts reconstructions of {s['n']} held-out scenes",
            "value": s["judge_reconstructions"],
            "baseline": s["judge_originals"],
            "baseline_name": "originals",
            "unit": "%",
        },
        {
            "name": "PSNR of held-out scenes (dB)",
            "value": s["psnr"],
            "baseline": s["psnr_token_grid_baseline"],
            "baseline_name": f"{side} x {side} pixels",
            "unit": "",
        },
        {
            "name": "PSNR of test emoji (dB)",
            "value": e["psnr"],
            "baseline": e["psnr_token_grid_baseline"],
            "baseline_name": f"{side} x {side} pixels",
            "unit": "",
        },
        {
            "name": f"codes used of {model.vocab_size}, held-out scenes",
            "value": s["codes_used"],
            "baseline": s["codes_used_uniform"],
            "baseline_name": "uniform codes",
            "unit": "%",
        },
        {
            "name": f"training loss at step {last['step']}",
            "value": last["train/loss"],
            "baseline": first["train/loss"],
            "baseline_name": f"step {first['step']}",
            "unit": "",
        },
    ]
    return {
        "title": f"DALL-E's dVAE: {resolution} px scenes and emoji as {side} x {side} tokens",
        "figures": figures,
        "images": [
            {
                "path": GRID,
                "caption": "held-out scenes and test emoji above their reconstructions",
                "key": "reconstructions",
            }
        ],
        "first_logged": {k: first[f"train/{k}"] for k in ("loss", "psnr")}
        | {"step": first["step"]},
        "final": {k: last[f"train/{k}"] for k in ("loss", "psnr")} | {"step": last["step"]},
        "steps_per_sec": float(
            np.median([r["train/steps_per_sec"] for r in records[1:] or records])
        ),
        **report,
    }
