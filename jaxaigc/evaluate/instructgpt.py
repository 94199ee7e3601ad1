"""InstructGPT's evaluation, judged by the gold scorers of the synthetic tasks.

The reward model's pairwise accuracy against the gold order (pairs whose gold scores differ) on
held-out comparisons; the mean gold score of SFT and each PPO stage's greedy responses to
held-out prompts of the training templates and of the held-out template, and of responses
sampled as in the rollouts (T=1); PPO's win-rate over SFT; each policy's NLL on held-out
pretraining lines (the alignment tax); the PPO curves (KL from SFT, the rollouts' score, the gold
score of greedy responses) drawn into ``ppo_curves.png``.
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
from jaxaigc.models.gpt import GPT
from jaxaigc.objectives.autoregressive import next_token_nll
from jaxaigc.objectives.reward import pair_counts, ranks_of_scores
from jaxaigc.pipelines.instructgpt import generate_responses, policy_config
from jaxaigc.systems import instructgpt as ig
from jaxaigc.train.metrics import read_metrics

LABELS = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx", "ppo_gold": "PPO (gold reward)"}
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


def pretraining_nll(config, params, lines: dict[str, np.ndarray]) -> float:
    """Mean NLL per byte of held-out corpus lines under the policy."""
    model = GPT(policy_config(config))

    @jax.jit
    def nll(p, tokens, weights):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return next_token_nll(logits, tokens[:, 1:], weights)

    total = count = 0.0
    for i in range(0, len(lines["tokens"]), 64):
        s, c = nll(params, lines["tokens"][i : i + 64], lines["weights"][i : i + 64])
        total, count = total + float(s.sum()), count + float(c.sum())
    return total / count


def _ppo_curves(config, workdir: Path) -> dict:
    curves = {}
    for name in ig.ppo_stages(config):
        run_dir = stage_dir(config, workdir, name)
        records = read_metrics(run_dir)
        curves[name] = {
            key: [(r["step"], r[key]) for r in records if key in r]
            for key in ("rollout/kl", "rollout/score", "rollout/beta", "train/ptx_nll")
        }
        curves[name]["gold"] = ig.read_gold_curve(run_dir)
    return curves


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the run in ``workdir`` (its figures, the details, ``ppo_curves.png``)."""
    workdir = Path(workdir)
    policies = ig.load_policies(config, workdir)
    pretrained = policies.pop("pretrained")
    rm = ig.load_reward_model(config, workdir)
    evaluation = ig.evaluation_prompts(config)
    curve_prompts = evaluation["train_templates"][: config.eval.curve_prompts]
    curves = _ppo_curves(config, workdir)

    gold, examples = {}, {}
    for split, prompts in evaluation.items():
        for name, params in policies.items():
            responses = generate_responses(config, params, prompts)
            gold[f"{name}/{split}"] = ig.gold_scores(prompts, responses)
            examples[f"{name}/{split}"] = [
                {"prompt": p.text, "response": r}
                for p, r in zip(prompts[:4], responses, strict=False)
            ]
    # What PPO optimises: responses sampled as in its rollouts (T=1), 4 per prompt.
    repeated = [p for p in evaluation["train_templates"] for _ in range(4)]
    sampled_gold = {
        name: float(
            ig.gold_scores(
                repeated, generate_responses(config, params, repeated, temperature=1.0)
            ).mean()
        )
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
        name: pretraining_nll(config, params, lines)
        for name, params in {"pretrained": pretrained, **policies}.items()
    }
    n, seed = config.eval.comparisons, config.data.seed + 7
    report = {
        "reward_model": rm_accuracy(
            config, rm, instructions.comparisons(n, seed=seed, split="held_out")
        ),
        "reward_model_train_templates": rm_accuracy(
            config, rm, instructions.comparisons(n, seed=seed)
        ),
        # Where PPO's rollouts start: rankings of SFT samples to new prompts.
        "reward_model_sft_samples": rm_accuracy(
            config, rm, ig.sft_comparisons(config, policies["sft"], n, seed=seed)
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
    if jax.process_index() == 0:
        write_ppo_curves(workdir / CURVES, report)
    caption = (
        "PPO stages over PPO iterations: KL(policy || SFT), the score of the rollouts, the gold "
        "score of greedy responses (SFT's dashed); each policy's pretraining NLL"
    )
    return {
        "title": "InstructGPT on the synthetic instruction tasks",
        "figures": _figures(report),
        "images": [{"path": CURVES, "caption": caption, "key": "ppo_curves"}],
        **report,
    }


def _figure(name: str, value: float, baseline: float, baseline_name: str, unit: str = "") -> dict:
    return {"name": name, "value": value, "baseline": baseline, "baseline_name": baseline_name,
            "unit": unit}  # fmt: skip


def _figures(report: dict) -> list[dict]:
    """Each figure beside its baseline: win-rates against 50% (SFT against itself), accuracies
    against chance, gold scores and the pretraining NLL against SFT's."""
    figures = []
    for name, wins in report["win_rate_over_sft"].items():
        for split, value in wins.items():
            label = f"{LABELS[name]} wins over SFT, {SPLITS[split]} (ties count half)"
            figures.append(_figure(label, value, 0.5, "SFT against itself", "%"))
    for key, what in (
        ("reward_model", "held-out template"),
        ("reward_model_train_templates", "new pairs of the training templates"),
        ("reward_model_sft_samples", "rankings of SFT samples"),
    ):
        r = report[key]
        name = f"reward model pairwise accuracy against gold, {what} ({r['pairs']} pairs)"
        figures.append(_figure(name, r["accuracy"], 0.5, "chance", "%"))
    gold = report["gold_score"]
    for name in [n for n in LABELS if n != "sft" and f"{n}/train_templates" in gold]:
        for split, what in SPLITS.items():
            label = f"{LABELS[name]} mean gold score (0-1) of greedy responses, {what}"
            figures.append(_figure(label, gold[f"{name}/{split}"], gold[f"sft/{split}"], "SFT"))
    nll = report["pretraining_nll"]
    for name in ("ppo_ptx", "ppo"):
        label = f"{LABELS[name]} NLL of held-out pretraining lines, nats per byte (alignment tax)"
        figures.append(_figure(label, nll[name], nll["sft"], "SFT"))
    return figures


def write_ppo_curves(path: Path, report: dict) -> None:
    """The PPO stages over PPO iterations: KL(policy || SFT), the reward model's score of the
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
    bars = tax.bar([LABELS.get(n, n) for n in names], [nll[n] for n in names], color="C2")
    tax.bar_label(bars, fmt="%.3f")
    uniform = math.log(256)
    tax.axhline(uniform, color="grey", linestyle="--", label=f"uniform over bytes {uniform:.3f}")
    tax.set(title="pretraining NLL on held-out corpus lines", ylabel="nats per byte")
    tax.legend(loc="lower right")
    accuracy = report["reward_model"]["accuracy"]
    fig.suptitle(f"InstructGPT on the synthetic tasks; RM pairwise accuracy vs gold {accuracy:.1%}")
    fig.savefig(path, dpi=100)
