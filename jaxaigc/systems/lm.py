"""A byte-level GPT trained on the embedded arithmetic corpus: the smallest end-to-end run."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxaigc.configs import fields
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.text import TokenWindows, arithmetic_lines, encode_bytes
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.train import checkpoint, loop


def _init_fn(model: GPT):
    def init(rng: jax.Array):
        return model.init(rng, jnp.zeros((1, model.config.context_length), jnp.int32))

    return init


def make_task(config: ml_collections.ConfigDict) -> tuple[GPT, loop.Task]:
    """The model and the task :func:`jaxaigc.train.loop.train` trains (no data is read)."""
    model = GPT(fields.to_dataclass(GPTConfig, config.model))
    return model, loop.Task(init=_init_fn(model), loss_fn=lm_loss_fn(model))


def batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One training example's ``{name: (shape, dtype)}``: a window of context + 1 bytes."""
    return {"tokens": ((config.model.context_length + 1,), jnp.int32)}


def build(config: ml_collections.ConfigDict) -> tuple[GPT, loop.Task, BatchIterator]:
    """The model, the task for :func:`jaxaigc.train.loop.train` and the training batches."""
    model, task = make_task(config)
    length = config.model.context_length
    text = "\n".join(arithmetic_lines(config.data.lines, seed=config.data.seed)) + "\n"
    windows = TokenWindows(encode_bytes(text), length, stride=length // 2, name="arithmetic")
    batches = BatchIterator(windows, global_batch_size=config.train.batch_size, seed=config.seed)
    return model, task, batches


def load_trained(workdir: str | Path) -> tuple[GPT, dict]:
    """The GPT trained in ``workdir`` and its evaluation parameters."""

    model, variables, _, _ = checkpoint.load_model(
        workdir,
        lambda run_config: GPT(fields.to_dataclass(GPTConfig, run_config["model"])),
        _init_fn,
        what="LM",
        train_command=f"jaxaigc train lm --workdir {workdir}",
    )
    return model, variables["params"]


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    _, task, batches = build(config)
    loop.train(task, batches, config, workdir)
