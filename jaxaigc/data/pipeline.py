"""grain input pipelines: seeded shuffling, per-process sharding, batching, resumable position."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grain
import jax


class BatchIterator:
    """Host-local batches of a random-access source, reshuffled every epoch.

    Each process reads only its own ``1 / process_count`` of the records and yields
    ``global_batch_size / process_count`` rows per batch. ``get_state`` / ``set_state`` save and
    restore the position as JSON, so a resumed run continues with exactly the next batch.
    The source must have a stable ``repr`` (grain checks it on restore).
    """

    def __init__(
        self,
        source: Any,
        *,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        operations: Sequence[Any] = (),
    ):
        processes = jax.process_count()
        if global_batch_size % processes:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by {processes} processes"
            )
        self.local_batch_size = global_batch_size // processes
        if len(source) < global_batch_size:
            raise ValueError(
                f"the source has {len(source)} records, fewer than one global batch "
                f"({global_batch_size})"
            )
        sampler = grain.samplers.IndexSampler(
            len(source),
            shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
            shuffle=shuffle,
            num_epochs=num_epochs,
            seed=seed,
        )
        loader = grain.DataLoader(
            data_source=source,
            sampler=sampler,
            operations=[*operations, grain.transforms.Batch(self.local_batch_size, True)],
            worker_count=0,
        )
        self._iterator = iter(loader)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)

    def get_state(self) -> dict:
        return json.loads(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(json.dumps(state, indent=4).encode())
