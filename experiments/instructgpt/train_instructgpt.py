"""InstructGPT on the synthetic instruction tasks: pretrain -> SFT -> reward model -> PPO and
PPO-ptx, judged by the gold scorers (:mod:`jaxaigc.pipelines.instructgpt`).

Each stage trains in ``<workdir>/<stage>`` and resumes from its checkpoints. The report
(``report.json``): the reward model's held-out pairwise accuracy against the gold order (pairs
whose gold scores differ), the mean gold score of SFT, PPO and PPO-ptx on held-out prompts of the
training templates and of the held-out template, PPO's win-rate over SFT, the KL(policy || SFT)
and score curves, and the pretraining NLL of each policy (the alignment tax).

    python experiments/instructgpt/train_instructgpt.py --workdir runs/instructgpt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.cli import run_experiment
from jaxaigc.data import instructions
from jaxaigc.pipelines import instructgpt as ig
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = ig.get_config()
    config.ptx_gamma = 1.0  # the PPO-ptx run's gamma_ptx (the PPO run has 0)
    config.eval = ml_collections.ConfigDict(dict(prompts=200, comparisons=300, corpus=500))
    return config


def _stage(config, name: str, build, workdir: Path, *inputs, run_name: str | None = None):
    """Trains a stage in ``workdir / run_name`` (default ``name``); exits if it stopped early
    (SIGTERM: saved; rerunning resumes it) rather than starting the next stage."""
    stage = ig.stage_config(config, name)
    task, batches = build(stage, *inputs)
    run_name = run_name or name
    state = train(task, batches, stage, workdir / run_name)
    if int(state.step) < stage.train.steps * task.updates_per_step:
        sys.exit(f"stage {run_name} stopped at update {int(state.step)}; rerun to resume")
    return jax.device_get(state.params)


def _rm_accuracy(config, rm_params) -> dict:
    """Pairwise accuracy against the gold order on held-out comparisons, over the pairs whose gold
    scores differ (ties have no right answer)."""
    comparisons = instructions.comparisons(
        config.eval.comparisons, seed=config.data.seed + 7, split="held_out"
    )
    arrays = ig.comparison_arrays(config, comparisons)
    k = arrays["tokens"].shape[1]
    flat = {
        key: arrays[key].reshape(-1, arrays[key].shape[-1]) for key in ("tokens", "response_mask")
    }
    scores = ig.reward_scores(config, rm_params, flat["tokens"], flat["response_mask"])
    scores = scores.reshape(-1, k)
    right = total = 0
    for c, s in zip(comparisons, scores, strict=True):
        for i in range(len(c.responses)):
            for j in range(i + 1, len(c.responses)):
                if c.scores[i] != c.scores[j]:
                    total += 1
                    right += (s[i] > s[j]) == (c.scores[i] > c.scores[j])
    return {"accuracy": right / total, "pairs": total}


def _gold(prompts, responses) -> np.ndarray:
    return np.array([instructions.score(p, r) for p, r in zip(prompts, responses, strict=True)])


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    pretrained = _stage(config, "pretrain", ig.build_pretrain, workdir)
    sft = _stage(config, "sft", ig.build_sft, workdir, pretrained)
    rm = ig.centred_reward_params(config, _stage(config, "rm", ig.build_rm, workdir, sft))
    policies = {"sft": sft}
    curves = {}
    for name, gamma in (("ppo", 0.0), ("ppo_ptx", config.ptx_gamma)):
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.ppo.algorithm.gamma_ptx = gamma
        params = _stage(run_config, "ppo", ig.build_ppo, workdir, sft, rm, run_name=name)
        policies[name] = params["policy"]
        records = read_metrics(workdir / name)
        curves[name] = {
            key: [(r["step"], r[key]) for r in records if key in r]
            for key in ("rollout/kl", "rollout/score", "rollout/beta", "train/ptx_nll")
        }

    seed = config.data.seed + 11
    evaluation = {
        "train_templates": instructions.make_prompts(config.eval.prompts, seed=seed),
        "held_out_template": instructions.make_prompts(
            config.eval.prompts, seed=seed, split="held_out"
        ),
    }
    gold, examples = {}, {}
    for split, prompts in evaluation.items():
        for name, params in policies.items():
            responses = ig.respond(config, params, prompts)
            gold[f"{name}/{split}"] = _gold(prompts, responses)
            examples[f"{name}/{split}"] = [
                {"prompt": p.text, "response": r}
                for p, r in zip(prompts[:4], responses, strict=False)
            ]
    wins = {}
    for split in evaluation:
        diff = gold[f"ppo/{split}"] - gold[f"sft/{split}"]
        wins[split] = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
    lines = ig.corpus_lines(config, config.eval.corpus, seed=config.data.seed + 13)
    nll = {name: ig.pretraining_nll(config, params, lines) for name, params in policies.items()}
    report = {
        "reward_model": _rm_accuracy(config, rm),
        "gold_score": {k: float(v.mean()) for k, v in gold.items()},
        "win_rate_ppo_over_sft": wins,
        "pretraining_nll": nll,
        "final_kl": {name: c["rollout/kl"][-1][1] for name, c in curves.items()},
        "curves": curves,
        "examples": examples,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    rm_report = report["reward_model"]
    print(
        f"reward model: pairwise accuracy {rm_report['accuracy']:.1%} against the gold order on "
        f"{rm_report['pairs']} held-out pairs (chance 50%)"
    )
    for split in evaluation:
        scores = ", ".join(f"{n} {report['gold_score'][f'{n}/{split}']:.3f}" for n in policies)
        print(f"gold score on {split}: {scores}; PPO wins over SFT {wins[split]:.1%} (chance 50%)")
    print(
        "KL(policy || SFT) at the end: "
        + ", ".join(f"{n} {v:.2f} nats" for n, v in report["final_kl"].items())
    )
    print("pretraining NLL (nats/byte): " + ", ".join(f"{n} {v:.3f}" for n, v in nll.items()))
    return report


if __name__ == "__main__":
    run_experiment(run, get_config())
