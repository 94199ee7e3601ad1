"""``jaxaigc demo --quick`` end to end, then every subcommand that reads a run on its stages, and
the README's Python examples on them: the report holds every stage's figures and pictures."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxaigc.cli import DEMO_STAGES
from tests.helpers import ROOT, jaxaigc, succeeded

pytestmark = pytest.mark.slow


@pytest.fixture
def demo(quick_demo) -> Path:
    return quick_demo


def test_the_report_holds_every_stage(demo):
    page = (demo / "report.html").read_text()
    for stage in DEMO_STAGES:
        report = json.loads((demo / stage / "report.json").read_text())
        assert report["system"] == stage and report["figures"], stage
        for figure in report["figures"]:
            assert html.escape(figure["name"]) in page, figure
        for image in report["images"]:
            assert (demo / stage / image["path"]).stat().st_size > 0, image
            assert f"{stage}/{image['path']}" in page
        for kind in ("md", "html"):
            assert (demo / stage / f"report.{kind}").is_file()
    assert "DALL-E and unCLIP on the same captions" in page


def test_eval_rewrites_the_report_with_the_same_figures(demo, tmp_path):
    run = shutil.copytree(demo / "lm", tmp_path / "lm")  # the demo is shared: rewrite a copy
    before = json.loads((run / "report.json").read_text())
    succeeded(jaxaigc("eval", run))
    after = json.loads((run / "report.json").read_text())
    assert after["figures"] == before["figures"]


@pytest.mark.parametrize("stage", ["dalle", "unclip"])
def test_generate_writes_a_grid_best_first(demo, tmp_path, stage):
    out = tmp_path / f"{stage}.png"
    stdout = succeeded(
        jaxaigc("generate", demo / stage, "a small red circle", "a large blue square",
                "--n", 3, "--out", out)
    )  # fmt: skip
    assert stdout.strip().endswith(str(out)) and Image.open(out).size[0] > 0
    scores = [json.loads(s) for s in re.findall(r"best first: (\[.*\])", stdout)]
    assert len(scores) == 2 and all(s == sorted(s, reverse=True) for s in scores)


def test_zero_shot_prints_a_distribution(demo, tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        image = np.zeros((48, 48, 3), np.uint8)
        image[12:36, 12:36] = colour
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    stdout = succeeded(
        jaxaigc("zero-shot", demo / "clip", *paths, "--labels", "red square,blue square,cat")
    )
    for path in paths:
        line = next(line for line in stdout.splitlines() if line.startswith(str(path)))
        shares = [float(p) for p in re.findall(r"(\d+\.\d)%", line)]
        assert len(shares) == 3 and 99.0 <= sum(shares) <= 100.1, line


def test_respond_answers_each_prompt(demo):
    stdout = succeeded(
        jaxaigc("respond", demo / "instructgpt", "Reverse the word: cat", "--max-tokens", 8)
    )
    assert "Reverse the word: cat\n-> " in stdout


def test_readme_python_examples_run_as_written(demo, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path,
            timeout=600, env={**os.environ, "XLA_FLAGS": ""},
        )  # fmt: skip
        assert result.returncode == 0, block + result.stderr[-3000:]


def stage_report(demo: Path, stage: str) -> tuple[dict, object]:
    from jaxaigc import run

    return json.loads((demo / stage / "report.json").read_text()), run.get_config(stage, quick=True)


def test_the_clip_stage_reports_every_measure_beside_chance(demo):
    from jaxaigc.evaluate import clip as clip_eval

    report, config = stage_report(demo, "clip")
    assert report["final_loss"]["loss"] < report["first_logged_loss"]["loss"]
    assert report["final_loss"]["step"] == config.train.steps
    figures = report["figures"]
    # top-5 and top-1 of each classified set, R@1 and R@5 both ways of each retrieved one, loss
    assert len(figures) == 2 * len(clip_eval.CLASSIFIED) + 4 * len(clip_eval.RETRIEVED) + 1
    assert figures[0]["name"].startswith("held-out Noto emoji (zero-shot): top-5")
    for figure in figures[:-1]:
        assert 0 <= figure["value"] <= 1 and figure["baseline_name"] == "chance", figure
        assert 0 < figure["baseline"] <= 1 and figure["unit"] == "%", figure
    fashion = report["fashion_mnist"]
    assert fashion["n"] == config.eval.fashion_mnist and fashion["kind"] == "zero-shot"
    assert fashion["chance_top1"] == pytest.approx(0.1)
    assert report["shapes_test"]["n"] == config.eval.shapes
    held_out = report["noto_held_out_names"]
    assert held_out["chance_top5"] == pytest.approx(5 * held_out["chance_top1"])
    assert len(report["held_out_examples"]) == config.eval.examples


def test_the_dalle_stage_judges_its_reranked_samples(demo):
    from jaxaigc.evaluate.judge import GROUPS
    from jaxaigc.pipelines.dalle import RULES

    report, config = stage_report(demo, "dalle")
    assert report["final"]["loss"] < report["first_logged"]["loss"]
    assert report["final"]["step"] == config.train.steps
    assert report["candidates"] == config.sample.candidates
    assert report["all"]["captions"] == config.eval.captions
    assert report["seen"]["captions"] + report["held_out"]["captions"] == config.eval.captions
    binding = report["binding_set"]
    assert binding["all"]["captions"] == config.eval.binding_captions
    for r in [report[group] for group in GROUPS] + [binding[group] for group in GROUPS]:
        assert r["single_sample_accuracy"] <= r["any_of_n_accuracy"]
        assert set(r["best_of_n_accuracy_by_rule"]) == set(RULES)
        for accuracy in r["best_of_n_accuracy_by_rule"].values():
            assert accuracy <= r["any_of_n_accuracy"]
        assert r["best_of_n_accuracy"] == r["best_of_n_accuracy_by_rule"][config.sample.rerank]
    # The test captions' best of n, single sample, ceiling, held-out pairs, binding, swaps; the
    # binding set's best of n, ceiling, binding, swaps; each other rule's best of n on both; NLL.
    assert len(report["figures"]) == 6 + 4 + 2 * (len(RULES) - 1) + 1
    for figure in report["figures"]:
        assert figure["baseline"] is not None and figure["baseline_name"], figure
    assert [image["key"] for image in report["images"]][:2] == ["text_to_image", "binding"]
