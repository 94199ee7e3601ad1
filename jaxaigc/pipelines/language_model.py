"""A GPT read back from a run as a text continuer: ``respond(prompts)`` continues each prompt
with the KV-cache sampler. A GPT-2 converted from Hugging Face's weights (``jaxaigc convert
gpt2``) loads here with its BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.configs.saved import load_run
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.sft import left_pad
from jaxaigc.sample.decode import generate
from jaxaigc.train import checkpoint

BATCH = 64  # prompts per sampling call
PROMPT_ROUNDING = 16  # prompts are left-padded to a multiple of this: fewer compiled shapes


class LanguageModel:
    """A GPT and its tokenizer: ``respond`` continues prompts up to EOS or ``max_tokens``."""

    def __init__(self, config: GPTConfig, params: Any, tokenizer: Gpt2Tokenizer):
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens; the model only "
                f"{config.vocab_size}"
            )
        self.config, self.params, self.tokenizer = config, params, tokenizer

    def respond(
        self,
        prompts: Sequence[str],
        *,
        temperature: float = 0.0,
        max_tokens: int = 64,
        seed: int = 0,
    ) -> list[str]:
        """Each prompt's continuation (greedy at temperature 0), up to EOS or ``max_tokens``
        tokens; batch i of 64 prompts draws with the key ``seed + i``."""
        ids = [self.tokenizer.tokenize(p) for p in prompts]
        if any(not row for row in ids):
            raise ValueError("every prompt needs at least one token")
        longest, context = max(len(row) for row in ids), self.config.context_length
        if max_tokens < 1 or longest >= context:
            raise ValueError(
                f"max_tokens must be >= 1 (got {max_tokens}) and a prompt shorter than the "
                f"context of {context} tokens (the longest has {longest})"
            )
        steps = min(max_tokens, context - longest)
        length = min(-(-longest // PROMPT_ROUNDING) * PROMPT_ROUNDING, context - steps)
        tokens, valid = left_pad(
            ids, length=length, pad_id=self.tokenizer.pad_id, vocab_size=self.config.vocab_size
        )
        out = []
        for i in range(0, len(prompts), BATCH):
            samples = generate(
                self.config,
                self.params,
                jnp.asarray(tokens[i : i + BATCH]),
                valid=jnp.asarray(valid[i : i + BATCH]),
                steps=steps,
                rng=jax.random.key(seed + i),
                temperature=temperature,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id,
            )
            drawn = zip(np.asarray(samples.tokens), np.asarray(samples.mask), strict=True)
            out.extend(self.tokenizer.decode(row[mask].tolist()) for row, mask in drawn)
        return out


def load_language_model(workdir: str | Path) -> LanguageModel:
    """The GPT of a run written by ``jaxaigc convert gpt2`` (its ``tokenizer.json`` beside)."""
    workdir = Path(workdir)
    recipe, _ = load_run(workdir)
    if recipe != "gpt2":
        raise ValueError(f"{workdir} holds a {recipe!r} run, not a converted GPT-2")
    model, variables, _, _ = checkpoint.load_model(
        workdir,
        lambda run_config: GPT(fields.to_dataclass(GPTConfig, run_config["model"])),
        lambda model: lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32)),
        what="GPT-2",
        train_command=f"jaxaigc convert gpt2 pytorch_model.bin {workdir}",
    )
    tokenizer = Gpt2Tokenizer.from_folder(workdir)
    return LanguageModel(model.config, variables["params"], tokenizer)
