"""Next-token prediction (the language-model and DALL-E transformer objective)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxaigc.train.step import LOSS_WEIGHT


def next_token_nll(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-example summed negative log-likelihood and token counts.

    Args: logits [b, t, v]; targets int [b, t]; weights [b, t] (1 = counted), default all ones.
    Returns: (nll [b], count [b]).
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
    return (nll * weights).sum(-1), weights.sum(-1)


def lm_loss_fn(model: nn.Module) -> Callable:
    """``loss_fn(params, batch, rng)`` for ``batch = {"tokens": int32 [b, t + 1]}`` (optional
    ``"weights"`` [b, t]; ``"segments"`` int [b, t + 1] for packed rows of a model that takes
    them, e.g. :class:`jaxaigc.models.gpt.GPT`): mean next-token NLL over counted tokens, whose
    number it reports as ``LOSS_WEIGHT`` (gradient accumulation weighs microbatches by it)."""

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]
        packed = {"segments": batch["segments"][:, :-1]} if "segments" in batch else {}
        logits = model.apply(
            {"params": params}, tokens[:, :-1], train=True, rngs={"dropout": rng}, **packed
        )
        targets = tokens[:, 1:]
        weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
        nll, count = next_token_nll(logits, targets, weights)
        total = jnp.maximum(count.sum(), 1.0)
        loss = nll.sum() / total
        accuracy = ((logits.argmax(-1) == targets) * weights).sum() / total
        return loss, {"nll": loss, "accuracy": accuracy, LOSS_WEIGHT: count.sum()}

    return loss_fn
