"""``config.stages``: a recipe's stages in order, each with the run directory it is trained in
or read from, relative to the recipe's workdir (``"../clip"``: another recipe's run beside it)."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections


def stage_dir(config: ml_collections.ConfigDict, workdir: str | Path, stage: str) -> Path:
    """Where ``stage`` of the run in ``workdir`` lives (an absolute path in the config is kept)."""
    if stage not in config.stages:
        raise ValueError(f"the recipe has no stage {stage!r}; its stages: {list(config.stages)}")
    # normpath, not resolve: "runs/dalle/../clip" must work before runs/dalle exists.
    return Path(os.path.normpath(Path(workdir) / config.stages[stage]))


def trained_run(config: ml_collections.ConfigDict, workdir: str | Path, stage: str) -> Path:
    """The run ``stage`` reads from another recipe; it must hold checkpoints."""
    path = stage_dir(config, workdir, stage)
    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"stage {stage!r} reads the run in {path}, which has no checkpoints: train it with "
            f"`jaxaigc train {stage} --workdir {path}` or set --config.stages.{stage}=DIR"
        )
    return path
