"""Your own InstructGPT data (Ouyang et al. 2022) as JSONL files, one JSON object per line, read
into random-access sources of records.

Layouts (other fields of a line are ignored):

- prompts, for PPO: ``{"prompt": str}``.
- demonstrations, for SFT: ``{"prompt": str, "response": str}``; the model learns the response
  as the continuation of the prompt, text as given (no separator is added).
- comparisons, for the reward model, one of:

  - a K-way ranking: ``{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}`` with
    K >= 2 responses; ``ranking`` lists every index into ``responses`` exactly once, best first:
    ``"ranking": [2, 0, 1]`` says responses[2] > responses[0] > responses[1]. Ties have no
    layout (the paper drops them).
  - a chosen / rejected pair in the Anthropic HH-RLHF layout: ``{"chosen": str, "rejected": str}``,
    each the whole dialogue ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is the text the
    two share up to and including the last ``"\\n\\nAssistant:"`` within it; each response is
    the rest of its dialogue. With a ``"prompt"`` field beside them, ``chosen`` and ``rejected``
    are the responses themselves.

- pretraining text, for PPO-ptx: JSONL ``{"text": str}``, or any file not ending in ``.jsonl``
  read whole as one document.

Paths are patterns of :func:`jaxaigc.data.shards.expand` (comma-separated, globs, brace ranges,
local or any ``etils.epath`` URL). A line that is not JSON, lacks a field or holds a field of the
wrong kind is skipped and counted (``skipped``; ``problems`` says where and why), so a record
always comes from one line and nothing shifts; blank lines are ignored. A missing file, or a file
without a usable line, is an error naming it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxaigc.data.shards import expand

ASSISTANT = "\n\nAssistant:"  # the HH-RLHF marker before each assistant turn
SHOWN_PROBLEMS = 3  # skipped lines named in an error message


@dataclasses.dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A prompt's K responses and their ``ranking``: indices into ``responses``, best first."""

    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]


class Unusable(ValueError):
    """A line that holds no record of the file's kind (the reason is the message)."""


def _text(line: dict, key: str, *, empty: bool = True) -> str:
    if key not in line:
        raise Unusable(f"no {key!r} field")
    value = line[key]
    if not isinstance(value, str):
        raise Unusable(f"{key!r} is not a string ({type(value).__name__})")
    if not empty and not value.strip():
        raise Unusable(f"{key!r} is empty")
    return value


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """An HH-RLHF pair -> ``(prompt, chosen response, rejected response)``: the prompt is the
    shared text through the last ``"\\n\\nAssistant:"`` in it."""
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT)
    if end < 0:
        raise Unusable('"chosen" and "rejected" share no "\\n\\nAssistant:" turn')
    cut = end + len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _ranking(line: dict) -> Comparison:
    prompt = _text(line, "prompt", empty=False)
    responses, ranking = line.get("responses"), line.get("ranking")
    if not isinstance(responses, list) or len(responses) < 2:
        raise Unusable('"responses" is not a list of at least 2 strings')
    if not all(isinstance(r, str) for r in responses):
        raise Unusable('"responses" holds a value that is not a string')
    valid = isinstance(ranking, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in ranking
    )
    if not valid or sorted(ranking) != list(range(len(responses))):
        raise Unusable(
            f'"ranking" {ranking!r} is not each index 0..{len(responses) - 1} of "responses" once'
        )
    return Comparison(prompt, tuple(responses), tuple(ranking))


def _pair(line: dict) -> Comparison:
    chosen, rejected = _text(line, "chosen"), _text(line, "rejected")
    if chosen == rejected:
        raise Unusable('"chosen" and "rejected" are the same text')
    if "prompt" in line:
        prompt = _text(line, "prompt", empty=False)
    else:
        prompt, chosen, rejected = split_dialogue(chosen, rejected)
    return Comparison(prompt, (chosen, rejected), (0, 1))


class JsonlRecords(abc.ABC):
    """The records of JSONL files in file then line order (a random-access source).

    Attributes: ``paths``; ``records``; ``where`` ("path:line" of each record); ``problems``
    ("path:line: reason" of each skipped line); ``skipped`` (their number).
    """

    what = "records"

    def __init__(self, patterns: str | Sequence[str]):
        self.paths = expand(patterns)
        self.records: list[Any] = []
        self.where: list[str] = []
        self.problems: list[str] = []
        for path in self.paths:
            before, problems = len(self.records), len(self.problems)
            self._read(path)
            if len(self.records) == before:
                shown = "; ".join(self.problems[problems:][:SHOWN_PROBLEMS]) or "it is empty"
                raise ValueError(f"{path} holds no usable {self.what} line ({shown})")

    def _read(self, path) -> None:
        for number, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = self.parse(_json(line))
            except Unusable as reason:
                self.problems.append(f"{path}:{number}: {reason}")
                continue
            self.records.append(record)
            self.where.append(f"{path}:{number}")

    @abc.abstractmethod
    def parse(self, line: dict) -> Any:
        """One JSON object -> a record; raises :class:`Unusable` with the reason."""

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.paths)} files, {len(self)} records, "
            f"{self.skipped} skipped, first {self.paths[0]})"
        )


def _lines(path) -> list[bytes]:
    try:
        with path.open("rb") as f:
            return f.read().split(b"\n")
    except OSError as error:
        raise OSError(f"{path} cannot be read: {error}") from error


def _json(line: bytes) -> dict:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Unusable(f"not JSON ({error})") from error
    if not isinstance(value, dict):
        raise Unusable(f"a JSON {type(value).__name__}, not an object")
    return value


class Prompts(JsonlRecords):
    """``{"prompt"}`` lines -> the prompt strings."""

    what = "prompt"

    def parse(self, line: dict) -> str:
        return _text(line, "prompt", empty=False)


class Demonstrations(JsonlRecords):
    """``{"prompt", "response"}`` lines -> :class:`Demonstration`."""

    what = "demonstration"

    def parse(self, line: dict) -> Demonstration:
        return Demonstration(_text(line, "prompt", empty=False), _text(line, "response"))


class Comparisons(JsonlRecords):
    """K-way rankings and chosen / rejected pairs (the module docstring) -> :class:`Comparison`;
    a pair is a ranking of K = 2 with the chosen response first."""

    what = "comparison"

    def parse(self, line: dict) -> Comparison:
        if "responses" in line or "ranking" in line:
            return _ranking(line)
        if "chosen" in line or "rejected" in line:
            return _pair(line)
        raise Unusable('neither "responses" with "ranking" nor "chosen" with "rejected"')


class Texts(JsonlRecords):
    """Pretraining documents: ``{"text"}`` lines of ``.jsonl`` files, other files whole."""

    what = "text"

    def _read(self, path) -> None:
        if path.suffix == ".jsonl":
            super()._read(path)
            return
        text = b"\n".join(_lines(path)).decode("utf-8", errors="replace")
        if text.strip():
            self.records.append(text)
            self.where.append(str(path))

    def parse(self, line: dict) -> str:
        return _text(line, "text", empty=False)


def split_held_out(
    records: Sequence[Any], fraction: float, *, seed: int
) -> tuple[list[Any], list[Any]]:
    """``(kept, held_out)``: a seeded random ``fraction`` of ``records`` held out (at least one
    when ``fraction`` > 0), both in the records' order; the same records and seed give the same
    split."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1); got {fraction}")
    n = len(records)
    count = max(1, round(fraction * n)) if fraction else 0
    if count >= n:
        raise ValueError(f"holding out {count} of {n} records leaves none to train on")
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:count]] = True
    kept = [r for r, h in zip(records, held, strict=True) if not h]
    return kept, [r for r, h in zip(records, held, strict=True) if h]
