"""DALL-E (Ramesh et al. 2021) on shapes scenes: the sparse transformer trained on (BPE caption
tokens, dVAE image tokens) pairs, the image tokens made by the recipe's ``dvae`` stage.

Generation and CLIP reranking: :mod:`jaxaigc.pipelines.dalle`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax.numpy as jnp
import ml_collections

from jaxaigc.configs import fields, stages
from jaxaigc.data import image_tokens
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.dvae import DVAEConfig
from jaxaigc.objectives.dalle import dalle_loss_fn
from jaxaigc.pipelines.dalle import init_fn, load_pairs
from jaxaigc.train import loop


@dataclasses.dataclass(frozen=True)
class TokensOnly(grain.transforms.Map):
    """Keeps the arrays the objective reads (the caption strings do not batch onto devices)."""

    def map(self, element: dict) -> dict:
        return {"text": element["text"], "image": element["image"]}


def check_compatible(model: DALLEConfig, pairs: image_tokens.TokenPairs, dvae: DVAEConfig) -> None:
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


def make_task(config: ml_collections.ConfigDict) -> tuple[DALLE, loop.Task]:
    """The transformer and the task :func:`jaxaigc.train.loop.train` trains (no data read)."""
    model = DALLE(fields.to_dataclass(DALLEConfig, config.model))
    return model, loop.Task(init=init_fn(model), loss_fn=dalle_loss_fn(model))


def batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One training example's ``{name: (shape, dtype)}``: caption and image token ids."""
    model = fields.to_dataclass(DALLEConfig, config.model)
    return {"text": ((model.text_len,), jnp.int32), "image": ((model.image_len,), jnp.int32)}


def build(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[DALLE, loop.Task, BatchIterator, image_tokens.TokenPairs, tuple]:
    """The model, its task, the training batches, the cached pairs and the dVAE
    ``(config, variables)`` that made them (the ``dvae`` stage of the run in ``workdir``)."""
    model, task = make_task(config)
    pairs, (dvae_config, dvae_variables) = load_pairs(config, workdir)
    check_compatible(model.config, pairs, dvae_config)
    batches = BatchIterator(
        pairs.splits["train"],
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=[TokensOnly()],
    )
    return model, task, batches, pairs, (dvae_config, dvae_variables)


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    # The evaluation reranks with the clip stage: missing, it fails before training, not after.
    stages.trained_run(config, workdir, "clip")
    _, task, batches, _, _ = build(config, workdir)
    loop.train(task, batches, config, workdir)
