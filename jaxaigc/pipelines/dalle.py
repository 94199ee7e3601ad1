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

from jaxaigc.compile_options import jit_inference
from jaxaigc.configs import fields, stages
from jaxaigc.data import image_tokens
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.sample.decode import sample_image_tokens
from jaxaigc.systems import clip as clip_system
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

    def run_init_fn(config: dict):
        return init_fn(DALLE(fields.to_dataclass(DALLEConfig, config["model"])))

    try:
        config, variables, _ = checkpoint.load_trained(
            workdir, run_init_fn, step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no DALL-E checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`jaxaigc train dalle --workdir {workdir}`"
        ) from error
    config = ml_collections.ConfigDict(config)
    pairs, dvae = load_pairs(config, workdir)
    model = DALLE(fields.to_dataclass(DALLEConfig, config.model))
    return model, variables["params"], pairs, dvae, config


class Reranker:
    """CLIP's cosine similarity between images and captions (Radford et al. 2021), as DALL-E
    reranks its samples."""

    def __init__(self, model: CLIP, variables: dict):
        self.config = model.config
        self.tokenizer = ClipTokenizer()
        self._images = jit_inference(lambda x: model.apply(variables, x, method="encode_image"))
        self._texts = jit_inference(lambda t: model.apply(variables, t, method="encode_text"))

    def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """images uint8 [b, n, r, r, 3] of captions [b] -> cosine similarities float32 [b, n]."""
        b, n, r = images.shape[:3]
        if r != self.config.image_resolution:
            raise ValueError(
                f"images are {r} px; the reranking CLIP takes {self.config.image_resolution} px"
            )
        # clip_ops at the native resolution: the resize and the centre crop are identities.
        x = (images.reshape(b * n, r, r, 3).astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD
        tokens = self.tokenizer.encode(
            list(captions), context_length=self.config.context_length, truncate=True
        )
        image = np.asarray(self._images(x.astype(np.float32))).reshape(b, n, -1)
        text = np.asarray(self._texts(tokens))
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
        return np.einsum("bnd,bd->bn", image, text)


def generate(
    model: DALLEConfig,
    params,
    text: np.ndarray,
    captions: Sequence[str],
    *,
    dvae: tuple,
    reranker: Reranker | None,
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


def load_reranker(workdir: str | Path) -> Reranker:
    """The CLIP trained in ``workdir`` (:func:`jaxaigc.systems.clip.load_trained`)."""
    model, variables, _ = clip_system.load_trained(workdir)
    return Reranker(model, variables)
