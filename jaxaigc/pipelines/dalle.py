"""DALL-E (Ramesh et al. 2021) on shapes scenes: the transformer trained on (BPE caption tokens,
dVAE image tokens) pairs, and text -> image generation with CLIP reranking (Sec. 2.6).

The image tokens come from a trained dVAE run (:func:`jaxaigc.pipelines.dvae.load_trained`),
encoded once into a cached dataset (:mod:`jaxaigc.data.image_tokens`); the reranker is a CLIP
run (:func:`jaxaigc.pipelines.clip.load_trained`). Generation draws ``candidates`` image token
grids per caption with the KV-cache sampler, decodes them with the dVAE, and orders them by
CLIP's cosine similarity to the caption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.compile_options import jit_inference
from jaxaigc.data import image_tokens
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.objectives.dalle import dalle_loss_fn
from jaxaigc.pipelines import clip as clip_pipeline
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.sample.decode import sample_image_tokens
from jaxaigc.train import checkpoint
from jaxaigc.train.loop import Task, default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = default_train_config()
    pairs = image_tokens.TokenPairsConfig()
    model = DALLEConfig.from_name(
        "tiny",
        text_len=pairs.text_len,
        text_vocab=pairs.bpe_vocab_size,
        image_side=pairs.image_side,
    )
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    config.data = ml_collections.ConfigDict(dataclasses.asdict(pairs))
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    # The runs whose checkpoints make the image tokens and rerank the samples.
    config.dvae_workdir = ml_collections.FieldReference(None, field_type=str)
    config.clip_workdir = ml_collections.FieldReference(None, field_type=str)
    config.optim.update(dict(peak_lr=1e-3, warmup_steps=100, b2=0.96, weight_decay=0.045))
    config.train.update(dict(batch_size=64, steps=5000, log_every=50, checkpoint_every=1000))
    # Temperature 0.7: at 800 updates CLIP's best of 16 was right for 46% of test captions at
    # temperature 1, 57.5% at 0.7 and 55.5% at 0.4 (BUILD_NOTES, DALL-E experiment).
    config.sample = ml_collections.ConfigDict(
        dict(candidates=16, temperature=0.7, top_k=0, top_p=1.0)
    )
    return config


def model_config(config: ml_collections.ConfigDict) -> DALLEConfig:
    fields = config.model.to_dict()
    if fields.get("layer_kinds") is not None:
        fields["layer_kinds"] = tuple(fields["layer_kinds"])
    return DALLEConfig(**fields)


def pairs_config(config: ml_collections.ConfigDict) -> image_tokens.TokenPairsConfig:
    fields = {k: v for k, v in config.data.to_dict().items() if k != "data_dir"}
    fields["held_out"] = tuple(tuple(pair) for pair in fields["held_out"])
    return image_tokens.TokenPairsConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TokensOnly(grain.transforms.Map):
    """Keeps the arrays the objective reads (the caption strings do not batch onto devices)."""

    def map(self, element: dict) -> dict:
        return {"text": element["text"], "image": element["image"]}


def check_compatible(
    model: DALLEConfig, pairs: image_tokens.TokenPairs, dvae: dvae_pipeline.DVAEConfig
) -> None:
    """Raises ``ValueError`` naming the value and the limit where the transformer does not fit the
    tokenizer, the caption length or the dVAE's vocabulary and grid."""
    checks = [
        ("the caption tokenizer's vocabulary", pairs.tokenizer.vocab_size, "text_vocab", "<="),
        ("the dVAE's vocabulary", dvae.vocab_size, "image_vocab", "=="),
        ("the cached captions' length", pairs.config.text_len, "text_len", "=="),
        ("the dVAE's token grid side", pairs.config.image_side, "image_side", "=="),
        ("the tokenizer's pad id", pairs.tokenizer.pad_id, "pad_id", "=="),
    ]
    for what, value, field, relation in checks:
        limit = getattr(model, field)
        if not (value <= limit if relation == "<=" else value == limit):
            raise ValueError(
                f"{what} is {value}, but the transformer's {field} is {limit}: set "
                f"config.model.{field} {'>=' if relation == '<=' else 'to'} {value}"
            )


def build(
    config: ml_collections.ConfigDict,
) -> tuple[DALLE, Task, BatchIterator, image_tokens.TokenPairs, tuple]:
    """The model, its task, the training batches, the cached pairs and the dVAE
    ``(config, variables)`` that made them."""
    model = DALLE(model_config(config))
    pairs, (dvae_config, dvae_variables) = _pairs_and_dvae(config)
    check_compatible(model.config, pairs, dvae_config)
    batches = BatchIterator(
        pairs.splits["train"],
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=[TokensOnly()],
    )
    task = Task(init=_init_fn(model), loss_fn=dalle_loss_fn(model))
    return model, task, batches, pairs, (dvae_config, dvae_variables)


def _pairs_and_dvae(config: ml_collections.ConfigDict) -> tuple[image_tokens.TokenPairs, tuple]:
    """The cached pairs of the run ``config``, and the dVAE ``(config, variables)`` behind them."""
    if config.dvae_workdir is None:
        raise ValueError("config.dvae_workdir is required: the dVAE run whose tokens DALL-E models")
    dvae_config, dvae_variables, dvae_step = dvae_pipeline.load_trained(config.dvae_workdir)
    pairs = image_tokens.load(
        pairs_config(config),
        dvae_config,
        dvae_variables,
        dvae_step=dvae_step,
        data_dir=config.data.data_dir,
    )
    return pairs, (dvae_config, dvae_variables)


def _init_fn(model: DALLE):
    cfg = model.config

    def init(rng: jax.Array):
        return model.init(
            rng,
            jnp.zeros((1, cfg.text_len), jnp.int32),
            jnp.zeros((1, cfg.image_len), jnp.int32),
        )

    return init


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[DALLE, Any, image_tokens.TokenPairs, tuple, ml_collections.ConfigDict]:
    """The transformer trained in ``workdir`` (by :func:`build` and
    :func:`jaxaigc.train.loop.train`) with what generation needs beside it, read from the
    checkpoint's run config: the EMA parameters when the run kept them
    (:func:`jaxaigc.train.checkpoint.load_trained`), the cached pairs (their tokenizer encodes
    captions) and the dVAE that decodes the image tokens.

    Returns:
      ``(model, params, pairs, dvae, run_config)``, ``dvae`` = ``(config, variables)``.
    """

    def init_fn(config: dict):
        return _init_fn(DALLE(model_config(ml_collections.ConfigDict(config))))

    try:
        config, variables, _ = checkpoint.load_trained(workdir, init_fn, step=step, device=device)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no DALL-E checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`python experiments/dalle/train_dalle.py --workdir {workdir}`"
        ) from error
    config = ml_collections.ConfigDict(config)
    pairs, dvae = _pairs_and_dvae(config)
    return DALLE(model_config(config)), variables["params"], pairs, dvae, config


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
    """The CLIP trained in ``workdir`` (:func:`jaxaigc.pipelines.clip.load_trained`)."""
    model, variables, _ = clip_pipeline.load_trained(workdir)
    return Reranker(model, variables)
