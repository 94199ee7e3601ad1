"""A tiny byte-level GPT learning two-digit addition: the demo's first stage (~1 min on 2 cores)."""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.data.text import BYTE_VOCAB
from jaxaigc.models.gpt import GPTConfig
from jaxaigc.train.loop import default_train_config


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = default_train_config()
    config.model = fields.section(
        GPTConfig(vocab_size=BYTE_VOCAB, context_length=32, width=64, layers=2)
    )
    config.data = ml_collections.ConfigDict(dict(lines=20_000, seed=0))
    config.train.update(
        dict(batch_size=16, steps=6000, log_every=50, checkpoint_every=1000)
    )  # loss ~1.1, most sums right
    config.eval = ml_collections.ConfigDict(dict(prompts=200, examples=5))
    if quick:
        config.train.update(dict(steps=300, checkpoint_every=300))
        config.eval.prompts = 50
    return config
