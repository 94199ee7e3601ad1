"""The full-size unCLIP recipes' evaluation from their checkpoints, on held-out data:

- prior (``data.eval_embeddings``): cos(predicted z_i, z_i) sampled as the paper samples (64
  strided DDIM steps, the better of 2 by z_i . z_t), one sample and best of 2, beside the baseline
  cos(z_t, z_i) and another caption's prediction, as :func:`jaxaigc.evaluate.unclip.evaluate_prior`
  measures them; the caption features from the frozen CLIP of ``stages.clip``
  (:class:`~jaxaigc.pipelines.clip.ClipFeatures`, which the training step equals);
- decoder (``data.eval_source`` joined to ``data.eval_embeddings``): the validation loss beside
  the same loss with each image given another image's z_i (same timesteps and noise), and
  ``samples.png``: real images beside the decoder's samples from their z_i.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate import unclip as unclip_eval
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.objectives.unclip import decoder_loss_fn
from jaxaigc.pipelines import unclip
from jaxaigc.pipelines.clip import ClipFeatures
from jaxaigc.systems import unclip_pod
from jaxaigc.train import checkpoint

GRID = "samples.png"


@dataclasses.dataclass(frozen=True)
class HeldOutCaptions:
    """Held-out samples as :func:`jaxaigc.evaluate.unclip.evaluate_prior` reads them."""

    text_tokens: np.ndarray  # float32 [n, text_len, text_width]
    text_mask: np.ndarray  # bool [n, text_len]
    text_embedding: np.ndarray  # float32 [n, d]
    image_embedding: np.ndarray  # float32 [n, d]

    def __len__(self) -> int:
        return len(self.image_embedding)


def _load(workdir: Path, module, config_class, init, recipe: str):
    """``(model, params)`` of the run in ``workdir``: the EMA parameters when it kept them."""
    model, variables, _, _ = checkpoint.load_model(
        workdir,
        lambda run_config: module(fields.to_dataclass(config_class, run_config["model"])),
        init,
        what=f"unCLIP {module.__name__.lower()}",
        train_command=f"jaxaigc train {recipe} --workdir {workdir}",
    )
    return model, variables["params"]


def evaluate_prior(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the prior run in ``workdir`` (schema: :mod:`jaxaigc.evaluate.report`)."""
    workdir = Path(workdir)
    source = unclip_pod.prior_source(config, "eval_embeddings")
    records = [source[i] for i in range(min(config.eval.samples, len(source)))]
    clip = ClipFeatures(*unclip_pod.load_clip_run(config, workdir), batch_size=config.eval.batch)
    text = clip.text_features([r["caption"] for r in records], length=config.model.text_len)
    held_out = HeldOutCaptions(
        text_tokens=text["text_tokens"],
        text_mask=text["text_mask"],
        text_embedding=np.stack([r["text_embedding"] for r in records]),
        image_embedding=np.stack([r["image_embedding"] for r in records]),
    )
    prior = _load(workdir, Prior, PriorConfig, unclip.prior_init, "unclip-prior-1b")
    measured = unclip_eval.evaluate_prior(prior, held_out, config, jax.random.key(config.seed))
    k = config.sample.prior_candidates
    report = {
        "title": "unCLIP prior: CLIP image embeddings from held-out captions",
        "prior": {**unclip_eval.losses(workdir), **measured},
        "held_out_samples": len(held_out),
        "sample": config.sample.to_dict(),
    }
    report["figures"] = [
        {"name": f"prior cos(predicted z_i, z_i), best of {k}, {len(held_out)} held-out samples",
         "value": measured[f"cos_prior_best_of_{k}"], "baseline": measured["cos_text_baseline"],
         "baseline_name": "text baseline cos(z_t, z_i)", "unit": ""},
        {"name": "prior cos(predicted z_i, z_i), one sample",
         "value": measured["cos_prior_single"],
         "baseline": measured["cos_prior_unrelated_caption"],
         "baseline_name": "another caption's prediction", "unit": ""},
    ]  # fmt: skip
    return report


def evaluate_decoder(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the decoder run in ``workdir``; writes ``samples.png`` (process 0)."""
    workdir = Path(workdir)
    source = unclip_pod.decoder_source(config, source="eval_source", embeddings="eval_embeddings")
    tokenizer = ClipTokenizer()
    batch_size = min(config.eval.batch, len(source))
    batches = BatchIterator(
        source,
        global_batch_size=batch_size,
        seed=config.seed,
        shuffle=False,
        num_epochs=1,
        operations=unclip_pod.decoder_operations(config, tokenizer, extra=("caption",)),
    )
    count = max(1, min(config.eval.samples, len(source)) // batch_size)
    held_out = [next(batches) for _ in range(count)]
    captions = [str(c) for b in held_out for c in b.pop("caption")]
    model, params = _load(workdir, Decoder, DecoderConfig, unclip.decoder_init,
                          "unclip-decoder-3.5b")  # fmt: skip
    loss_fn = decoder_loss_fn(model, model.config.diffusion(), **config.loss.to_dict())
    loss = jax.jit(lambda params, batch, rng: loss_fn(params, batch, rng)[0])
    rng, sample_rng = jax.random.split(jax.random.key(config.eval.seed))
    true, other = [], []
    for i, batch in enumerate(held_out):
        key = jax.random.fold_in(rng, i)  # the same timesteps and noise for both
        true.append(float(loss(params, batch, key)))
        shuffled = {**batch, "image_embedding": np.roll(batch["image_embedding"], 1, axis=0)}
        other.append(float(loss(params, shuffled, key)))
    samples = len(captions)

    first = held_out[0]
    n = min(config.eval.grid, batch_size)
    sc = config.sample
    decoded = unclip.decode(
        (model, params), first["image_embedding"][:n], sample_rng, steps=sc.decoder_steps,
        guidance_scale=sc.decoder_guidance, method=sc.decoder_method,
        text=first["text_tokens"][:n] if "text_tokens" in first else None,
    )  # fmt: skip
    if jax.process_index() == 0:  # every process evaluates; process 0 writes
        write_grid(
            workdir / GRID, [[unclip.to_uint8(first["image"][i]), decoded[i]] for i in range(n)],
            captions=captions[:n], column_titles=["real", "decoded from its z_i"], scale=2,
        )  # fmt: skip
    validation, baseline = float(np.mean(true)), float(np.mean(other))
    return {
        "title": "unCLIP decoder: held-out loss and samples from held-out CLIP image embeddings",
        "decoder": {
            **unclip_eval.losses(workdir),
            "validation_loss": validation,
            "validation_loss_other_embedding": baseline,
        },
        "held_out_samples": samples,
        "sample": sc.to_dict(),
        "figures": [
            {
                "name": f"held-out loss, {samples} images",
                "value": validation,
                "baseline": baseline,
                "baseline_name": "each image given another's z_i",
                "unit": "",
            },
        ],  # fmt: skip
        "images": [
            {
                "path": GRID,
                "caption": f"{n} held-out images and the decoder's samples from their CLIP image "
                f"embeddings ({sc.decoder_method} {sc.decoder_steps} steps, guidance "
                f"{sc.decoder_guidance:g})",
                "key": "decoded",
            }
        ],
    }
