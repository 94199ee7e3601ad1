"""InstructGPT on the synthetic instruction tasks: pretrain -> SFT -> reward model -> PPO and
PPO-ptx, judged by the gold scorers (:mod:`jaxaigc.pipelines.instructgpt`).

Each stage trains in ``<workdir>/<stage>`` and resumes from its checkpoints. The report
(``report.json``): the reward model's held-out pairwise accuracy against the gold order (pairs
whose gold scores differ), the mean gold score of SFT, PPO and PPO-ptx on held-out prompts of the
training templates and of the held-out template, PPO's win-rate over SFT, the KL(policy || SFT),
reward-model score and gold score curves, and the pretraining NLL of each policy (the alignment
tax). With ``gold_reward_run`` a third run, PPO scored by the gold scorer in place of the reward
model, measures what PPO makes of a perfect reward model. Process 0 writes the report and
``curves.png``, the curves drawn with matplotlib.

    python experiments/instructgpt/train_instructgpt.py --workdir runs/instructgpt
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxaigc.cli import run_experiment
from jaxaigc.data import instructions
from jaxaigc.pipelines import instructgpt as ig
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics


def get_config() -> ml_collections.ConfigDict:
    config = ig.get_config()
    config.ptx_gamma = 1.0  # the PPO-ptx run's gamma_ptx (the PPO run has 0)
    # A third run, PPO against the gold scorer instead of the reward model: what PPO makes of
    # a perfect reward model, the ceiling of the other two.
    config.gold_reward_run = True
    # curve_prompts: the first held-out prompts, answered greedily every curve_every PPO
    # iterations for the gold-score curve.
    config.eval = ml_collections.ConfigDict(
        dict(prompts=200, comparisons=300, corpus=500, curve_prompts=64, curve_every=25)
    )
    return config


def _stage(config, name: str, build, workdir: Path, *inputs, run_name: str | None = None, hooks=()):
    """Trains a stage in ``workdir / run_name`` (default ``name``); exits if it stopped early
    (SIGTERM: saved; rerunning resumes it) rather than starting the next stage."""
    stage = ig.stage_config(config, name)
    task, batches = build(stage, *inputs)
    run_name = run_name or name
    state = train(task, batches, stage, workdir / run_name, hooks=hooks)
    if int(state.step) < stage.train.steps * task.updates_per_step:
        sys.exit(f"stage {run_name} stopped at update {int(state.step)}; rerun to resume")
    # Each process evaluates on its own devices, so it needs the whole parameters (a run of
    # several processes shards them over all).
    return multihost_utils.process_allgather(state.params, tiled=True)


def _rm_accuracy(config, rm_params, comparisons) -> dict:
    """Pairwise accuracy against the gold order on ``comparisons`` the RM did not train on, over
    the pairs whose gold scores differ (ties have no right answer)."""
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
    # A toy run's samples may all tie.
    return {"accuracy": right / total if total else math.nan, "pairs": total}


def _gold(prompts, responses) -> np.ndarray:
    return np.array([instructions.score(p, r) for p, r in zip(prompts, responses, strict=True)])


def _gold_hook(config, path: Path, prompts):
    """A loop hook appending ``{"step", "gold"}`` to ``path`` every ``curve_every`` PPO
    iterations and at the last: the mean gold score of greedy responses to ``prompts``. A file so
    that a resumed run keeps the points before its restart."""

    def hook(step: int, state, metrics) -> None:
        del metrics
        if step % config.eval.curve_every and step != config.ppo.steps:
            return
        policy = multihost_utils.process_allgather(state.params["policy"], tiled=True)
        gold = _gold(prompts, ig.respond(config, policy, prompts)).mean()
        if jax.process_index() == 0:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, "gold": float(gold)}) + "\n")

    return hook


def _read_gold(path: Path) -> list[tuple[int, float]]:
    """The gold curve of ``path`` by step; a step evaluated again after a restart keeps its last
    value."""
    if not path.exists():
        return []
    points = dict((r["step"], r["gold"]) for r in map(json.loads, path.read_text().splitlines()))
    return sorted(points.items())


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    pretrained = _stage(config, "pretrain", ig.build_pretrain, workdir)
    sft = _stage(config, "sft", ig.build_sft, workdir, pretrained)
    rm = ig.centred_reward_params(config, _stage(config, "rm", ig.build_rm, workdir, sft))
    seed = config.data.seed + 11
    evaluation = {
        "train_templates": instructions.make_prompts(config.eval.prompts, seed=seed),
        "held_out_template": instructions.make_prompts(
            config.eval.prompts, seed=seed, split="held_out"
        ),
    }
    curve_prompts = evaluation["train_templates"][: config.eval.curve_prompts]
    policies = {"sft": sft}
    curves = {}
    runs = [("ppo", 0.0, "model"), ("ppo_ptx", config.ptx_gamma, "model")]
    if config.gold_reward_run:
        runs.append(("ppo_gold", 0.0, "gold"))
    for name, gamma, reward in runs:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.ppo.algorithm.gamma_ptx = gamma
        run_config.ppo.reward = reward
        gold_path = workdir / name / "gold.jsonl"
        hook = _gold_hook(run_config, gold_path, curve_prompts)
        params = _stage(
            run_config, "ppo", ig.build_ppo, workdir, sft, rm, run_name=name, hooks=[hook]
        )
        policies[name] = params["policy"]
        records = read_metrics(workdir / name)
        curves[name] = {
            key: [(r["step"], r[key]) for r in records if key in r]
            for key in ("rollout/kl", "rollout/score", "rollout/beta", "train/ptx_nll")
        }
        curves[name]["gold"] = _read_gold(gold_path)

    gold, examples = {}, {}
    for split, prompts in evaluation.items():
        for name, params in policies.items():
            responses = ig.respond(config, params, prompts)
            gold[f"{name}/{split}"] = _gold(prompts, responses)
            examples[f"{name}/{split}"] = [
                {"prompt": p.text, "response": r}
                for p, r in zip(prompts[:4], responses, strict=False)
            ]
    # What PPO optimises: responses sampled as in its rollouts (T=1), 4 per prompt.
    repeated = [p for p in evaluation["train_templates"] for _ in range(4)]
    sampled_gold = {
        name: float(_gold(repeated, ig.respond(config, params, repeated, temperature=1.0)).mean())
        for name, params in policies.items()
    }
    # Greedy responses of the same prompts: the gold curves start at SFT's score.
    sft_curve_gold = float(gold["sft/train_templates"][: len(curve_prompts)].mean())
    for c in curves.values():
        c["gold"] = [(0, sft_curve_gold), *c["gold"]]
    wins, ties = {}, {}
    for name in [n for n in ("ppo", "ppo_gold") if n in policies]:
        for split in evaluation:
            diff = gold[f"{name}/{split}"] - gold[f"sft/{split}"]
            wins.setdefault(name, {})[split] = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
            ties.setdefault(name, {})[split] = float((diff == 0).mean())
    lines = ig.corpus_lines(config, config.eval.corpus, seed=config.data.seed + 13)
    nll = {
        name: ig.pretraining_nll(config, params, lines)
        for name, params in {"pretrained": pretrained, **policies}.items()
    }
    n, seed = config.eval.comparisons, config.data.seed + 7
    report = {
        "reward_model": _rm_accuracy(
            config, rm, instructions.comparisons(n, seed=seed, split="held_out")
        ),
        "reward_model_train_templates": _rm_accuracy(
            config, rm, instructions.comparisons(n, seed=seed)
        ),
        # Where PPO's rollouts start: rankings of SFT samples to new prompts.
        "reward_model_sft_samples": _rm_accuracy(
            config, rm, ig.sft_comparisons(config, sft, n, seed=seed)
        ),
        "gold_score": {k: float(v.mean()) for k, v in gold.items()},  # greedy responses
        "gold_score_sampled": sampled_gold,  # training templates, T=1
        "win_rate_over_sft": wins,  # ties count half
        "tie_rate_with_sft": ties,
        "pretraining_nll": nll,
        "final_kl": {name: c["rollout/kl"][-1][1] for name, c in curves.items()},
        "curves": curves,
        "curve_prompts": len(curve_prompts),
        "ptx_gamma": config.ptx_gamma,
        "examples": examples,
    }
    if jax.process_index() != 0:  # every process evaluates; process 0 reports
        return report
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_curves(workdir / "curves.png", report)
    print("\n".join(summary_lines(report)))
    return report


_LABELS = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx", "ppo_gold": "PPO (gold reward)"}


def summary_lines(report: dict) -> list[str]:
    """One line per figure of the report, each with its baseline."""
    r, g, nll = report["reward_model"], report["gold_score"], report["pretraining_nll"]
    seen, sampled = report["reward_model_train_templates"], report["reward_model_sft_samples"]
    lines = [
        f"reward model: pairwise accuracy against the gold order {r['accuracy']:.1%} on "
        f"{r['pairs']} pairs of the held-out template, {seen['accuracy']:.1%} on {seen['pairs']} "
        f"new pairs of the training templates, {sampled['accuracy']:.1%} on {sampled['pairs']} "
        "pairs of SFT samples (chance 50%)"
    ]
    wins, ties = report["win_rate_over_sft"], report["tie_rate_with_sft"]
    for split in wins["ppo"]:
        scores = ", ".join(
            f"{_LABELS[n]} {g[f'{n}/{split}']:.3f}" for n in _LABELS if f"{n}/{split}" in g
        )
        versus = "; ".join(
            f"{_LABELS[n]} wins over SFT {w[split]:.1%} (ties {ties[n][split]:.0%})"
            for n, w in wins.items()
        )
        lines.append(
            f"mean gold score (0-1) of greedy responses, {split.replace('_', ' ')}: {scores}. "
            f"{versus} (50% = no better; ties counted half)"
        )
    lines.append(
        "mean gold score of responses sampled at T=1 (as in the rollouts), train templates: "
        + ", ".join(f"{_LABELS[n]} {v:.3f}" for n, v in report["gold_score_sampled"].items())
    )
    lines.append(
        "final KL(policy || SFT) per response: "
        + ", ".join(f"{_LABELS[n]} {v:.2f} nats" for n, v in report["final_kl"].items())
        + " (SFT: 0)"
    )
    lines.append(
        f"pretraining NLL (nats/byte, held-out corpus): PPO {nll['ppo']:.3f} vs PPO-ptx "
        f"{nll['ppo_ptx']:.3f} (SFT {nll['sft']:.3f}, pretrained {nll['pretrained']:.3f}, "
        f"uniform {math.log(256):.3f})"
    )
    return lines


def summary(report: dict) -> str:
    """The demo's closing summary."""
    return "\n".join(summary_lines(report))


def write_curves(path: Path, report: dict) -> None:
    """PPO and PPO-ptx over PPO iterations: KL(policy || SFT), the reward model's score of the
    rollouts, the gold score of greedy responses; and each policy's pretraining NLL."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)  # PNG without a display
    kl, score, gold, tax = fig.subplots(2, 2).flat
    runs = {
        "ppo": "PPO",
        "ppo_ptx": f"PPO-ptx (gamma_ptx {report['ptx_gamma']:g})",
        "ppo_gold": "PPO on the gold reward (score: gold x gold_scale)",
    }
    for name, label in runs.items():
        if name not in report["curves"]:
            continue
        curves = report["curves"][name]
        for ax, key in ((kl, "rollout/kl"), (score, "rollout/score"), (gold, "gold")):
            if curves[key]:
                ax.plot(*zip(*curves[key], strict=True), label=label, marker=".")
    sft_gold = report["curves"]["ppo"]["gold"][0][1]
    gold.axhline(sft_gold, color="grey", linestyle="--", label=f"SFT {sft_gold:.3f}")
    score.axhline(0, color="grey", linestyle="--", label="demonstrations (RM centred at 0)")
    kl.set(title="KL(policy || SFT reference) of the rollouts", ylabel="nats per response")
    score.set(
        title="score of the rollouts (sampled, T=1)", ylabel="RM score (gold run: scaled gold)"
    )
    gold.set(
        title=f"gold score of greedy responses ({report['curve_prompts']} held-out prompts)",
        ylabel="mean gold score (0-1)",
    )
    for ax in (kl, score, gold):
        ax.set_xlabel("PPO iteration")
        ax.legend()
        ax.grid(alpha=0.3)
    nll = report["pretraining_nll"]
    names = [n for n in ("pretrained", "sft", "ppo", "ppo_ptx", "ppo_gold") if n in nll]
    bars = tax.bar([_LABELS.get(n, n) for n in names], [nll[n] for n in names], color="C2")
    tax.bar_label(bars, fmt="%.3f")
    tax.axhline(
        math.log(256), color="grey", linestyle="--", label=f"uniform over bytes {math.log(256):.3f}"
    )
    tax.set(title="pretraining NLL on held-out corpus lines", ylabel="nats per byte")
    tax.legend(loc="lower right")
    accuracy = report["reward_model"]["accuracy"]
    fig.suptitle(f"InstructGPT on the synthetic tasks; RM pairwise accuracy vs gold {accuracy:.1%}")
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    run_experiment(run, get_config())
