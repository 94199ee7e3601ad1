"""A CLIP as a feature extractor (Radford et al. 2021): images, pooled text and per-token text.

One class serves DALL-E's reranking, unCLIP's prior and decoder inputs, zero-shot classification
and the evaluators. Every encoder is jitted once and fed fixed-size batches, so any number of
inputs compiles one program per shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.compile_options import apply_in_batches, jit_inference
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP
from jaxaigc.systems.clip import load_trained

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipFeatures:
    """Unit-norm CLIP embeddings of images and captions, and the per-token text features."""

    def __init__(
        self,
        model: CLIP,
        variables: dict,
        *,
        tokenizer: ClipTokenizer | None = None,
        batch_size: int | None = 256,
    ):
        self.model, self.config = model, model.config
        self.tokenizer = tokenizer or ClipTokenizer()
        self.batch_size = batch_size  # inputs per call; None: all in one call
        self._image = jit_inference(
            lambda x: _unit(model.apply(variables, x, method="encode_image"))
        )

        def text(tokens):
            pooled, per_token = model.apply(variables, tokens, method="text_features")
            return _unit(pooled), per_token

        self._text = jit_inference(text)
        self.logit_scale = float(np.exp(variables["params"]["logit_scale"]))

    @property
    def image_size(self) -> int:
        return self.config.image_resolution

    def tokenize(self, captions: Sequence[str], *, length: int | None = None) -> np.ndarray:
        """int32 [b, length] (the CLIP context by default; long captions keep their EOT)."""
        length = length or self.config.context_length
        if not 1 <= length <= self.config.context_length:
            raise ValueError(
                f"text length {length} is outside [1, {self.config.context_length}], the CLIP "
                "context length"
            )
        tokens = self.tokenizer.encode(list(captions), context_length=length, truncate=True)
        return np.asarray(tokens, np.int32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, r, r, 3] at CLIP's resolution -> unit-norm embeddings float32 [b, d]."""
        r = self.image_size
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (r, r, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [b, {r}, {r}, 3] for this CLIP, got "
                f"{images.dtype}{list(images.shape)}"
            )
        # clip_ops at the native resolution: the resize and the centre crop are identities.
        return self.encode_pixels((images.astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Images already through CLIP's preprocessing (:func:`jaxaigc.data.preprocess.clip_ops`),
        float [b, r, r, 3] -> unit-norm embeddings float32 [b, d]."""
        pixels = np.asarray(pixels, np.float32)
        return apply_in_batches(self._image, pixels, self.batch_size or len(pixels))

    def encode_text(self, captions: Sequence[str], *, length: int | None = None) -> np.ndarray:
        """Captions -> unit-norm embeddings float32 [b, d]."""
        tokens = self.tokenize(captions, length=length)
        return apply_in_batches(lambda t: self._text(t)[0], tokens, self.batch_size or len(tokens))

    def text_features(self, captions: Sequence[str], *, length: int) -> dict[str, np.ndarray]:
        """What unCLIP conditions on: ``tokens`` int32 [b, length], ``text_embedding`` float32
        [b, d] (unit norm), ``text_tokens`` float32 [b, length, width] and ``text_mask`` bool
        [b, length] (SOT..EOT)."""
        tokens = self.tokenize(captions, length=length)
        pooled, per_token = apply_in_batches(self._text, tokens, self.batch_size or len(tokens))
        # Causal attention: positions up to the end-of-text token (the largest id) read the caption.
        mask = np.arange(length) <= np.argmax(tokens, axis=-1)[:, None]
        return {
            "tokens": tokens,
            "text_embedding": pooled,
            "text_tokens": per_token,
            "text_mask": mask,
        }

    def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of images uint8 [b, n, r, r, 3] to their captions [b] -> [b, n]."""
        images = np.asarray(images)
        if images.ndim != 5 or len(images) != len(captions):
            raise ValueError(
                f"images must be [captions, candidates, r, r, 3] for {len(captions)} captions, "
                f"got {list(images.shape)}"
            )
        b, n = images.shape[:2]
        image = self.encode_images(images.reshape(b * n, *images.shape[2:])).reshape(b, n, -1)
        return np.einsum("bnd,bd->bn", image, self.encode_text(captions))

    def class_embeddings(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """Unit-norm class embeddings float32 [len(labels), d]: the normalised mean of each
        label's prompt embeddings (CLIP's prompt ensembling, Radford et al. 2021, 3.1.4)."""
        templates = tuple(templates or DEFAULT_TEMPLATES)
        if not labels or any("{}" not in t for t in templates):
            raise ValueError(
                f"zero-shot classes need at least one label and a {{}} in every template; got "
                f"{len(labels)} labels and templates {templates}"
            )
        prompts = [t.format(label) for label in labels for t in templates]
        text = self.encode_text(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
        return text / np.linalg.norm(text, axis=-1, keepdims=True)

    def classify(
        self,
        images: np.ndarray,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Zero-shot probabilities float32 [b, len(labels)] of uint8 images, the logits CLIP's
        ``exp(logit_scale) * cosine`` to :meth:`class_embeddings`."""
        classes = self.class_embeddings(labels, templates)
        logits = self.logit_scale * self.encode_images(images) @ classes.T
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def load_clip(path: str | Path, *, batch_size: int | None = 256) -> ClipFeatures:
    """The CLIP of a run directory: one trained by ``jaxaigc train clip`` or written by
    ``jaxaigc convert clip`` (the EMA weights when the run kept them)."""
    model, variables, _ = load_trained(path)
    return ClipFeatures(model, variables, batch_size=batch_size)
