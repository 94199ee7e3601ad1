"""DALL-E's discrete VAE (Ramesh et al. 2021) trained on 32 px shapes scenes and Noto emoji.

A small :class:`~jaxaigc.models.dvae.DVAEConfig`: three groups (two 2x2 pools) turn a 32 px image
into 8 x 8 tokens from a 512-code vocabulary. The objective and optimiser follow the paper's
App. A.2, with the beta and temperature schedules shortened to fit a run of a few thousand updates.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grain
import jax
import ml_collections

from jaxaigc.data import builders, image_text
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.models.dvae import DVAEConfig, as_dvae_variables, init_train_variables
from jaxaigc.objectives.dvae import DVAEObjectiveConfig, make_loss_fn
from jaxaigc.train import checkpoint
from jaxaigc.train.loop import Task, default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = default_train_config()
    model = DVAEConfig(n_hid=32, n_blk_per_group=1, group_count=3, vocab_size=512, n_init=64)
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    # The paper anneals beta 0 -> 6.6 over 5k and the temperature 1 -> 1/16 over 150k of its
    # 3M updates; here both finish within the run so the decoder ends up trained on nearly
    # one-hot codes, the argmax tokens that encode() produces.
    objective = DVAEObjectiveConfig(beta_steps=500, temperature_steps=2_000)
    config.objective = ml_collections.ConfigDict(dataclasses.asdict(objective))
    config.data = ml_collections.ConfigDict(
        dict(
            resolution=32,
            shapes=20_000,  # procedural scenes of the train split
            emoji_repeats=4,  # the ~1,230 training emoji, repeated to weigh them up
            data_dir=ml_collections.FieldReference(None, field_type=str),
        )
    )
    # AdamW as in the paper (b2 0.999, eps 1e-8, wd 1e-4), at a higher peak rate for a short run.
    config.optim.update(dict(peak_lr=1e-3, warmup_steps=50, end_lr_ratio=0.0125, weight_decay=1e-4))
    config.train.update(dict(steps=2_000, batch_size=64, log_every=50, checkpoint_every=500))
    return config


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


def objective_config(config: ml_collections.ConfigDict) -> DVAEObjectiveConfig:
    return DVAEObjectiveConfig(**config.objective.to_dict())


def build(config: ml_collections.ConfigDict) -> tuple[DVAEConfig, Task, BatchIterator]:
    """The model config, the task for :func:`jaxaigc.train.loop.train` and the batches."""
    model = DVAEConfig(**config.model.to_dict())
    objective = objective_config(config)

    def init(rng: jax.Array) -> dict:
        return init_train_variables(model, rng)

    batches = BatchIterator(
        training_source(config),
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=[ImagesOnly()],
    )
    task = Task(init=init, loss_fn=make_loss_fn(model, objective), pass_step=True)
    return model, task, batches


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[DVAEConfig, dict, int]:
    """The dVAE trained in ``workdir`` (by :func:`build` and :func:`jaxaigc.train.loop.train`),
    for encoding images to tokens and decoding tokens to images: the EMA parameters when the run
    kept them, on ``device`` (:func:`jaxaigc.train.checkpoint.load_trained`).

    Returns:
      ``(model, variables, step)``: the model config from the checkpoint's run config, the
      variables ``{"encoder": {"params"}, "decoder": {"params"}}`` that
      :func:`jaxaigc.models.dvae.encode` and ``decode`` take, and the checkpoint's step.
    """

    def init_fn(config: dict):
        return functools.partial(init_train_variables, DVAEConfig(**config["model"]))

    try:
        config, variables, step = checkpoint.load_trained(
            workdir, init_fn, step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no dVAE checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`python experiments/dvae/train_dvae.py --workdir {workdir}`"
        ) from error
    return DVAEConfig(**config["model"]), as_dvae_variables(variables["params"]), step
