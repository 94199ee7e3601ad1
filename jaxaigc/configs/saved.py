"""A run directory's ``recipe.json``: the recipe's name and the whole config it ran with, so
evaluation and inference rebuild everything from the directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

RUN_FILE = "recipe.json"


def save_run(workdir: str | Path, recipe: str, config: dict, **extra) -> None:
    """Writes ``recipe.json`` into ``workdir`` (created if needed)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe, "config": config, **extra}
    (workdir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_run(workdir: str | Path) -> tuple[str, ml_collections.ConfigDict]:
    """The recipe and config a run directory was trained with (or converted as)."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a run directory (train one with "
            "`jaxaigc train RECIPE --workdir DIR`)"
        )
    record = json.loads(path.read_text())
    return record["recipe"], ml_collections.ConfigDict(record["config"], sort_keys=False)
