"""Input pipelines on grain: one global record order, read by each process for its own rows.

Global batch ``s`` is positions ``[s B, (s + 1) B)`` of a grain ``IndexSampler`` over the whole
source (reshuffled every epoch), so it depends on the seed and ``s`` alone, never on the number of
processes. A process reads only the rows its devices hold (``select_rows``, from
:func:`jaxaigc.parallel.process_rows`); random ops draw from the generator grain gives each
position. The position is saved in those global terms, so any number of processes resumes it.
:class:`ArrayRecords` is the source for arrays computed in memory (CLIP features, tokenised text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

# A run of this many unreadable records is a broken dataset, not noise: an error.
MAX_CONSECUTIVE_CORRUPT = 100


class CorruptRecord(ValueError):
    """A record whose image or text cannot be decoded: :class:`BatchIterator` reads the next
    one in its place and counts it."""


class DataStateMismatch(ValueError):
    """A saved data position belongs to another global batch size, seed or dataset."""


class ArrayRecords:
    """Row ``i`` of each named array as one record: an in-memory random-access source."""

    def __init__(self, arrays: dict[str, np.ndarray], *, name: str):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{name}: arrays of different lengths {sorted(lengths)}")
        self.arrays, self.name = arrays, name

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[index] for key, value in self.arrays.items()}

    def __repr__(self) -> str:  # names the dataset in the saved data position
        return f"ArrayRecords({self.name!r}, n={len(self)})"


class BatchIterator:
    """This process's rows of the global batches of a random-access source.

    ``get_state`` / ``set_state`` save and restore the position as JSON (batches consumed, with
    the settings that define the order), so a resumed run continues with exactly the next global
    batch, on any number of processes. The source needs a stable ``repr`` (it names the dataset
    in the state).
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
        if len(source) < global_batch_size:
            raise ValueError(
                f"the source has {len(source)} records, fewer than one global batch "
                f"({global_batch_size})"
            )
        for op in operations:
            if not isinstance(op, (grain.transforms.Map, grain.transforms.RandomMap)):
                raise TypeError(
                    f"operation {op!r} is not a grain Map or RandomMap: a record must stay one "
                    "row of its global batch"
                )
        self.source, self.operations = source, tuple(operations)
        self.global_batch_size = global_batch_size
        # grain's own sampler, unsharded: position -> record key and a generator seeded by it.
        self._sampler = grain.samplers.IndexSampler(
            len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed
        )
        self._settings = {
            "global_batch_size": global_batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "num_epochs": num_epochs,
            "dataset": repr(source),
            "records": len(source),
        }
        self.rows = np.arange(global_batch_size)
        self.batches_consumed = 0
        self.skipped_records = 0  # corrupt records this process skipped (not saved)

    def select_rows(self, rows: np.ndarray) -> None:
        """Reads only these rows of every global batch from now on (this process's)."""
        rows = np.asarray(rows)
        if (
            rows.ndim != 1
            or rows.size == 0
            or rows.min() < 0
            or rows.max() >= self.global_batch_size
        ):
            raise ValueError(
                f"rows {rows} are not indices into a global batch of {self.global_batch_size}"
            )
        self.rows = rows

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        start = self.batches_consumed * self.global_batch_size
        if start + self.global_batch_size > len(self._sampler):
            raise StopIteration
        batch = [self._read(start + int(row)) for row in self.rows]
        self.batches_consumed += 1
        return jax.tree.map(lambda *rows: np.stack(rows), *batch)

    def _read(self, position: int) -> Any:
        metadata = self._sampler[position]
        element = self._record(metadata.record_key)
        for op in self.operations:
            if isinstance(op, grain.transforms.RandomMap):
                element = op.random_map(element, metadata.rng)
            else:
                element = op.map(element)
        return element

    def _record(self, key: int) -> Any:
        """Record ``key``, or when it is corrupt (the source raises ``CorruptRecord``) the next
        readable one in key order: the same on every process, and counted."""
        for offset in range(MAX_CONSECUTIVE_CORRUPT):
            try:
                return self.source[(key + offset) % len(self.source)]
            except CorruptRecord as error:
                self.skipped_records += 1
                last = error
        raise CorruptRecord(
            f"{MAX_CONSECUTIVE_CORRUPT} records in a row from key {key} are corrupt; the last: "
            f"{last}"
        )

    def get_state(self) -> dict:
        return {"batches_consumed": self.batches_consumed, **self._settings}

    def set_state(self, state: dict) -> None:
        """Continues after ``state["batches_consumed"]`` global batches.

        Raises DataStateMismatch naming the setting that differs if the state was written for
        another global batch size, seed, shuffle, epoch count or dataset.
        """
        if "batches_consumed" not in state:
            raise DataStateMismatch(
                "the saved data position is in grain's per-process format (a checkpoint from "
                "before global batches); continue it with the jaxaigc version that wrote it, or "
                "start a fresh workdir"
            )
        saved = {key: state.get(key) for key in self._settings}
        differ = [key for key, value in self._settings.items() if saved[key] != value]
        if differ:
            shown = "; ".join(f"{k}: saved {saved[k]!r}, now {self._settings[k]!r}" for k in differ)
            raise DataStateMismatch(
                f"the saved data position cannot continue this input pipeline ({shown})"
            )
        self.batches_consumed = int(state["batches_consumed"])
