"""The CLIP recipe's quick config trained then evaluated from its checkpoints: every accuracy and
recall is a figure beside its chance level, and the held-out emoji grid is written."""

from pathlib import Path

import pytest

from jaxaigc.configs import clip as clip_config
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate import clip as clip_eval
from jaxaigc.systems import clip

try:
    ClipTokenizer()
except FileNotFoundError as error:
    pytest.skip(f"no CLIP vocabulary: {error}", allow_module_level=True)


@pytest.mark.slow
def test_quick_recipe_trains_and_evaluates(tmp_path: Path):
    config = clip_config.get_config(quick=True)
    clip.train(config, tmp_path)
    report = clip_eval.evaluate(tmp_path, config)

    assert report["final_loss"]["loss"] < report["first_logged_loss"]["loss"]
    assert report["final_loss"]["step"] == config.train.steps
    figures = report["figures"]
    # top-1 and top-5 of each classified set, R@1 and R@5 both ways of each retrieved one, loss
    assert len(figures) == 2 * len(clip_eval.CLASSIFIED) + 4 * len(clip_eval.RETRIEVED) + 1
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
    (image,) = report["images"]
    assert (tmp_path / image["path"]).stat().st_size > 0
