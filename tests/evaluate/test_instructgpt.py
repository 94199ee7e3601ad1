"""InstructGPT's quick recipe end to end (the quick demo's run, with the gold-reward stage added):
every stage trains, checkpoints and hands its parameters on; the evaluation, from the checkpoints
alone, holds every figure and its curves."""

import shutil

import numpy as np
import pytest

from jaxaigc.configs.instructgpt import get_config
from jaxaigc.configs.saved import save_run
from jaxaigc.evaluate import instructgpt as evaluation
from jaxaigc.evaluate.report import write_report
from jaxaigc.pipelines.instructgpt import load_policy
from jaxaigc.systems import instructgpt as ig

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "ppo_gold")


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(quick_demo, tmp_path_factory):
    """A copy of the quick demo's run with the gold-reward stage trained beside (the other stages
    resume as finished), evaluated once."""
    workdir = tmp_path_factory.mktemp("instructgpt") / "run"
    shutil.copytree(quick_demo / "instructgpt", workdir)
    config = get_config(quick=True)
    config.gold_reward_run = True
    ig.train(config, workdir)
    return config, workdir, evaluation.evaluate(workdir, config)


def test_quick_recipe_trains_and_evaluates(run):
    config, workdir, report = run
    for stage in STAGES:
        assert (workdir / stage / "checkpoints" / "2").is_dir(), stage
    assert {k: v["pairs"] > 0 for k, v in report["reward_model"].items()} == {
        "new_pairs": True, "held_out_template": True, "sft_samples": True, "hard_tasks": True
    }  # fmt: skip
    for split in ("train_templates", "held_out_template"):
        sampled = report["sampled"][split]
        assert set(sampled["paired_with_sft"]) == {"ppo", "ppo_ptx", "ppo_gold", "best_of_n"}
        # SFT's samples scored against SFT itself: the sampler's log-probs equal the reference's.
        assert abs(sampled["kl"]["sft"]) < 1e-4
        # Best of more samples by the reward model has at least the reward of best of fewer.
        curve = sampled["best_of_n_curve"]
        assert [c["n"] for c in curve] == [1, 2, 4] and curve[0]["kl"] == 0.0
        assert curve[0]["reward"] <= curve[1]["reward"] <= curve[2]["reward"]
        assert sampled["reward"]["best_of_n"] == curve[-1]["reward"]
    curves = report["curves"]
    for name in ("ppo", "ppo_ptx", "ppo_gold"):
        points = curves[name]["evaluation"]
        assert [p["step"] for p in points] == [0, 1, 2] and points[0]["kl"] == 0.0
        assert points[0] == curves["ppo"]["evaluation"][0]  # every stage starts at SFT
    assert curves["ppo"]["rollout/kl"][0][1] == pytest.approx(0.0, abs=1e-4)
    assert curves["ppo_ptx"]["train/ptx_nll"] and not curves["ppo"]["train/ptx_nll"]
    nll = report["pretraining_nll"]
    assert set(nll) == {"pretrained", "sft", "ppo", "ppo_ptx", "ppo_gold"}
    assert report["alignment_tax"]["ppo_regression"] == nll["ppo"] - nll["sft"]
    # The gold-reward stage's rollouts are scored by the gold scorer times gold_scale: a
    # multiple of a lexicon score (tanh of an integer), not a reward model's real number.
    gold_scores = [v for _, v in curves["ppo_gold"]["rollout/score"]]
    assert min(gold_scores) >= 0 and max(gold_scores) <= config.ppo.gold_scale

    figures = report["figures"]
    assert len(figures) == 2 * 4 * 2 + 3 + 4 + 2 + 2  # sampled pairs, greedy, RM, hard, NLL
    for figure in figures:
        assert np.isfinite(figure["value"]) and figure["baseline"] is not None, figure
    png = (workdir / report["images"][0]["path"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # four drawn panels, not a blank
    paths = write_report(workdir, {"system": "instructgpt", **report})
    assert "PPO-ptx NLL" in paths["md"].read_text()

    # A rerun resumes every stage as finished: the curve points come from curve.jsonl, once each.
    before = {s: ig.read_curve(workdir / s) for s in ig.ppo_stages(config)}
    ig.train(config, workdir)
    assert {s: ig.read_curve(workdir / s) for s in ig.ppo_stages(config)} == before


def test_paired_comparison_counts_ties_half_and_bounds_the_difference():
    rng = np.random.default_rng(0)
    baseline = rng.integers(0, 3, (400, 2)).astype(float)
    values = baseline + (rng.random((400, 2)) < 0.3)  # 30% of samples one better, the rest tied
    pair = evaluation.paired(values, baseline)
    assert pair["win_rate"] == pytest.approx(0.3 + 0.5 * 0.7, abs=0.03)
    assert pair["tie_rate"] == pytest.approx(0.7, abs=0.03)
    low, high = pair["interval"]
    assert low < pair["difference"] < high and low > 0.2 and high < 0.4
    same = evaluation.paired(baseline, baseline)
    assert same["win_rate"] == 0.5 and same["interval"] == [0.0, 0.0]


def test_best_of_n_picks_the_highest_reward_of_each_group():
    samples = ig.ScoredSamples(
        prompts=[None] * 8,
        responses=[""] * 8,
        kl=np.zeros(8),
        reward=np.array([0.1, 0.9, 0.5, 0.2, -1.0, -2.0, 3.0, 0.0]),
        gold=np.array([0.0, 1.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    )
    best = evaluation.best_of_n(samples, prompts=2, n=2)
    np.testing.assert_array_equal(best["gold"], [[1.0, 0.2], [0.4, 0.6]])
    assert evaluation.best_of_n_kl(1) == 0.0
    assert evaluation.best_of_n_kl(16) == pytest.approx(np.log(16) - 15 / 16)


def test_respond_reads_the_trained_run(run):
    config, workdir, report = run
    save_run(workdir, "instructgpt", config.to_dict())
    # The evaluation's prompts in the same batch: the same greedy responses.
    prompts = [p.text for p in ig.evaluation_prompts(config)["train_templates"]]
    examples = report["examples"]["sft/train_templates"]
    responses = load_policy(workdir, "sft").respond(prompts)
    assert responses[: len(examples)] == [e["response"] for e in examples]
    with pytest.raises(ValueError, match="stage 'rm' trains no policy"):
        load_policy(workdir, "rm")
