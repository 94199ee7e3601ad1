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

    model, variables, step, _ = checkpoint.load_model(
        workdir,
        lambda run_config: fields.to_dataclass(DVAEConfig, run_config["model"]),
        lambda model: functools.partial(init_train_variables, model),
        what="dVAE",
        train_command=f"jaxaigc train dvae --workdir {workdir}",
        step=step,
        device=device,
    )
    return model, as_dvae_variables(variables["params"]), step
