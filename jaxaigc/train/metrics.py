"""Metrics to JSON lines and TensorBoard (written by process 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    Appending keeps the history of a resumed run in one file.
    """

    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._jsonl = self.path.open("a")
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    with (Path(workdir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
