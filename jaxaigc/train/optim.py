"""Optimizer factory: AdamW with masked weight decay, warmup + cosine schedule, clipping, and
optionally one such optimizer per top-level parameter subtree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

# Parameters named like this are never decayed: every vector-shaped parameter that is not a weight
# matrix, as open_clip exempts all parameters with fewer than 2 dimensions (biases, norm scales,
# CLIP's temperature and class token, SigLIP's logit bias), and the CLIP statistics of Karlo's
# prior, held fixed (the prior loss stops their gradient; decay alone would shrink them).
NO_DECAY_NAMES = frozenset(
    {"bias", "scale", "logit_scale", "logit_bias", "class_embedding", "clip_mean", "clip_std"}
)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (kernels and embeddings).

    Decided by name, not rank, because scanned layers give biases a leading ``layers`` axis.
    """

    def decays(path, _) -> bool:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not names or names[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(
    *, peak_lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to ``peak_lr * end_lr_ratio``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak_lr * end_lr_ratio,
    )


def make_optimizer(
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    end_lr_ratio: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    lr_scales: Mapping[str, float] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay masked by :func:`decay_mask`) after global-norm clipping.

    With ``lr_scales`` (``{name: scale}`` over the top-level keys of the parameters) each of those
    subtrees is optimised on its own: clipped to its own global norm, its rate ``peak_lr * scale``
    (PPO's policy and value: one network's gradient no longer sets the other's step). The
    schedule returned is the unscaled one.
    """
    if lr_scales is not None:
        options = dict(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            end_lr_ratio=end_lr_ratio,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
        )
        groups = {
            name: make_optimizer(peak_lr=peak_lr * scale, **options)[0]
            for name, scale in lr_scales.items()
        }

        def labels(params: Any) -> dict:
            if set(params) != set(lr_scales):
                raise ValueError(
                    f"lr_scales names {sorted(lr_scales)}; the parameters' top-level keys are "
                    f"{sorted(params)}"
                )
            return {name: name for name in params}

        _, schedule = make_optimizer(peak_lr=peak_lr, **options)
        return optax.multi_transform(groups, labels), schedule
    schedule = make_schedule(
        peak_lr=peak_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_lr_ratio=end_lr_ratio,
    )
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw), schedule
    return adamw, schedule
