"""Zero-shot measures of contrastive models (Radford et al. 2021, section 3.1.4): top-k accuracy
of class scores, and image<->text retrieval recall by cosine similarity. The class embeddings
(prompt ensembling) are :meth:`jaxaigc.pipelines.clip.ClipFeatures.class_embeddings`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxaigc.objectives.contrastive import l2_normalize

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
)


def topk_accuracy(
    logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Fraction of rows whose label is among the ``k`` largest logits, for each k."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    hits = ranked == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(1).mean()) for k in ks}


def retrieval_recall(
    image_embeddings: jax.Array, text_embeddings: jax.Array, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways for paired rows (image ``i`` belongs with text ``i``)."""
    similarity = np.asarray(l2_normalize(image_embeddings) @ l2_normalize(text_embeddings).T)
    labels = np.arange(similarity.shape[0])
    i2t = topk_accuracy(similarity, labels, ks)
    t2i = topk_accuracy(similarity.T, labels, ks)
    return {
        **{f"image_to_text_R@{k}": i2t[f"top{k}"] for k in ks},
        **{f"text_to_image_R@{k}": t2i[f"top{k}"] for k in ks},
    }
