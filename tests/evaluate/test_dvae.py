"""The dVAE recipe's quick config trained then evaluated from its checkpoints: the loss falls, PSNR
rises, and the report holds every figure beside its baseline and the reconstruction grid."""

from pathlib import Path

import numpy as np
import pytest

from jaxaigc.configs import dvae as dvae_config
from jaxaigc.evaluate import dvae as dvae_eval
from jaxaigc.systems import dvae
from jaxaigc.train.metrics import read_metrics


def test_token_grid_baseline_averages_boxes():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :4, :4] = 255  # one whole box white, another half white
    images[0, 4:, :2] = 255
    out = dvae_eval.token_grid_baseline(images, 4)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :4, :4], 255)
    np.testing.assert_array_equal(out[0, 4:, :4], 128)
    np.testing.assert_array_equal(out[0, :, 4:], 0)


@pytest.mark.slow
def test_quick_recipe_trains_and_evaluates(tmp_path: Path):
    config = dvae_config.get_config(quick=True)
    dvae.train(config, tmp_path)
    report = dvae_eval.evaluate(tmp_path, config)

    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert records[-1]["train/psnr"] > records[0]["train/psnr"] + 1.0
    assert report["final"]["step"] == config.train.steps
    shapes = report["shapes_test"]
    assert shapes["n"] == config.eval.shapes and shapes["judge_originals"] == 1.0
    assert 0.0 <= shapes["judge_reconstructions"] <= 1.0
    assert 0.0 < shapes["codes_used"] <= 1.0
    assert report["emoji_test"]["n"] > 100
    figures = report["figures"]
    assert len(figures) == 5
    for figure in figures:
        assert figure["baseline"] is not None and figure["baseline_name"], figure
    (image,) = report["images"]
    assert (tmp_path / image["path"]).stat().st_size > 0
