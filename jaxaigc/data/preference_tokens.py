"""InstructGPT's records (:mod:`jaxaigc.data.preferences`) as GPT-2 BPE token rows for each stage:
SFT rows, reward-model rows of a prompt's K responses, left-padded PPO prompts and pretraining
windows for the ptx term (Ouyang et al. 2022).

A sequence is the prompt's ids, the response's, then EOS (``<|endoftext|>``, also the padding:
masks mark pads, never ids). A prompt longer than ``prompt_length`` keeps its last tokens (a
dialogue's last turn, where ``"Assistant:"`` is); a response keeps its first
``response_length`` - 1 and EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxaigc.data.preferences import Comparison, Demonstration
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.objectives.reward import encode_comparison
from jaxaigc.objectives.sft import encode_example, left_pad

ROUNDING = 8  # row lengths are a multiple of this: fewer compiled shapes


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A tokenizer with the lengths a model takes."""

    tokenizer: Gpt2Tokenizer
    prompt_length: int
    response_length: int  # EOS included
    context_length: int
    vocab_size: int

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)[-self.prompt_length :]

    def response_ids(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)[: self.response_length - 1]  # room for the EOS

    @property
    def _ids(self) -> dict[str, int]:
        t = self.tokenizer
        return {"eos_id": t.eos_id, "pad_id": t.pad_id, "vocab_size": self.vocab_size}

    def _fitted_length(self, pairs: Sequence[tuple[list[int], list[int]]]) -> int:
        """The row length that holds every (prompt, response) pair and its EOS, rounded up: pads
        past the longest row only cost compute."""
        longest = max(len(prompt) + len(response) + 1 for prompt, response in pairs)
        return min(self.context_length, -(-longest // ROUNDING) * ROUNDING)

    def demonstrations(self, demonstrations: Sequence[Demonstration]) -> dict[str, np.ndarray]:
        """Right-padded rows: ``tokens`` int32 [n, t], ``response_mask`` bool [n, t] (True at
        the response and its EOS)."""
        pairs = [(self.prompt_ids(x.prompt), self.response_ids(x.response)) for x in demonstrations]
        length = self._fitted_length(pairs)
        rows = [encode_example(p, r, length=length, **self._ids) for p, r in pairs]
        tokens, mask = (np.stack(x) for x in zip(*rows, strict=True))
        return {"tokens": tokens, "response_mask": mask}

    def comparisons(self, comparisons: Sequence[Comparison]) -> dict[str, np.ndarray]:
        """One prompt per row with its K responses and their ranks, padded to the largest K
        (:func:`~jaxaigc.objectives.reward.encode_comparison`: ``tokens`` [n, K, t],
        ``response_mask`` [n, K, t], ``ranks`` [n, K]), so that a row holds its C(K, 2) pairs."""
        encoded = [
            (self.prompt_ids(c.prompt), [self.response_ids(r) for r in c.responses])
            for c in comparisons
        ]
        length = self._fitted_length([(p, r) for p, responses in encoded for r in responses])
        max_k = max(len(c.responses) for c in comparisons)
        rows = [
            encode_comparison(p, rs, c.ranking, max_k=max_k, length=length, **self._ids)
            for c, (p, rs) in zip(comparisons, encoded, strict=True)
        ]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded to ``prompt_length``: (tokens int32 [n, p], valid bool [n, p])."""
        ids = self._ids
        return left_pad(
            [self.prompt_ids(p) for p in prompts],
            length=self.prompt_length,
            pad_id=ids["pad_id"],
            vocab_size=ids["vocab_size"],
        )

    def pretraining(self, texts: Sequence[str], rows: int, *, seed: int) -> dict[str, np.ndarray]:
        """``rows`` windows of the pretraining stream: ``ptx`` int32 [rows, context] and
        ``ptx_weights`` [rows, context - 1]. Texts in a seeded order, each followed by EOS, are
        tokenised until ``rows`` windows fill (fewer are repeated; the last is padded, its pads
        unweighted)."""
        context, eos = self.context_length, self.tokenizer.eos_id
        stream: list[int] = []
        for i in np.random.default_rng(seed).permutation(len(texts)):
            stream += [*self.tokenizer.tokenize(texts[i]), eos]
            if len(stream) >= rows * context:
                break
        windows = -(-len(stream) // context)
        tokens = np.full(windows * context, self.tokenizer.pad_id, np.int32)
        tokens[: len(stream)] = stream
        real = np.arange(windows * context) < len(stream)
        pick = np.arange(rows) % windows
        return {
            "ptx": tokens.reshape(windows, context)[pick],
            "ptx_weights": real.reshape(windows, context)[pick, 1:].astype(np.float32),
        }
