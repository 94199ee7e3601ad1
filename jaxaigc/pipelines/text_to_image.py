"""The one shape of text -> image inference, for DALL-E and unCLIP alike."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Generated:
    """``images`` uint8 [captions, n, h, w, 3], best first; ``scores`` float32 [captions, n]:
    the reranker's score of each image, descending (CLIP's cosine similarity to the caption for
    unCLIP; for DALL-E, its run's rule, :func:`jaxaigc.pipelines.dalle.rank_key`)."""

    images: np.ndarray
    scores: np.ndarray


class TextToImage(abc.ABC):
    """A trained text -> image run: ``pipe(captions, n=16, seed=0) -> Generated``. The caption
    tokenizer, the image decoder, the reranking CLIP and the sampler settings come from the run."""

    recipe: str

    @abc.abstractmethod
    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated: ...

    def __call__(self, captions: Sequence[str] | str, *, n: int = 16, seed: int = 0) -> Generated:
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions or n < 1:
            raise ValueError(f"need at least one caption and n >= 1, got {len(captions)} and {n}")
        return self.generate(captions, n=n, seed=seed)
