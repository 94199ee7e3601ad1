"""InstructGPT's supervised fine-tuning (Ouyang et al. 2022, section 3.5): the next-token loss on
the demonstrations' response tokens only, and the token layouts every RLHF stage shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import numpy as np

from jaxaigc.objectives.autoregressive import lm_loss_fn


def check_tokens(ids: Sequence[int], vocab_size: int) -> None:
    """Raises ``ValueError`` naming an id the model's vocabulary does not hold (a tokenizer that
    does not match the model)."""
    if len(ids) and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = max(ids) if max(ids) >= vocab_size else min(ids)
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary of {vocab_size}: the tokenizer "
            "does not match the model"
        )


def encode_example(
    prompt: Sequence[int],
    response: Sequence[int],
    *,
    length: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``prompt + response + [eos]`` right-padded to ``length``: (tokens int32 [length],
    response_mask bool [length], True at the response and its EOS)."""
    ids = [*prompt, *response, eos_id]
    check_tokens(ids + [pad_id], vocab_size)
    if len(ids) > length:
        raise ValueError(
            f"prompt ({len(prompt)}) + response ({len(response)}) + EOS is {len(ids)} tokens, "
            f"longer than the length {length}"
        )
    tokens = np.full(length, pad_id, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(length, bool)
    mask[len(prompt) : len(ids)] = True
    return tokens, mask


def left_pad(
    prompts: Sequence[Sequence[int]], *, length: int, pad_id: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to ``length`` for sampling: (tokens int32 [n, length], valid bool
    [n, length])."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= length:
            raise ValueError(
                f"prompt {row} has {len(prompt)} tokens; the prompt length is {length}"
            )
        check_tokens(list(prompt) + [pad_id], vocab_size)
        tokens[row, length - len(prompt) :] = prompt
        valid[row, length - len(prompt) :] = True
    return tokens, valid


def sft_loss_fn(model: nn.Module) -> Callable:
    """``loss_fn(params, batch, rng)`` for ``batch = {"tokens": int32 [b, t], "response_mask":
    bool [b, t]}`` (:func:`encode_example`; with ``"segments"`` [b, t], rows packed by
    :func:`jaxaigc.data.text.pack`): mean next-token NLL over the response tokens (the prompt is
    context, not a target)."""
    lm = lm_loss_fn(model)

    def loss_fn(params, batch, rng):
        # Target t + 1 is predicted at position t; a packed row's next prompt is no target.
        lm_batch = {"tokens": batch["tokens"], "weights": batch["response_mask"][:, 1:]}
        if "segments" in batch:
            lm_batch["segments"] = batch["segments"]
        return lm(params, lm_batch, rng)

    return loss_fn
