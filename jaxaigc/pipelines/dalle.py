"""DALL-E (Ramesh et al. 2021) on shapes scenes read back from its run: text -> image generation
with reranking (Sec. 2.6); training: :mod:`jaxaigc.systems.dalle`.

The image tokens come from the run's ``dvae`` stage (:func:`jaxaigc.pipelines.dvae.load_trained`),
encoded once into a cached dataset (:mod:`jaxaigc.data.image_tokens`); CLIP scores come from a
CLIP run (:func:`jaxaigc.systems.clip.load_trained`). Generation draws ``candidates`` image token
grids per caption with the KV-cache sampler, decodes them with the dVAE, and orders them by a
:class:`Reranker`: CLIP's cosine similarity to the caption (the paper's), or the transformer's
own view of whether a sample binds the caption's attributes (:func:`rebinding_scores`), which
a CLIP trained on captions that rarely hinge on binding does not see.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.compile_options import apply_in_batches, jit_inference
from jaxaigc.configs import fields, stages
from jaxaigc.data import image_tokens, shapes
from jaxaigc.data.tokenizers import BPETokenizer
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


@functools.cache
def _log_likelihood_fn(model: DALLEConfig):
    """The jitted ``(params, rows int [n, text_len + image_len]) -> log p(image | text) [n]``."""

    def log_likelihood(params, rows: jax.Array) -> jax.Array:
        text, image = rows[:, : model.text_len], rows[:, model.text_len :]
        _, logits = DALLE(model).apply({"params": params}, text, image)  # [n, image_len, vocab]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, image[..., None], axis=-1)[..., 0].sum(-1)

    return jit_inference(log_likelihood)


def image_log_likelihood(
    model: DALLEConfig, params, text: np.ndarray, tokens: np.ndarray, *, batch_size: int = 1024
) -> np.ndarray:
    """log p(image tokens | caption) under the transformer, in nats: one teacher-forced forward
    pass per row, ``batch_size`` rows per call.

    Args:
      text: int [n, text_len] caption tokens; tokens: int [n, image_len] image tokens.

    Returns:
      float32 [n], the image tokens' log-probabilities summed.
    """
    text, tokens = np.asarray(text, np.int32), np.asarray(tokens, np.int32)
    if text.shape[1:] != (model.text_len,) or tokens.shape[1:] != (model.image_len,):
        raise ValueError(
            f"need text [n, {model.text_len}] and image tokens [n, {model.image_len}], got "
            f"{list(text.shape)} and {list(tokens.shape)}"
        )
    fn = _log_likelihood_fn(model)
    rows = np.concatenate([text, tokens], axis=1)
    return apply_in_batches(lambda chunk: fn(params, chunk), rows, batch_size)


def rebinding_scores(
    model: DALLEConfig,
    params,
    tokenizer: BPETokenizer,
    captions: Sequence[str],
    tokens: np.ndarray,
    *,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The transformer's log p(x | c) of each candidate x of each caption c, and log p(c | x)
    among c and its rebindings (:func:`jaxaigc.data.shapes.rebindings`: the same words bound to
    the other object or in the reversed relation) under a uniform prior over them: a Bayes
    classifier on the transformer's likelihoods, ``log p(x | c) - logsumexp_c' log p(x | c')``.
    The latter is near 0 where x shows c's binding and no other, and 0 for a caption with no
    rebinding (one object). One teacher-forced pass per (caption or rebinding, candidate).

    Args:
      captions: b captions; tokens: int [b, k, image_len], k candidates of each.

    Returns:
      ``(log p(x | c), log p(c | x))``, float32 [b, k] each.
    """
    tokens = np.asarray(tokens, np.int32)
    b, k = tokens.shape[:2]
    if len(captions) != b:
        raise ValueError(f"{len(captions)} captions for {b} rows of candidates")
    variants = [[c, *shapes.rebindings(c)] for c in captions]
    text = tokenizer.encode([v for vs in variants for v in vs], length=model.text_len, eos=True)
    owner = np.repeat(np.arange(b), [len(vs) for vs in variants])  # caption of each variant
    log_p = image_log_likelihood(
        model,
        params,
        np.repeat(text, k, axis=0),  # row v * k + j: variant v, candidate j of its caption
        tokens[owner].reshape(-1, tokens.shape[-1]),
        batch_size=batch_size,
    ).reshape(len(text), k)
    own = np.cumsum([0] + [len(vs) for vs in variants])[:-1]  # each caption's own row
    evidence = np.logaddexp.reduceat(log_p, own, axis=0)  # [b, k]
    return log_p[own].astype(np.float32), (log_p[own] - evidence).astype(np.float32)


RULES = ("clip", "likelihood", "rebinding", "rebinding+clip")


def rank_key(scores: dict[str, np.ndarray], rule: str, *, logit_scale: float = 1.0) -> np.ndarray:
    """The score float32 [b, k] that orders each caption's candidates (higher first) by ``rule``
    of :data:`RULES`:

    - ``"clip"``: CLIP's cosine of image and caption (the paper's Sec. 2.6);
    - ``"likelihood"``: the transformer's log p(x | c);
    - ``"rebinding"``: its log p(c | x) among c's rebindings (:func:`rebinding_scores`; ties at
      0 for one-object captions, left in sampling order);
    - ``"rebinding+clip"``: that plus CLIP's logit ``logit_scale * cosine``: both models'
      log-scores of the caption, summed.

    Args:
      scores: float [b, k] each, named as :meth:`Reranker.scores` names them.
    """
    if rule not in RULES:
        raise ValueError(f"unknown reranking rule {rule!r}; known: {RULES}")
    if rule == "rebinding+clip":
        return scores["rebinding"] + logit_scale * scores["clip"]
    return scores[rule]


@dataclasses.dataclass(frozen=True)
class Reranker:
    """Scores a caption's candidates with CLIP (``clip``) and the transformer that drew them
    (``model``, ``params``, ``tokenizer``), and orders them by ``rule`` (:func:`order`)."""

    rule: str
    clip: ClipFeatures | None = None
    model: DALLEConfig | None = None
    params: Any = None
    tokenizer: BPETokenizer | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown reranking rule {self.rule!r}; known: {RULES}")
        if self.rule != "likelihood" and self.clip is None:
            raise ValueError(f"reranking by {self.rule!r} needs a CLIP")
        if self.rule != "clip" and (self.model is None or self.tokenizer is None):
            raise ValueError(f"reranking by {self.rule!r} needs the transformer and its tokenizer")

    def scores(
        self, images: np.ndarray, tokens: np.ndarray, captions: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Every score the reranker has the models for, float32 [b, k] each: ``"clip"`` (cosine),
        ``"likelihood"`` and ``"rebinding"`` (:func:`rebinding_scores`).

        Args:
          images: uint8 [b, k, H, W, 3]; tokens: int [b, k, image_len], the same candidates.
        """
        out = {}
        if self.clip is not None:
            out["clip"] = self.clip.scores(images, captions)
        if self.model is not None:
            out["likelihood"], out["rebinding"] = rebinding_scores(
                self.model, self.params, self.tokenizer, captions, tokens
            )
        return out

    def rank_key(self, scores: dict[str, np.ndarray], rule: str | None = None) -> np.ndarray:
        """:func:`rank_key` by ``rule`` (the reranker's own by default)."""
        logit_scale = self.clip.logit_scale if self.clip is not None else 1.0
        return rank_key(scores, rule or self.rule, logit_scale=logit_scale)


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
    """Text -> image: ``candidates`` samples per caption, decoded and reranked.

    Args:
      model, params: the DALL-E transformer.
      text: int [b, text_len] caption tokens; captions: the same captions as text.
      dvae: ``(config, variables)`` of the dVAE whose tokens the model draws.
      reranker: scores and orders the candidates; None keeps the sampling order.
      candidates: samples per caption (the paper's N).

    Returns:
      ``images`` uint8 [b, candidates, H, W, 3] best first, ``tokens`` [b, candidates,
      image_len] and every score of :meth:`Reranker.scores` [b, candidates] in the same order,
      and ``scores`` [b, candidates], the reranker's :meth:`Reranker.rank_key` (descending;
      zeros without a reranker).
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
    out = reranker.scores(images, tokens, captions)
    out |= {"images": images, "tokens": tokens, "scores": reranker.rank_key(out)}
    order = np.argsort(-out["scores"], axis=1, kind="stable")
    take = lambda x: np.take_along_axis(x, order.reshape(b, candidates, *[1] * (x.ndim - 2)), 1)
    return {name: take(x) for name, x in out.items()}


class DalleTextToImage(TextToImage):
    """DALL-E's text -> image: N samples per caption, decoded by the dVAE and reranked by the
    run's rule (``config.sample.rerank``)."""

    recipe = "dalle"

    def __init__(self, workdir: str | Path):
        self.model, self.params, pairs, self.dvae, config = load_trained(workdir)
        self.tokenizer, self.text_len = pairs.tokenizer, config.data.text_len
        rule = config.sample.rerank
        # The transformer's scores only where the rule reads them: they need captions of the
        # shapes grammar (their rebindings), and CLIP's rule takes any caption.
        transformer = {} if rule == "clip" else {
            "model": self.model.config, "params": self.params, "tokenizer": self.tokenizer
        }  # fmt: skip
        self.reranker = Reranker(
            rule, clip=load_clip(stages.trained_run(config, workdir, "clip")), **transformer
        )
        self.sample = config.sample

    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated:
        text = self.tokenizer.encode(captions, length=self.text_len, eos=True)
        out = generate(
            self.model.config,
            self.params,
            text,
            captions,
            dvae=self.dvae,
            reranker=self.reranker,
            candidates=n,
            rng=jax.random.key(seed),
            temperature=self.sample.temperature,
            top_k=self.sample.top_k,
            top_p=self.sample.top_p,
        )
        return Generated(out["images"], out["scores"])
