"""The tiny LM's evaluation: exact-match accuracy of greedy completions of held-out sums."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.data.text import arithmetic_lines, decode_bytes, encode_bytes
from jaxaigc.models.gpt import GPTConfig
from jaxaigc.sample.decode import sample
from jaxaigc.systems import lm
from jaxaigc.train.metrics import read_metrics


def complete(model_config: GPTConfig, params, prompts: list[str], *, steps: int) -> list[str]:
    """Greedy completions of ``prompts``, each up to the first newline (at most ``steps`` bytes).

    Each prompt is preceded by ``"\\n"``, the start of a line as the corpus has it; prompts of
    equal length are sampled as one batch, so none needs padding.
    """
    groups = defaultdict(list)  # prompt length -> indices
    for i, prompt in enumerate(prompts):
        groups[len(prompt)].append(i)
    completions = [""] * len(prompts)
    for indices in groups.values():
        tokens = np.stack([encode_bytes("\n" + prompts[i]) for i in indices])  # (b, p)
        generated = sample(model_config, params, tokens, steps=steps, rng=jax.random.key(0))
        for i, row in zip(indices, np.asarray(generated), strict=True):
            completions[i] = decode_bytes(row).split("\n")[0]
    return completions


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Exact match on sums whose operand pairs never occur in the training text."""
    model, params = lm.load_trained(workdir)
    held_out = arithmetic_lines(config.eval.prompts, seed=config.data.seed + 1, split="held_out")
    prompts, answers = zip(*(line.split("=") for line in held_out), strict=True)
    prompts = [f"{p}=" for p in prompts]
    steps = max(map(len, answers)) + 1  # the longest sum and the newline that ends it
    completions = complete(model.config, params, prompts, steps=steps)
    correct = np.array([c == a for c, a in zip(completions, answers, strict=True)])
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    (first_step, first), (final_step, final) = losses[0], losses[-1]
    return {
        "title": "A byte-level GPT learning two-digit addition",
        "figures": [
            {
                "name": f"exact-match accuracy on {len(prompts)} held-out sums",
                "value": float(correct.mean()),
                "baseline": None,
                "unit": "%",
            },
            {
                "name": f"training loss at step {final_step}",
                "value": final,
                "baseline": first,
                "baseline_name": f"step {first_step}",
                "unit": "",
            },
        ],
        "first_logged_loss": {"step": first_step, "loss": first},
        "final_loss": {"step": final_step, "loss": final},
        "accuracy": float(correct.mean()),
        "prompts": len(prompts),
        "examples": [
            {"prompt": p, "completion": c, "answer": a, "correct": bool(ok)}
            for p, c, a, ok in zip(prompts, completions, answers, correct, strict=True)
        ][: config.eval.examples],
    }
