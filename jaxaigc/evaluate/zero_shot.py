"""Zero-shot evaluation of contrastive models (Radford et al. 2021, section 3.1.4).

A class is represented by the mean of its normalised prompt embeddings over a template ensemble
("a photo of a {}."), renormalised; an image is assigned the class whose weight it is most
similar to. Retrieval scores image<->text pairs by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxaigc.compile_options import apply_in_batches
from jaxaigc.objectives.contrastive import l2_normalize

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
)


def class_weights(
    encode_text: Callable[[np.ndarray], jax.Array],
    tokenize: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 1024,
) -> jax.Array:
    """Normalised class embeddings [d, num_classes] from a prompt-template ensemble.

    Args: encode_text maps token ids [n, t] to embeddings [n, d], called on ``batch_size``
    prompts at a time; tokenize maps strings to ids.
    """
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and template")
    prompts = [t.format(name) for name in class_names for t in templates]
    embeddings = apply_in_batches(encode_text, np.asarray(tokenize(prompts)), batch_size)
    embeddings = l2_normalize(embeddings.reshape(len(class_names), len(templates), -1))
    return l2_normalize(embeddings.mean(1)).T


def topk_accuracy(
    logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Fraction of rows whose label is among the ``k`` largest logits, for each k."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    hits = ranked == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(1).mean()) for k in ks}


def classify(
    image_embeddings: jax.Array, weights: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of images [n, d] against class weights [d, c] with integer labels [n]."""
    return topk_accuracy(l2_normalize(image_embeddings) @ weights, labels, ks)


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
