"""Embedded text for language-model runs: generated arithmetic facts, bytes as tokens.

Lines such as ``"37+48=85"`` give a corpus of any size with no download, and a skill whose
learning can be checked exactly (complete ``"a+b="``).
"""

from __future__ import annotations

import numpy as np

BYTE_VOCAB = 256
NEWLINE = ord("\n")


def is_held_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The tenth of operand pairs that never appear in training text (for generalisation)."""
    return (a + 3 * b) % 10 == 0


def arithmetic_lines(
    n: int, *, seed: int, split: str = "train", max_operand: int = 99
) -> list[str]:
    """``n`` lines ``"a+b=c"``, operands uniform on ``[0, max_operand]``.

    ``split="train"`` draws only pairs outside :func:`is_held_out`, ``"held_out"`` only inside.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'held_out'")
    rng = np.random.default_rng(seed)
    a, b = np.empty(0, np.int64), np.empty(0, np.int64)
    while len(a) < n:
        x, y = rng.integers(0, max_operand + 1, size=(2, 2 * n + 16))
        keep = is_held_out(x, y) == (split == "held_out")
        a, b = np.concatenate([a, x[keep]]), np.concatenate([b, y[keep]])
    return [f"{x}+{y}={x + y}" for x, y in zip(a[:n], b[:n], strict=True)]


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def pack(
    arrays: dict[str, np.ndarray], lengths: np.ndarray, *, length: int, window: int = 16
) -> dict[str, np.ndarray]:
    """Right-padded sequences placed end to end in rows of ``length``, so that short ones do not
    pay for pads (:class:`jaxaigc.models.gpt.GPT` takes the result's ``segments``).

    Args:
      arrays: per-position arrays [n, t] of the same sequences (tokens, masks).
      lengths: int [n]: the real length of each sequence (at most ``length``).
      length: the packed rows' length.
      window: first fit among the last ``window`` open rows (a sequence that fits none opens a
        new one), in the given order.

    Returns:
      ``arrays`` as [m, length] rows, zero past the last sequence, and ``"segments"`` int32
      [m, length]: 1, 2, ... for the sequences of a row in order, 0 for its trailing pads.
    """
    lengths = np.asarray(lengths)
    if len(lengths) and not 0 < lengths.min() <= lengths.max() <= length:
        raise ValueError(
            f"sequence lengths {lengths.min()}..{lengths.max()} must be in [1, {length}]"
        )
    rows: list[list[int]] = []  # sequence indices per row
    free: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        start = max(len(rows) - window, 0)
        row = next((r for r in range(start, len(rows)) if free[r] >= n), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    out = {k: np.zeros((len(rows), length), v.dtype) for k, v in arrays.items()}
    out["segments"] = np.zeros((len(rows), length), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, 1):
            n = lengths[i]
            for key, value in arrays.items():
                out[key][r, at : at + n] = value[i, :n]
            out["segments"][r, at : at + n] = segment
            at += n
    return out


class TokenWindows:
    """Random-access windows of ``length + 1`` tokens over a token stream (inputs and targets).

    Windows start every ``stride`` tokens; record ``i`` is ``{"tokens": int32 [length + 1]}``.
    """

    def __init__(self, tokens: np.ndarray, length: int, *, stride: int | None = None, name: str):
        if tokens.ndim != 1 or len(tokens) < length + 1:
            raise ValueError(f"need a 1-D token stream of at least {length + 1} tokens")
        self.tokens = tokens.astype(np.int32)
        self.length = length
        self.stride = stride or length
        self.name = name

    def __len__(self) -> int:
        return (len(self.tokens) - self.length - 1) // self.stride + 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = int(index) * self.stride
        return {"tokens": self.tokens[start : start + self.length + 1]}

    def __repr__(self) -> str:
        return f"TokenWindows({self.name}, tokens={len(self.tokens)}, length={self.length})"
