"""DALL-E (Ramesh et al. 2021) on shapes scenes read back from its run: text -> image generation
with CLIP reranking (Sec. 2.6); training: :mod:`jaxaigc.systems.dalle`.

The image tokens come from the run's ``dvae`` stage (:func:`jaxaigc.pipelines.dvae.load_trained`),
encoded once into a cached dataset (:mod:`jaxaigc.data.image_tokens`); the reranker is a CLIP
run (:func:`jaxaigc.systems.clip.load_trained`). Generation draws ``candidates`` image token
grids per caption with the KV-cache sampler, decodes them with the dVAE, and orders them by
CLIP's cosine similarity to the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.configs import fields, stages
from jaxaigc.data import image_tokens
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.text_to_image import Generated, TextToImage
from jaxaigc.sample.decode import sample_image_tokens
from jaxaigc.train import checkpoint


def init_fn(model: DALLE):
    """``rng -> variables`` of ``model``, as training initialises it."""
    cfg = model.config

    def init(rng: jax.Array):
        return model.init(
            rng,
            jnp.zeros((1, cfg.text_len), jnp.int32),
            jnp.zeros((1, cfg.image_len), jnp.int32),
        )

    return init


def load_pairs(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[image_tokens.TokenPairs, tuple]:
    """The cached pairs of the run ``config`` in ``workdir``, and the dVAE ``(config, variables)``
    of its ``dvae`` stage that made their image tokens."""
    dvae_config, dvae_variables, dvae_step = dvae_pipeline.load_trained(
        stages.trained_run(config, workdir, "dvae")
    )
    data = {k: v for k, v in config.data.to_dict().items() if k != "data_dir"}
    pairs = image_tokens.load(
        fields.to_dataclass(image_tokens.TokenPairsConfig, data),
        dvae_config,
        dvae_variables,
        dvae_step=dvae_step,
        data_dir=config.data.data_dir,
    )
    return pairs, (dvae_config, dvae_variables)


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[DALLE, Any, image_tokens.TokenPairs, tuple, ml_collections.ConfigDict]:
    """The transformer trained in ``workdir`` (by :func:`jaxaigc.systems.dalle.train`) with what
    generation needs beside it, read from the checkpoint's run config: the EMA parameters when
    the run kept them (:func:`jaxaigc.train.checkpoint.load_trained`), the cached pairs (their
    tokenizer encodes captions) and the dVAE that decodes the image tokens.

    Returns:
      ``(model, params, pairs, dvae, run_config)``, ``dvae`` = ``(config, variables)``.
    """
    model, variables, _, config = checkpoint.load_model(
        workdir,
        lambda run_config: DALLE(fields.to_dataclass(DALLEConfig, run_config["model"])),
        init_fn,
        what="DALL-E",
        train_command=f"jaxaigc train dalle --workdir {workdir}",
        step=step,
        device=device,
    )
    config = ml_collections.ConfigDict(config)
    pairs, dvae = load_pairs(config, workdir)
    return model, variables["params"], pairs, dvae, config


def generate(
    model: DALLEConfig,
    params,
    text: np.ndarray,
    captions: Sequence[str],
    *,
    dvae: tuple,
    reranker: ClipFeatures | None,
    candidates: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> dict[str, np.ndarray]:
    """Text -> image: ``candidates`` samples per caption, decoded and ordered by CLIP.

    Args:
      model, params: the DALL-E transformer.
      text: int [b, text_len] caption tokens; captions: the same captions as text (for CLIP).
      dvae: ``(config, variables)`` of the dVAE whose tokens the model draws.
      reranker: CLIP scores; None keeps the sampling order.
      candidates: samples per caption (the paper's N).

    Returns:
      ``images`` uint8 [b, candidates, H, W, 3] best first, ``scores`` [b, candidates] (CLIP
      cosine, descending; zeros without a reranker) and ``tokens`` [b, candidates, image_len]
      in the same order.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    text = np.asarray(text, np.int32)
    if len(captions) != len(text):
        raise ValueError(f"{len(captions)} captions for {len(text)} rows of caption tokens")
    b = len(text)
    tokens = sample_image_tokens(
        model,
        params,
        np.repeat(text, candidates, axis=0),  # row i * candidates + j: caption i, sample j
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    tokens = np.asarray(tokens)
    images = image_tokens.decode_images(*dvae, tokens)
    images = images.reshape(b, candidates, *images.shape[1:])
    tokens = tokens.reshape(b, candidates, -1)
    if reranker is None:
        return {"images": images, "scores": np.zeros((b, candidates), np.float32), "tokens": tokens}
    scores = reranker.scores(images, captions)
    order = np.argsort(-scores, axis=1, kind="stable")
    take = lambda x: np.take_along_axis(x, order.reshape(b, candidates, *[1] * (x.ndim - 2)), 1)
    return {"images": take(images), "scores": take(scores), "tokens": take(tokens)}


class DalleTextToImage(TextToImage):
    """DALL-E's text -> image: N samples per caption, decoded by the dVAE and reranked by CLIP."""

    recipe = "dalle"

    def __init__(self, workdir: str | Path):
        self.model, self.params, pairs, self.dvae, config = load_trained(workdir)
        self.tokenizer, self.text_len = pairs.tokenizer, config.data.text_len
        self.clip = load_clip(stages.trained_run(config, workdir, "clip"))
        self.sample = config.sample

    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated:
        text = self.tokenizer.encode(captions, length=self.text_len, eos=True)
        out = generate(
            self.model.config,
            self.params,
            text,
            captions,
            dvae=self.dvae,
            reranker=self.clip,
            candidates=n,
            rng=jax.random.key(seed),
            temperature=self.sample.temperature,
            top_k=self.sample.top_k,
            top_p=self.sample.top_p,
        )
        return Generated(out["images"], out["scores"])
