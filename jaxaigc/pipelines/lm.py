"""A byte-level GPT trained on the embedded arithmetic corpus: the smallest end-to-end run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.text import BYTE_VOCAB, TokenWindows, arithmetic_lines, encode_bytes
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.train.loop import Task, default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = default_train_config()
    config.model = ml_collections.ConfigDict(
        dataclasses.asdict(GPTConfig(vocab_size=BYTE_VOCAB, context_length=32, width=64, layers=2))
    )
    config.data = ml_collections.ConfigDict(dict(lines=20_000, seed=0))
    config.train.batch_size = 16
    config.train.steps = 200
    return config


def build(config: ml_collections.ConfigDict) -> tuple[GPT, Task, BatchIterator]:
    """The model, the task for :func:`jaxaigc.train.loop.train` and the training batches."""
    model = GPT(GPTConfig(**config.model.to_dict()))
    length = config.model.context_length
    text = "\n".join(arithmetic_lines(config.data.lines, seed=config.data.seed)) + "\n"
    windows = TokenWindows(encode_bytes(text), length, stride=length // 2, name="arithmetic")

    def init(rng: jax.Array):
        return model.init(rng, jnp.zeros((1, length), jnp.int32))

    batches = BatchIterator(windows, global_batch_size=config.train.batch_size, seed=config.seed)
    return model, Task(init=init, loss_fn=lm_loss_fn(model)), batches
