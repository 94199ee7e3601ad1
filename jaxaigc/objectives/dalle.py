"""The DALL-E transformer objective (Ramesh et al. 2021, Sec. 2.2): cross-entropy of the text and
of the image tokens, each normalised by the number of tokens of its kind in the batch, weighted
1/8 (text) and 7/8 (image) since image modelling is the goal."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxaigc.objectives.autoregressive import next_token_nll


def dalle_loss_fn(
    model: nn.Module, *, text_weight: float = 1 / 8, image_weight: float = 7 / 8
) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for ``batch = {"text": int [b, T],
    "image": int [b, image_side**2]}`` and optional ``"text_weights"`` [b, T] (1 = counted).

    By default padded text positions are predicted too (the model learns where captions end);
    give ``text_weights`` to leave them out. Metrics: per-token NLL (nats) and accuracy of each
    kind, image NLL also in bits.
    """

    def loss_fn(params, batch, rng):
        text, image = batch["text"], batch["image"]
        text_logits, image_logits = model.apply(
            {"params": params}, text, image, train=True, rngs={"dropout": rng}
        )
        text_weights = batch.get("text_weights", jnp.ones(text.shape, jnp.float32))
        text_nll, text_count = next_token_nll(text_logits, text, text_weights)
        image_nll, image_count = next_token_nll(image_logits, image)
        text_loss = text_nll.sum() / jnp.maximum(text_count.sum(), 1.0)
        image_loss = image_nll.sum() / image_count.sum()
        loss = text_weight * text_loss + image_weight * image_loss
        text_correct = (text_logits.argmax(-1) == text) * text_weights
        metrics = {
            "loss": loss,
            "text_nll": text_loss,
            "image_nll": image_loss,
            "image_bits_per_token": image_loss / jnp.log(2.0),
            "text_accuracy": text_correct.sum() / jnp.maximum(text_count.sum(), 1.0),
            "image_accuracy": (image_logits.argmax(-1) == image).mean(),
        }
        return loss, metrics

    return loss_fn
