"""A tiny byte-level GPT learns two-digit addition: train, then score greedy completions.

The model is :mod:`jaxaigc.pipelines.lm` (lines ``"a+b=c"``, bytes as tokens). After training,
greedy completions of held-out prompts ``"a+b="`` (a different seed from the training corpus) are
scored by exact match, and a report goes to ``<workdir>/report.json``.

    python experiments/lm/tiny_lm.py --workdir runs/lm --config.train.steps=300
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc.cli import run_experiment
from jaxaigc.data.text import arithmetic_lines, decode_bytes, encode_bytes
from jaxaigc.models.gpt import GPTConfig
from jaxaigc.pipelines import lm
from jaxaigc.sample.decode import sample
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = lm.get_config()
    config.eval = ml_collections.ConfigDict(dict(prompts=200, examples=5))
    return config


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


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, writes the report."""
    workdir = Path(workdir)
    model, task, batches = lm.build(config)
    state = train(task, batches, config, workdir)
    # Every process samples on one of its devices, so each needs the whole parameters (a run of
    # several processes shards them over all); process 0 writes the report.
    params = multihost_utils.process_allgather(state.eval_params, tiled=True)

    # Sums whose operand pairs never occur in the training text.
    held_out = arithmetic_lines(config.eval.prompts, seed=config.data.seed + 1, split="held_out")
    prompts, answers = zip(*(line.split("=") for line in held_out), strict=True)
    prompts = [f"{p}=" for p in prompts]
    steps = max(map(len, answers)) + 1  # the longest sum and the newline that ends it
    completions = complete(model.config, params, prompts, steps=steps)
    correct = np.array([c == a for c, a in zip(completions, answers, strict=True)])
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]
    report = {
        "first_logged_loss": {"step": losses[0][0], "loss": losses[0][1]},
        "final_loss": {"step": losses[-1][0], "loss": losses[-1][1]},
        "accuracy": float(correct.mean()),
        "prompts": len(prompts),
        "examples": [
            {"prompt": p, "completion": c, "answer": a, "correct": bool(ok)}
            for p, c, a, ok in zip(prompts, completions, answers, correct, strict=True)
        ][: config.eval.examples],
    }
    if jax.process_index() != 0:  # every process evaluates; process 0 reports
        return report
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
        f"(step {losses[-1][0]}); exact-match accuracy {report['accuracy']:.1%} on "
        f"{len(prompts)} held-out sums (operand pairs never seen in training)"
    )
    for ex in report["examples"]:
        mark = "ok" if ex["correct"] else f"expected {ex['answer']}"
        print(f"  {ex['prompt']}{ex['completion']}  ({mark})")
    return report


if __name__ == "__main__":
    run_experiment(run, get_config())
