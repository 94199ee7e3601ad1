"""InstructGPT's evaluation, judged by the gold scorers of the synthetic tasks, on held-out
prompts only.

What PPO optimises, on the RL tasks (the preferences a small model can learn): the gold score of
responses sampled at the rollout temperature for SFT, best-of-n against the reward model (Gao et
al. 2022's baseline), PPO and PPO-ptx, each paired with SFT's samples of the same prompts (the
mean difference with a bootstrap 95% interval over prompts, and the win-rate with ties counted
half); greedy responses beside them; the reward model's pairwise accuracy against the gold order
on new comparisons and on rankings of SFT samples; the pretraining NLL of every policy (the
alignment tax, and how much of it PPO-ptx recovers). The hard tasks are their own rows. Curves
(``ppo_curves.png``): gold and reward against KL(policy || SFT) for PPO and for best-of-n, the
fixed evaluation batch's gold over PPO iterations, and the pretraining NLL over them.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxaigc.configs.stages import stage_dir
from jaxaigc.data import instructions
from jaxaigc.objectives.reward import pair_counts, ranks_of_scores
from jaxaigc.pipelines.instructgpt import generate_responses
from jaxaigc.systems import instructgpt as ig
from jaxaigc.train.metrics import read_metrics

LABELS = {
    "sft": "SFT",
    "best_of_n": "best-of-n",
    "ppo": "PPO",
    "ppo_ptx": "PPO-ptx",
    "ppo_gold": "PPO (gold reward)",
}
SPLITS = {"train_templates": "training templates", "held_out_template": "held-out template"}
CURVES = "ppo_curves.png"


def rm_accuracy(config, rm_params, comparisons: list[instructions.Comparison]) -> dict:
    """Pairwise accuracy against the gold order on ``comparisons`` the RM did not train on, over
    the pairs whose gold scores differ (ties have no right answer); NaN without such pairs."""
    arrays = ig.comparison_arrays(config, comparisons)
    b, k, t = arrays["tokens"].shape
    flat = (arrays[key].reshape(b * k, t) for key in ("tokens", "response_mask"))
    scores = ig.reward_scores(config, rm_params, *flat).reshape(b, k)
    gold = np.zeros((b, k))
    present = np.arange(k) < np.array([[len(c.responses)] for c in comparisons])
    for row, c in enumerate(comparisons):
        gold[row, : len(c.scores)] = c.scores
    correct, pairs = pair_counts(scores, ranks_of_scores(gold, present))
    right, total = int(correct.sum()), int(pairs.sum())
    return {"accuracy": right / total if total else math.nan, "pairs": total}


def reward_model_accuracies(config, rm_params, sft_params) -> dict[str, dict]:
    """:func:`rm_accuracy` on ``eval.comparisons`` new prompts of each set: the RL tasks, their
    held-out template, rankings of the SFT policy's samples of the RL tasks, the hard tasks."""
    n, seed, rl_tasks = config.eval.comparisons, config.data.seed + 7, config.data.rl_tasks
    sets = {
        "new_pairs": instructions.comparisons(n, seed=seed, tasks=rl_tasks),
        "held_out_template": instructions.comparisons(
            n, seed=seed, split="held_out", tasks=rl_tasks
        ),
        # Where PPO's rollouts start: rankings of SFT samples to new prompts.
        "sft_samples": ig.sft_comparisons(config, sft_params, n, seed=seed),
        "hard_tasks": instructions.comparisons(n, seed=seed, tasks=instructions.HARD_TASKS),
    }
    return {name: rm_accuracy(config, rm_params, c) for name, c in sets.items()}


def pretraining_nlls(config, policies: dict) -> dict[str, float]:
    """Each policy's NLL (nats/byte) of ``eval.corpus`` held-out pretraining lines: the
    alignment tax's measure."""
    lines = ig.corpus_lines(config, config.eval.corpus, seed=config.data.seed + 13)
    return {name: ig.pretraining_nll(config, params, lines) for name, params in policies.items()}


def paired(values: np.ndarray, baseline: np.ndarray, *, seed: int = 0, rounds: int = 2000) -> dict:
    """``values`` against ``baseline``, both [prompts, samples] of the same prompts: the mean
    difference with a bootstrap 95% interval over prompts, and the win-rate of sample i over the
    baseline's sample i (ties count half) with the tie rate."""
    diff = values - baseline
    per_prompt = diff.mean(1)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(per_prompt), size=(rounds, len(per_prompt)))
    low, high = np.percentile(per_prompt[draws].mean(1), [2.5, 97.5])
    return {
        "mean": float(values.mean()),
        "baseline": float(baseline.mean()),
        "difference": float(per_prompt.mean()),
        "interval": [float(low), float(high)],
        "win_rate": float((diff > 0).mean() + 0.5 * (diff == 0).mean()),
        "tie_rate": float((diff == 0).mean()),
    }


def best_of_n(samples: ig.ScoredSamples, prompts: int, n: int) -> dict[str, np.ndarray]:
    """Groups of ``n`` consecutive samples of each prompt (``samples`` holds a multiple of ``n``
    per prompt, prompt-major), each group's sample of highest reward: gold and reward
    [prompts, groups]."""
    reward = samples.reward.reshape(prompts, -1, n)
    pick = reward.argmax(2)[..., None]
    gold = samples.gold.reshape(prompts, -1, n)
    return {
        "gold": np.take_along_axis(gold, pick, 2)[..., 0],
        "reward": np.take_along_axis(reward, pick, 2)[..., 0],
    }


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) in nats, the analytic bound of Stiennon et al. 2020."""
    return math.log(n) - (n - 1) / n


def sampled_figures(config, policies: dict, sft, rm, prompts: list) -> dict:
    """Every policy's and best-of-n's samples of ``prompts`` at the rollout temperature, paired
    with SFT's, and best-of-n's gold and reward at n = 1, 2, 4, ... ``eval.best_of``."""
    m, n = config.eval.samples, config.eval.best_of
    repeated = [p for p in prompts for _ in range(m)]
    scored = {
        name: ig.sample_and_score(config, params, sft, rm, repeated, seed=config.data.seed + 17)
        for name, params in policies.items()
    }
    pool = ig.sample_and_score(
        config, sft, sft, rm, [p for p in prompts for _ in range(m * n)], seed=config.data.seed + 19
    )
    best = best_of_n(pool, len(prompts), n)
    sft_gold = scored["sft"].gold.reshape(len(prompts), m)
    out = {"paired_with_sft": {}, "kl": {}, "reward": {}}
    for name, samples in scored.items():
        if name != "sft":
            out["paired_with_sft"][name] = paired(samples.gold.reshape(len(prompts), m), sft_gold)
        out["kl"][name] = float(samples.kl.mean())
        out["reward"][name] = float(samples.reward.mean())
    out["paired_with_sft"]["best_of_n"] = paired(best["gold"], sft_gold)
    out["kl"]["best_of_n"] = best_of_n_kl(n)
    out["reward"]["best_of_n"] = float(best["reward"].mean())
    sizes = [2**i for i in range(int(math.log2(n)) + 1)]
    out["best_of_n_curve"] = [
        {
            "n": k,
            "kl": best_of_n_kl(k),
            **{key: float(v.mean()) for key, v in best_of_n(pool, len(prompts), k).items()},
        }
        for k in sizes
    ]
    out["sft_gold"] = float(sft_gold.mean())
    return out


def _ppo_curves(config, workdir: Path, sft, rm) -> dict:
    """Each PPO stage's logged rollout metrics and its evaluation-batch points, which start with
    SFT's own (step 0, KL 0) on the same batch and keys."""
    prompts = ig.evaluation_prompts(config)["train_templates"][: config.eval.curve_prompts]
    start = ig.sample_and_score(config, sft, sft, rm, prompts, seed=0)
    lines = ig.corpus_lines(config, config.eval.curve_prompts, seed=config.data.seed + 13)
    sft_point = {
        "step": 0,
        "gold": float(start.gold.mean()),
        "reward": float(start.reward.mean()),
        "kl": 0.0,
        "ptx_nll": ig.pretraining_nll(config, sft, lines),
    }
    curves = {}
    for name in ig.ppo_stages(config):
        run_dir = stage_dir(config, workdir, name)
        records = read_metrics(run_dir)
        curves[name] = {
            key: [(r["step"], r[key]) for r in records if key in r]
            for key in ("rollout/kl", "rollout/score", "rollout/beta", "train/ptx_nll")
        }
        curves[name]["evaluation"] = [sft_point, *ig.read_curve(run_dir)]
    return curves


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the run in ``workdir`` (its figures, the details, ``ppo_curves.png``)."""
    workdir = Path(workdir)
    policies = ig.load_policies(config, workdir)
    pretrained = policies.pop("pretrained")
    sft = policies["sft"]
    rm = ig.load_reward_model(config, workdir)
    evaluation = ig.evaluation_prompts(config)
    hard = ig.evaluation_prompts(config, instructions.HARD_TASKS)

    sampled, greedy, examples = {}, {}, {}
    for split, prompts in evaluation.items():
        sampled[split] = sampled_figures(config, policies, sft, rm, prompts)
        for name, params in policies.items():
            responses = generate_responses(config, params, prompts)
            greedy[f"{name}/{split}"] = float(ig.gold_scores(prompts, responses).mean())
            examples[f"{name}/{split}"] = [
                {"prompt": p.text, "response": r}
                for p, r in zip(prompts[:4], responses, strict=False)
            ]
    hard_gold = {
        name: float(ig.gold_scores(hard["train_templates"], generate_responses(
            config, params, hard["train_templates"])).mean())
        for name, params in policies.items()
    }  # fmt: skip
    nll = pretraining_nlls(config, {"pretrained": pretrained, **policies})
    regression = nll["ppo"] - nll["sft"]
    report = {
        "reward_model": reward_model_accuracies(config, rm, sft),
        "sampled": sampled,  # at the rollout temperature
        "gold_score": greedy,  # greedy responses
        "hard_tasks_gold_score": hard_gold,  # greedy, training templates
        "pretraining_nll": nll,
        "alignment_tax": {
            "ppo_regression": regression,
            "ptx_recovered": (nll["ppo"] - nll["ppo_ptx"]) / regression if regression > 0 else None,
        },
        "curves": _ppo_curves(config, workdir, sft, rm),
        "curve_prompts": config.eval.curve_prompts,
        "ptx_gamma": config.ptx_gamma,
        "best_of": config.eval.best_of,
        "examples": examples,
    }
    if jax.process_index() == 0:
        write_ppo_curves(workdir / CURVES, report)
    caption = (
        "Gold and reward of samples against KL(policy || SFT) for PPO (its fixed evaluation "
        "batch over iterations) and best-of-n; the evaluation batch's gold over PPO iterations; "
        "the pretraining NLL over them"
    )
    return {
        "title": "InstructGPT on the synthetic tasks: PPO against SFT on a learnable preference",
        "figures": _figures(report),
        "images": [{"path": CURVES, "caption": caption, "key": "ppo_curves"}],
        **report,
    }


def _figure(name: str, value: float, baseline: float, baseline_name: str, unit: str = "") -> dict:
    return {"name": name, "value": value, "baseline": baseline, "baseline_name": baseline_name,
            "unit": unit}  # fmt: skip


def _figures(report: dict) -> list[dict]:
    """Each figure beside its baseline: gold differences and win-rates against SFT's samples of
    the same prompts, accuracies against chance, the NLL against SFT's."""
    figures = []
    for split, what in SPLITS.items():
        sampled = report["sampled"][split]
        for name, pair in sampled["paired_with_sft"].items():
            low, high = pair["interval"]
            label = (
                f"{LABELS[name]} mean gold of samples, {what} (95% interval of the difference "
                f"{low:+.3f} to {high:+.3f})"
            )
            figures.append(_figure(label, pair["mean"], pair["baseline"], "SFT's samples"))
            label = (
                f"{LABELS[name]} wins over SFT's samples, {what} "
                f"(ties {pair['tie_rate']:.0%}, counted half)"
            )
            figures.append(_figure(label, pair["win_rate"], 0.5, "SFT against itself", "%"))
    gold = report["gold_score"]
    for name in [
        n for n in LABELS if n not in ("sft", "best_of_n") and f"{n}/train_templates" in gold
    ]:
        label = f"{LABELS[name]} mean gold of greedy responses, training templates"
        figures.append(
            _figure(label, gold[f"{name}/train_templates"], gold["sft/train_templates"], "SFT")
        )
    for key, what in (
        ("new_pairs", "new comparisons, RL tasks"),
        ("held_out_template", "held-out template, RL tasks"),
        ("sft_samples", "rankings of SFT samples, RL tasks"),
        ("hard_tasks", "new comparisons, hard tasks"),
    ):
        r = report["reward_model"][key]
        name = f"reward model pairwise accuracy against gold, {what} ({r['pairs']} pairs)"
        figures.append(_figure(name, r["accuracy"], 0.5, "chance", "%"))
    hard = report["hard_tasks_gold_score"]
    for name in [n for n in ("ppo", "ppo_ptx") if n in hard]:
        label = f"{LABELS[name]} mean gold of greedy responses, hard tasks (a measure, not trained)"
        figures.append(_figure(label, hard[name], hard["sft"], "SFT"))
    nll = report["pretraining_nll"]
    for name in ("ppo_ptx", "ppo"):
        label = f"{LABELS[name]} NLL of held-out pretraining lines, nats per byte (alignment tax)"
        figures.append(_figure(label, nll[name], nll["sft"], "SFT"))
    return figures


def write_ppo_curves(path: Path, report: dict) -> None:
    """Gold and reward against KL for PPO's evaluation batch and best-of-n; the evaluation
    batch's gold and the pretraining NLL over PPO iterations."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)  # PNG without a display
    gold_kl, reward_kl, gold_step, nll_step = fig.subplots(2, 2).flat
    runs = {
        "ppo": "PPO",
        "ppo_ptx": f"PPO-ptx (gamma_ptx {report['ptx_gamma']:g})",
        "ppo_gold": "PPO on the gold reward",
    }
    for name, label in runs.items():
        points = report["curves"].get(name, {}).get("evaluation", [])
        if not points:
            continue
        kl = [p["kl"] for p in points]
        gold_kl.plot(kl, [p["gold"] for p in points], marker=".", label=label)
        reward_kl.plot(kl, [p["reward"] for p in points], marker=".", label=label)
        steps = [p["step"] for p in points]
        gold_step.plot(steps, [p["gold"] for p in points], marker=".", label=label)
        nll_step.plot(steps, [p["ptx_nll"] for p in points], marker=".", label=label)
    best = report["sampled"]["train_templates"]["best_of_n_curve"]
    for ax, key in ((gold_kl, "gold"), (reward_kl, "reward")):
        ax.plot([b["kl"] for b in best], [b[key] for b in best], marker="s", color="k",
                label="best-of-n (n = 1, 2, 4, ...; analytic KL)")  # fmt: skip
        ax.set(xlabel="KL(policy || SFT), nats per response")
    gold_kl.set(
        title="gold of samples (held-out prompts, rollout temperature)", ylabel="gold (0-1)"
    )
    reward_kl.set(title="reward of the same samples (normalised on SFT samples)", ylabel="reward")
    gold_step.set(
        title=f"gold of the fixed evaluation batch ({report['curve_prompts']} held-out prompts; "
        "iteration 0: SFT)",
        xlabel="PPO iteration", ylabel="gold (0-1)",
    )  # fmt: skip
    nll_step.set(
        title="pretraining NLL, held-out corpus lines (iteration 0: SFT)",
        xlabel="PPO iteration", ylabel="nats per byte",
    )  # fmt: skip
    for ax in (gold_kl, reward_kl, gold_step, nll_step):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("InstructGPT: PPO and best-of-n against SFT, judged by the gold scorer")
    fig.savefig(path, dpi=100)
