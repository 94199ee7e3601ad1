"""A trained dVAE (Ramesh et al. 2021) read back from its run: images to tokens and back with
:func:`jaxaigc.models.dvae.encode` and ``decode`` (training: :mod:`jaxaigc.systems.dvae`)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from jaxaigc.configs import fields
from jaxaigc.models.dvae import DVAEConfig, as_dvae_variables, init_train_variables
from jaxaigc.train import checkpoint


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[DVAEConfig, dict, int]:
    """The dVAE trained in ``workdir`` (by :func:`jaxaigc.systems.dvae.train`), for encoding
    images to tokens and decoding tokens to images: the EMA parameters when the run kept them,
    on ``device`` (:func:`jaxaigc.train.checkpoint.load_trained`).

    Returns:
      ``(model, variables, step)``: the model config from the checkpoint's run config, the
      variables ``{"encoder": {"params"}, "decoder": {"params"}}`` that
      :func:`jaxaigc.models.dvae.encode` and ``decode`` take, and the checkpoint's step.
    """

    def init_fn(config: dict):
        return functools.partial(
            init_train_variables, fields.to_dataclass(DVAEConfig, config["model"])
        )

    try:
        config, variables, step = checkpoint.load_trained(
            workdir, init_fn, step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no dVAE checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`jaxaigc train dvae --workdir {workdir}`"
        ) from error
    model = fields.to_dataclass(DVAEConfig, config["model"])
    return model, as_dvae_variables(variables["params"]), step
