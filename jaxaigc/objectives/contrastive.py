"""Contrastive image-text objectives: CLIP's symmetric InfoNCE (Radford et al. 2021) and the
pairwise sigmoid loss of SigLIP (Zhai et al. 2023), both sharded over the batch.

With a mesh whose batch axes (``data``, ``fsdp``) have more than one device, each device gathers
the embeddings of the whole global batch and scores only its own rows against them, so no device
ever holds the full ``n x n`` logit matrix; the gradient flows back through the gather (its
transpose is a reduce-scatter). Without such a mesh the same formula runs densely. Both give the
loss over the *global* batch.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxaigc import parallel


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` scaled to unit Euclidean norm (computed in float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _batch_axes() -> tuple[str, ...]:
    """Mesh axes of the ambient mesh that shard the batch and have more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def _sharded(local_rows: Callable, *args: jax.Array) -> jax.Array:
    """Sum of ``local_rows(offset, *local, *gathered)`` over the batch shards.

    ``args`` are [n, ...] arrays sharded on dim 0 over the batch axes (replicated scalars go in
    as shape-[] arrays). ``local_rows`` gets this shard's row offset, the local slices and the
    all-gathered arrays, and returns the summed loss of the local rows.
    """
    axes = _batch_axes()
    if not axes:
        return local_rows(0, *args, *args)

    def per_shard(*local):
        gathered = [
            x if x.ndim == 0 else jax.lax.all_gather(x, axes, axis=0, tiled=True) for x in local
        ]
        rows = next(x for x in local if x.ndim > 0).shape[0]
        offset = jax.lax.axis_index(axes) * rows
        return jax.lax.psum(local_rows(offset, *local, *gathered), axes)

    specs = tuple(P() if x.ndim == 0 else P(axes) for x in args)
    return jax.shard_map(per_shard, in_specs=specs, out_specs=P())(*args)


def clip_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch; pair ``i`` is image ``i`` with text ``i``.

    Args: image_embeddings, text_embeddings [n, d] (normalised here); logit_scale: the learned
    log temperature (the train step keeps it in ``models.clip.LOGIT_SCALE_RANGE``).
    Returns: (loss, metrics) with the image->text and text->image losses and top-1 accuracies.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    images, texts = l2_normalize(image_embeddings), l2_normalize(text_embeddings)
    n = images.shape[0]

    def local_rows(offset, images_local, texts_local, _scale, images_all, texts_all, scale_all):
        labels = offset + jnp.arange(images_local.shape[0])
        i2t = scale_all * images_local @ texts_all.T  # [n_local, n]
        t2i = scale_all * texts_local @ images_all.T
        ce = optax.softmax_cross_entropy_with_integer_labels
        return jnp.stack(
            [
                ce(i2t, labels).sum(),
                ce(t2i, labels).sum(),
                (i2t.argmax(-1) == labels).sum().astype(jnp.float32),
                (t2i.argmax(-1) == labels).sum().astype(jnp.float32),
            ]
        )

    i2t_loss, t2i_loss, i2t_hits, t2i_hits = _sharded(local_rows, images, texts, scale) / n
    loss = (i2t_loss + t2i_loss) / 2
    return loss, {
        "loss_i2t": i2t_loss,
        "loss_t2i": t2i_loss,
        "acc_i2t": i2t_hits,
        "acc_t2i": t2i_hits,
        "logit_scale": scale,
    }


def sigmoid_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP: every image-text pair is a binary match / non-match, summed over texts and
    averaged over images of the global batch.

    Args: embeddings [n, d] (normalised here); logit_scale (log temperature, as for
    :func:`clip_loss`) and logit_bias, scalars.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    bias = logit_bias.astype(jnp.float32)
    images, texts = l2_normalize(image_embeddings), l2_normalize(text_embeddings)
    n = images.shape[0]

    def local_rows(offset, images_local, _texts, _s, _b, _images, texts_all, scale_all, bias_all):
        logits = scale_all * images_local @ texts_all.T + bias_all  # [n_local, n]
        rows = offset + jnp.arange(images_local.shape[0])
        signs = jnp.where(rows[:, None] == jnp.arange(n)[None, :], 1.0, -1.0)
        return -jax.nn.log_sigmoid(signs * logits).sum()

    loss = _sharded(local_rows, images, texts, scale, bias) / n
    return loss, {"logit_scale": scale, "logit_bias": bias}


def clip_loss_fn(model: nn.Module, *, loss: str = "softmax", text_pairs: float = 0.0) -> Callable:
    """The stateful objective ``loss_fn(params, model_state, batch, rng)`` of a CLIP model.

    ``batch = {"image": float [n, r, r, 3], "tokens": int32 [n, t]}``; ``model_state`` holds the
    ResNet's ``batch_stats`` (empty for a ViT). ``loss`` is ``"softmax"`` (CLIP's InfoNCE) or
    ``"sigmoid"`` (SigLIP; the model needs a ``logit_bias`` parameter). ``text_pairs`` > 0 adds
    that times InfoNCE between the text embeddings of ``batch["pair_a"]`` and ``["pair_b"]``
    (int32 [n, t]; :class:`jaxaigc.data.image_text.TextPairs`).
    """
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown contrastive loss {loss!r}; use 'softmax' or 'sigmoid'")

    def loss_fn(params, model_state, batch, rng):
        del rng  # CLIP uses no dropout
        (images, texts, logit_scale), updates = model.apply(
            {"params": params, **model_state},
            batch["image"],
            batch["tokens"],
            train=True,
            method="encode",
            mutable=list(model_state),
        )
        if loss == "softmax":
            value, metrics = clip_loss(images, texts, logit_scale)
        else:
            value, metrics = sigmoid_loss(images, texts, logit_scale, params["logit_bias"])
        if text_pairs:
            pairs = jnp.concatenate([batch["pair_a"], batch["pair_b"]])
            a, b = jnp.split(
                model.apply({"params": params, **model_state}, pairs, method="encode_text"), 2
            )
            pair_loss, _ = clip_loss(a, b, logit_scale)
            value = value + text_pairs * pair_loss
            metrics = {**metrics, "loss_text_pairs": pair_loss}
        return value, (metrics, {**model_state, **updates})

    return loss_fn
