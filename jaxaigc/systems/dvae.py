"""DALL-E's discrete VAE (Ramesh et al. 2021) trained on 32 px shapes scenes and Noto emoji.

The objective and optimiser follow the paper's App. A.2, with the beta and temperature schedules
shortened to fit a run of 25,000 updates, a floor on the logit-Laplace's scale and a Gaussian
warm-up of its NLL (:mod:`jaxaigc.objectives.dvae`, :mod:`jaxaigc.configs.dvae`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections

from jaxaigc.configs import fields
from jaxaigc.data import builders, image_text
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.models.dvae import DVAEConfig, init_train_variables
from jaxaigc.objectives.dvae import DVAEObjectiveConfig, make_loss_fn
from jaxaigc.train import loop


@dataclasses.dataclass(frozen=True)
class ImagesOnly(grain.transforms.Map):
    """``{"image": [h, w, c], ...}`` -> ``{"images": [h, w, c]}``: captions are not trained on."""

    def map(self, element: dict) -> dict:
        return {"images": element["image"]}


def training_source(config: ml_collections.ConfigDict) -> image_text.Concatenate:
    """Shapes scenes and emoji of the train splits, uint8 at ``config.data.resolution``."""
    data = config.data
    sources = []
    if data.shapes:
        sources.append(
            image_text.shapes_source(data.shapes, data.resolution, seed=config.seed, split="train")
        )
    if data.emoji_repeats:
        emoji = builders.load(
            "emoji", split="train", data_dir=data.data_dir, resolution=data.resolution
        )
        sources.extend([emoji] * data.emoji_repeats)
    if not sources:
        raise ValueError("config.data selects no training data")
    return image_text.Concatenate(sources)


def make_task(config: ml_collections.ConfigDict) -> tuple[DVAEConfig, loop.Task]:
    """The model config and the task :func:`jaxaigc.train.loop.train` trains (no data read)."""
    model = fields.to_dataclass(DVAEConfig, config.model)
    objective = fields.to_dataclass(DVAEObjectiveConfig, config.objective)

    def init(rng: jax.Array) -> dict:
        return init_train_variables(model, rng)

    return model, loop.Task(init=init, loss_fn=make_loss_fn(model, objective), pass_step=True)


def batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One training example's ``{name: (shape, dtype)}``: a uint8 image."""
    side = config.data.resolution
    return {"images": ((side, side, config.model.input_channels), jnp.uint8)}


def build(config: ml_collections.ConfigDict) -> tuple[DVAEConfig, loop.Task, BatchIterator]:
    """The model config, the task for :func:`jaxaigc.train.loop.train` and the batches."""
    model, task = make_task(config)
    batches = BatchIterator(
        training_source(config),
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=[ImagesOnly()],
    )
    return model, task, batches


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    _, task, batches = build(config)
    loop.train(task, batches, config, workdir)
