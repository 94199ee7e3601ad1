"""Run reports: the three files, formatted figures, curves, escaping, and the demo page."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxaigc.evaluate.report import format_value, write_curves, write_demo_report, write_report


def _run(run_dir, *, losses=(4.0, 2.0, 1.0, 0.5), image="samples.png"):
    """A run directory with a falling loss in metrics.jsonl and a small PNG."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 10 * s, "train/loss": v, "train/lr": 1e-3} for s, v in enumerate(losses)]
    lines.append({"step": 40, "eval/acc": 0.5})  # not a train/ scalar: not drawn
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(run_dir / image)
    return run_dir


def _report(system="clip", key="text_to_image", caption="best of 16 <b>& more"):
    return {
        "system": system,
        "title": f"{system} on shapes",
        "figures": [
            {
                "name": "held-out emoji, top-5",
                "value": 0.109,
                "unit": "%",
                "baseline": 0.0037,
                "baseline_name": "chance",
            },
            {"name": "bits per dim", "value": 3.14159, "unit": ""},
        ],
        "images": [{"path": "samples.png", "caption": caption, "key": key}],
        "seconds": 224.0,
        "config": {"steps": 300},
    }


def test_format_value():
    assert format_value(0.109, "%") == "10.9%"
    assert format_value(3.14159) == "3.14"
    assert format_value(224.0, "s") == "224 s"
    assert format_value(None, "%") == "-"


def test_write_report(tmp_path):
    run = _run(tmp_path / "clip")
    _run(run / "prior", losses=(1.0, 0.9))
    paths = write_report(run, _report())
    assert set(paths) == {"json", "md", "html"} and all(p.exists() for p in paths.values())
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, page):
        for shown in ("held-out emoji, top-5", "10.9%", "0.4% (chance)", "bits per dim", "3.14"):
            assert shown in text, shown
        assert "samples.png" in text and "curves.png" in text and "prior/curves.png" in text
    assert "best of 16 &lt;b&gt;&amp; more" in page and "<b>&" not in page
    assert "&quot;steps&quot;: 300" in page and "<details>" in page

    saved = json.loads(paths["json"].read_text())
    curves = [i["path"] for i in saved["images"] if i["key"] == "curves"]
    assert curves == ["curves.png", "prior/curves.png"]
    assert all((run / p).is_file() for p in curves)
    assert saved["config"] == {"steps": 300}
    write_report(run, saved)  # a report read back keeps one entry per curve
    again = json.loads(paths["json"].read_text())
    assert [i["path"] for i in again["images"] if i["key"] == "curves"] == curves


def test_curves_skip_runs_without_train_metrics(tmp_path):
    run = _run(tmp_path / "run")
    (run / "eval_only").mkdir()
    (run / "eval_only" / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/acc": 1}) + "\n")
    assert write_curves(run) == [run / "curves.png"]
    assert Image.open(run / "curves.png").size[0] > 100


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["images"].append({"path": "missing.png"}), "missing.png"),
        (lambda r: r["figures"].append({"name": "no value"}), "no value"),
        (lambda r: r.pop("system"), "system"),
    ],
)
def test_bad_reports_are_rejected(tmp_path, change, message):
    report = _report()
    change(report)
    with pytest.raises(ValueError, match=message):
        write_report(_run(tmp_path / "run"), report)


def test_demo_report(tmp_path):
    for stage in ("dalle", "unclip"):
        write_report(_run(tmp_path / stage), _report(stage, caption=f"{stage} grid"))
    page = write_demo_report(tmp_path, ["dalle", "unclip", "instructgpt"]).read_text()
    md = (tmp_path / "report.md").read_text()
    for text in (page, md):
        assert "dalle on shapes" in text and "unclip on shapes" in text
        assert "10.9%" in text and "0.4% (chance)" in text and "224" in text
        assert "DALL-E and unCLIP on the same captions" in text
        assert "dalle/samples.png" in text and "unclip/curves.png" in text
    assert page.count("not run") == 2  # the summary row and the section of instructgpt
    pair = page[page.index("DALL-E and unCLIP") : page.index('<section id="dalle">')]
    assert "dalle/samples.png" in pair and "unclip/samples.png" in pair


def test_demo_report_without_the_pair(tmp_path):
    write_report(_run(tmp_path / "dalle"), _report("dalle"))
    write_report(_run(tmp_path / "unclip"), _report("unclip", key="decoder"))
    page = write_demo_report(tmp_path, ["dalle", "unclip"]).read_text()
    assert "DALL-E and unCLIP on the same captions" not in page
