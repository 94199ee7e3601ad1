"""The full-size DALL-E's evaluation on held-out (caption, image) pairs: the first
``eval.pairs`` readable pairs of ``data.eval_source`` (of ``data.source`` without one).

Reported: the negative log-likelihood per image token (the frozen dVAE's tokens of the real
image) and per caption token (SOT excluded, up to and including EOT; the padding after it is
left out), in nats beside the uniform baseline ln(vocabulary); ``samples.png``: for the first
``eval.grid_captions`` captions the real image, then ``sample.candidates`` samples decoded by the
dVAE, ordered by the ``stages.clip`` run's cosine similarity when one is set (paper Sec. 2.6),
which adds CLIP's best of N beside a single sample. Everything runs on the training mesh, the
parameters restored sharded as training held them.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc import parallel
from jaxaigc.configs import stages
from jaxaigc.data import shards
from jaxaigc.data.image_tokens import decode_images
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.models.dalle import DALLE
from jaxaigc.objectives.autoregressive import next_token_nll
from jaxaigc.pipelines.clip import load_clip
from jaxaigc.pipelines.dalle_sharded import clip_scores, draw_samples
from jaxaigc.systems import dalle_pod
from jaxaigc.train.metrics import read_metrics

GRID = "samples.png"


def read_pairs(config: ml_collections.ConfigDict) -> tuple[dict, str]:
    """The first ``eval.pairs`` readable pairs, preprocessed as in training: ``images`` uint8
    [n, s, s, 3], ``captions`` [n], ``skipped`` (undecodable records passed over), and the
    field they came from."""
    field = "eval_source" if config.data.eval_source else "source"
    source = dalle_pod.pair_source(config, field)
    records, skipped = shards.head(source, config.eval.pairs, dalle_pod.image_ops(config))
    images, captions = [r["image"] for r in records], [r["caption"] for r in records]
    if not images:
        raise ValueError(f"config.data.{field} holds no readable pair")
    return {"images": np.stack(images), "captions": captions, "skipped": skipped}, field


def caption_weights(text: jax.Array, eot: int) -> jax.Array:
    """text int [b, T] -> float32 [b, T]: 1 from position 1 (after SOT) to the first EOT."""
    positions = jnp.arange(text.shape[1])
    first_eot = jnp.argmax(text == eot, axis=1)[:, None]
    return ((positions >= 1) & (positions <= first_eot)).astype(jnp.float32)


def validation_nll(
    model: DALLE, state, dvae_config, mesh, rules, text: np.ndarray, images: np.ndarray, batch_size
) -> dict:
    """Mean NLL (nats) per image token and per caption token of the pairs ``text`` int32
    [n, text_len], ``images`` uint8 [n, s, s, 3], ``batch_size`` (global) pairs per call."""
    eot = model.config.pad_id

    @jax.jit
    def sums(params, encoder, batch):
        with nn.logical_axis_rules(rules):
            image = dalle_pod.image_tokens(dvae_config, encoder, batch["image"])
            text_logits, image_logits = model.apply({"params": params}, batch["text"], image)
        weight = batch["weight"][:, None]  # 0 for the rows that pad the last batch
        text_nll, text_count = next_token_nll(
            text_logits, batch["text"], caption_weights(batch["text"], eot) * weight
        )
        image_nll, image_count = next_token_nll(
            image_logits, image, jnp.broadcast_to(weight, image.shape)
        )
        return text_nll.sum(), text_count.sum(), image_nll.sum(), image_count.sum()

    # The last batch is filled up with rows of weight 0.
    n, padded = len(text), -(-len(text) // batch_size) * batch_size
    pairs = {
        "text": np.concatenate([text, np.zeros_like(text[: padded - n])]),
        "image": np.concatenate([images, np.zeros_like(images[: padded - n])]),
        "weight": (np.arange(padded) < n).astype(np.float32),
    }
    rows = parallel.process_rows(mesh, batch_size)
    encoder = state.model_state["frozen"]["dvae_encoder"]
    totals = np.zeros(4)
    with jax.set_mesh(mesh), parallel.partitioner(mesh, rules):
        for start in range(0, padded, batch_size):
            local = {k: v[start : start + batch_size][rows] for k, v in pairs.items()}
            batch = parallel.shard_batch(local, mesh)
            totals += np.asarray(jax.device_get(sums(state.eval_params, encoder, batch)))
    text_nll, text_count, image_nll, image_count = totals
    return {
        "image_nll": image_nll / image_count,
        "text_nll": text_nll / text_count,
        "image_tokens": int(image_count),
        "text_tokens": int(text_count),
    }


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Validation NLL and reranked samples of the run in ``workdir`` (module docstring)."""
    workdir = Path(workdir)
    pairs, field = read_pairs(config)
    clip = None
    if config.stages.clip:
        clip = load_clip(stages.trained_run(config, workdir, "clip"), batch_size=64)
    dvae = dalle_pod.load_dvae(config, workdir)
    model, state, step, mesh, rules = dalle_pod.restore_trained(config, workdir, dvae)
    cfg = model.config
    text = dalle_pod.encode_captions(ClipTokenizer(), pairs["captions"], cfg.text_len)
    nll = validation_nll(
        model, state, dvae[0], mesh, rules, text, pairs["images"], config.eval.batch_size
    )

    g, k = min(config.eval.grid_captions, len(text)), config.sample.candidates
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    tokens = draw_samples(model, state.eval_params, text[:g], config.sample, rng, mesh, rules)
    samples = decode_images(*dvae, tokens.reshape(g * k, -1), batch_size=k)
    samples = samples.reshape(g, k, *samples.shape[1:])
    captions, real = pairs["captions"][:g], pairs["images"][:g]
    which = "held-out pairs" if field == "eval_source" else "training pairs (no data.eval_source)"
    figures = [
        {
            "name": f"image NLL per token (nats), {len(text)} {which}",
            "value": nll["image_nll"],
            "baseline": math.log(cfg.image_vocab),
            "baseline_name": "uniform",
            "unit": "",
        },
        {
            "name": f"caption NLL per token (nats, SOT to EOT), {len(text)} {which}",
            "value": nll["text_nll"],
            "baseline": math.log(cfg.text_vocab),
            "baseline_name": "uniform",
            "unit": "",
        },
    ]
    titles = [f"sample {j + 1}" for j in range(k)]
    details = {}
    if clip is not None:
        scores = clip_scores(clip, samples, captions)
        order = np.argsort(-scores, axis=1, kind="stable")
        samples = np.take_along_axis(samples, order[:, :, None, None, None], axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        titles = [f"CLIP's #{j + 1}" for j in range(k)]
        figures.append(
            {
                "name": f"CLIP cosine of CLIP's best of {k}, {g} captions",
                "value": float(scores[:, 0].mean()),
                "baseline": float(scores.mean()),
                "baseline_name": "single sample",
                "unit": "",
            }
        )
        real_scores = clip_scores(clip, real[:, None], captions)
        details["clip_cosine_real_images"] = float(real_scores.mean())
    if jax.process_index() == 0:
        write_grid(
            workdir / GRID,
            np.concatenate([real[:, None], samples], axis=1),
            captions=captions,
            column_titles=["real image", *titles],
            scale=max(1, 64 // config.data.image_size),
        )
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    first, last = records[0], records[-1]
    return {
        "title": "DALL-E (full size) on your pairs: validation NLL and samples",
        "figures": figures,
        "images": [
            {
                "path": GRID,
                "caption": f"the first {g} {which}: the real image, then {k} samples"
                + (" in CLIP's order" if clip is not None else ""),
                "key": "text_to_image",
            }
        ],
        "step": step,
        "pairs": len(text),
        "skipped_records": pairs["skipped"],
        "validation": nll,
        "first_logged": {"step": first["step"], "loss": first["train/loss"]},
        "final": {
            "step": last["step"],
            "loss": last["train/loss"],
            "image_nll": last["train/image_nll"],
            "text_nll": last["train/text_nll"],
        },
        **details,
    }
