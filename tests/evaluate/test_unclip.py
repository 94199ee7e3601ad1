"""unCLIP's evaluation: the sampler list it sweeps, and the quick demo's run (the quick recipe on
the quick CLIP, the quick DALL-E beside) evaluated from its checkpoints alone with every option
(every figure with its baseline, the grid written) and loaded as the run's text -> image
pipeline."""

import json
import shutil

import numpy as np
import pytest

from jaxaigc import pipelines
from jaxaigc.configs import clip as clip_config
from jaxaigc.configs import unclip as unclip_config
from jaxaigc.configs.saved import save_run
from jaxaigc.evaluate import unclip as evaluator
from jaxaigc.evaluate.report import write_report
from jaxaigc.train.metrics import read_metrics


def test_samplers_parse_and_bad_ones_are_named():
    assert evaluator.parse_samplers("ddim:25:3,ddpm:100:1") == [
        ("ddim", 25, 3.0),
        ("ddpm", 100, 1.0),
    ]
    assert evaluator.parse_samplers("") == []
    with pytest.raises(ValueError, match="sampler 'plms:10:1' is not method:steps:guidance"):
        evaluator.parse_samplers("ddim:10:1,plms:10:1")
    config = evaluator.with_sampler(unclip_config.get_config(), ("ddpm", 100, 1.0))
    assert (config.sample.decoder_method, config.sample.decoder_steps) == ("ddpm", 100)
    assert unclip_config.get_config().sample.decoder_method == "ddim"  # a copy


def test_the_recipe_leaves_the_clip_fields_to_the_clip():
    for quick in (False, True):
        config = unclip_config.get_config(quick=quick)
        assert list(config.stages) == ["clip", "prior", "decoder", "dalle"]
        for section, names in unclip_config.CLIP_FIELDS.items():
            assert all(config[section].model[name] is None for name in names), (section, quick)
        assert (
            config.prior.model.text_len <= clip_config.get_config(quick=quick).model.context_length
        )


@pytest.mark.slow
def test_the_quick_recipe_trains_and_evaluates_from_its_checkpoints(quick_demo, tmp_path):
    shutil.copytree(quick_demo, tmp_path / "demo")  # the evaluation rewrites the run's grid
    workdir = tmp_path / "demo" / "unclip"
    for stage in ("prior", "decoder"):
        losses = [r["train/loss"] for r in read_metrics(workdir / stage) if "train/loss" in r]
        assert losses[-1] < losses[0], (stage, losses)

    # A config as saved before training (the CLIP fields unset); every path of the evaluator: a
    # sweep (the configured sampler, so nothing recompiles) and the nearest training scene.
    config = unclip_config.get_config(quick=True)
    config.eval.update(dict(sweep="ddim:8:3", nearest_training_scene=True))
    report = evaluator.evaluate(workdir, config)
    figures = {f["name"]: f for f in report["figures"]}
    assert len(figures) >= 7 and all(f["baseline"] is not None for f in figures.values())
    prior = figures["prior cos(predicted z_i, z_i), best of 2"]
    assert prior["baseline_name"] == "text baseline cos(z_t, z_i)"
    assert -1 <= prior["value"] <= 1
    assert "judge on the training scene nearest by z_i" in figures
    assert any(name.startswith("DALL-E") for name in figures)  # the ../dalle run beside
    (image,) = report["images"]
    assert image["key"] == "text_to_image" and (workdir / image["path"]).is_file()
    assert report["test_scenes"] == config.eval.scenes
    assert set(report["pipeline"]) == {"all", "seen", "held_out"}
    assert report["pipeline"]["all"]["samples"] == config.eval.scenes
    assert list(report["sweep"]) == ["ddim:8:3"]
    # The sweep's sampler is the configured one, on the first sweep_scenes scenes.
    assert report["sweep"]["ddim:8:3"]["samples"] == config.eval.sweep_scenes
    written = write_report(workdir, {"system": "unclip", **report})
    assert json.loads(written["json"].read_text())["figures"] == report["figures"]
    assert np.isfinite(report["prior"]["final"]["loss"])

    # The run's inference object: its samples in CLIP's order.
    save_run(workdir, "unclip", config.to_dict())
    out = pipelines.load(workdir)(["a small red circle", "a large blue square"], n=2, seed=0)
    assert out.images.shape == (2, 2, 32, 32, 3) and out.images.dtype == np.uint8
    assert np.all(np.diff(out.scores, axis=1) <= 0)
