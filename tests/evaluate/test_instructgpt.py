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
    assert 0 <= report["reward_model"]["accuracy"] <= 1 and report["reward_model"]["pairs"] > 0
    assert set(report["gold_score"]) == {
        f"{n}/{s}"
        for n in ("sft", "ppo", "ppo_ptx", "ppo_gold")
        for s in ("train_templates", "held_out_template")
    }
    curves = report["curves"]
    assert len(curves["ppo"]["rollout/kl"]) == 2
    assert curves["ppo"]["rollout/kl"][0][1] == 0.0  # the policy starts as SFT
    assert curves["ppo_ptx"]["train/ptx_nll"] and not curves["ppo"]["train/ptx_nll"]
    assert all(np.isfinite(v) for v in report["pretraining_nll"].values())
    assert set(report["pretraining_nll"]) == {"pretrained", "sft", "ppo", "ppo_ptx", "ppo_gold"}
    # The gold-reward stage's rollouts are scored by the gold scorer: within [0, gold_scale].
    gold_scores = [v for _, v in curves["ppo_gold"]["rollout/score"]]
    assert all(0 <= v <= config.ppo.gold_scale for v in gold_scores)
    assert set(report["win_rate_over_sft"]) == {"ppo", "ppo_gold"}
    # The gold curves: SFT's greedy score on the same 8 prompts, then every iteration.
    sft_gold = report["gold_score"]["sft/train_templates"]
    for name in ("ppo", "ppo_ptx"):
        steps, gold = zip(*curves[name]["gold"], strict=True)
        assert steps == (0, 1, 2) and gold[0] == pytest.approx(sft_gold)
    assert set(report["gold_score_sampled"]) == {"sft", "ppo", "ppo_ptx", "ppo_gold"}

    figures = report["figures"]
    assert len(figures) == 4 + 3 + 6 + 2  # win-rates, RM accuracies, gold scores, NLLs
    for figure in figures:
        assert np.isfinite(figure["value"]) and figure["baseline"] is not None, figure
    assert figures[0]["baseline"] == 0.5 and figures[0]["baseline_name"] == "SFT against itself"
    png = (workdir / report["images"][0]["path"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # four drawn panels, not a blank
    paths = write_report(workdir, {"system": "instructgpt", **report})
    assert "PPO-ptx NLL" in paths["md"].read_text()

    # A rerun resumes every stage as finished: the gold points come from gold.jsonl, once each.
    before = {s: ig.read_gold_curve(workdir / s) for s in ig.ppo_stages(config)}
    ig.train(config, workdir)
    assert {s: ig.read_gold_curve(workdir / s) for s in ig.ppo_stages(config)} == before


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
