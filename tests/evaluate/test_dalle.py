"""The DALL-E recipe's quick config trained on the quick dvae and clip runs beside it, then
evaluated from its checkpoints: every judged figure beside its baseline, and the best-of-N grid."""

from pathlib import Path

import pytest

from jaxaigc.configs import clip as clip_config
from jaxaigc.configs import dalle as dalle_config
from jaxaigc.configs import dvae as dvae_config
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.evaluate import dalle as dalle_eval
from jaxaigc.systems import clip, dalle, dvae

try:
    ClipTokenizer()
except FileNotFoundError as error:
    pytest.skip(f"no CLIP vocabulary: {error}", allow_module_level=True)


@pytest.mark.slow
def test_quick_recipe_trains_and_evaluates(tmp_path: Path):
    # The layout of the demo: the stages ../dvae and ../clip are the runs beside this one.
    dvae.train(dvae_config.get_config(quick=True), tmp_path / "dvae")
    clip.train(clip_config.get_config(quick=True), tmp_path / "clip")
    config = dalle_config.get_config(quick=True)
    config.data.data_dir = str(tmp_path / "data")  # the token cache
    workdir = tmp_path / "dalle"
    workdir.mkdir()
    dalle.train(config, workdir)
    report = dalle_eval.evaluate(workdir, config)

    assert report["final"]["loss"] < report["first_logged"]["loss"]
    assert report["final"]["step"] == config.train.steps
    assert report["candidates"] == config.sample.candidates
    assert report["all"]["captions"] == config.eval.captions
    assert report["seen"]["captions"] + report["held_out"]["captions"] == config.eval.captions
    for group in ("all", "seen", "held_out"):
        r = report[group]
        assert r["single_sample_accuracy"] <= r["any_of_n_accuracy"]
        assert r["best_of_n_accuracy"] <= r["any_of_n_accuracy"]
    figures = report["figures"]
    assert len(figures) == 7
    for figure in figures:
        assert figure["baseline"] is not None and figure["baseline_name"], figure
    (image,) = report["images"]
    assert image["key"] == "text_to_image"
    assert (workdir / image["path"]).stat().st_size > 0
