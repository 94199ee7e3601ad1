"""The recipes by name, and a recipe's run: its stages trained in order (each resuming from its
checkpoints), then the system's evaluator, whose report goes beside the run (``report.json``,
``report.md``, ``report.html``).

A run directory keeps ``recipe.json`` (the recipe's name and its whole config), so
:func:`evaluate_run` and the inference pipelines rebuild everything from the directory alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from jaxaigc.configs import clip as clip_config
from jaxaigc.configs import dalle as dalle_config
from jaxaigc.configs import dvae as dvae_config
from jaxaigc.configs import fields
from jaxaigc.configs import instructgpt as instructgpt_config
from jaxaigc.configs import lm as lm_config
from jaxaigc.configs import unclip as unclip_config
from jaxaigc.configs.pod import clip as pod_clip_config
from jaxaigc.configs.pod import dalle as dalle_pod_config
from jaxaigc.configs.pod import instructgpt as instructgpt_gpt2_config
from jaxaigc.configs.pod import unclip as unclip_pod_config
from jaxaigc.configs.saved import load_run, save_run
from jaxaigc.evaluate import clip as clip_eval
from jaxaigc.evaluate import dalle as dalle_eval
from jaxaigc.evaluate import dalle_pod as dalle_pod_eval
from jaxaigc.evaluate import dvae as dvae_eval
from jaxaigc.evaluate import instructgpt as instructgpt_eval
from jaxaigc.evaluate import instructgpt_pod as instructgpt_gpt2_eval
from jaxaigc.evaluate import lm as lm_eval
from jaxaigc.evaluate import retrieval as retrieval_eval
from jaxaigc.evaluate import unclip as unclip_eval
from jaxaigc.evaluate import unclip_pod as unclip_pod_eval
from jaxaigc.evaluate.report import write_report
from jaxaigc.systems import (
    clip,
    dalle,
    dalle_pod,
    dvae,
    instructgpt,
    instructgpt_pod,
    lm,
    unclip,
    unclip_pod,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's config (``get_config(quick=...)``), training run and evaluator."""

    get_config: Callable[..., ml_collections.ConfigDict]
    train: Callable[[ml_collections.ConfigDict, Path], None]
    evaluate: Callable[[Path, ml_collections.ConfigDict], dict]


RECIPES: dict[str, Recipe] = {
    "lm": Recipe(lm_config.get_config, lm.train, lm_eval.evaluate),
    "clip": Recipe(clip_config.get_config, clip.train, clip_eval.evaluate),
    "dvae": Recipe(dvae_config.get_config, dvae.train, dvae_eval.evaluate),
    "dalle": Recipe(dalle_config.get_config, dalle.train, dalle_eval.evaluate),
    "unclip": Recipe(unclip_config.get_config, unclip.train, unclip_eval.evaluate),
    "instructgpt": Recipe(
        instructgpt_config.get_config, instructgpt.train, instructgpt_eval.evaluate
    ),
    # Full-size recipes on your data (configs/pod): each names its model and its data fields.
    **{
        name: Recipe(
            functools.partial(pod_clip_config.get_config, model=model, loss=loss),
            clip.train_on_pairs,
            retrieval_eval.evaluate,
        )
        for name, model, loss in (
            ("clip-vit-b32", "ViT-B/32", "softmax"),
            ("clip-vit-b16", "ViT-B/16", "softmax"),
            ("siglip-vit-b16", "ViT-B/16", "sigmoid"),
        )
    },
    "dalle-12b": Recipe(dalle_pod_config.get_config, dalle_pod.train, dalle_pod_eval.evaluate),
    "instructgpt-gpt2": Recipe(
        instructgpt_gpt2_config.get_config, instructgpt_pod.train, instructgpt_gpt2_eval.evaluate
    ),
    "unclip-prior-1b": Recipe(
        unclip_pod_config.get_prior_config, unclip_pod.train_prior, unclip_pod_eval.evaluate_prior
    ),
    "unclip-decoder-3.5b": Recipe(
        unclip_pod_config.get_decoder_config,
        unclip_pod.train_decoder,
        unclip_pod_eval.evaluate_decoder,
    ),
}


def check_recipe(recipe: str) -> None:
    """Raises ValueError for an unknown recipe name, listing the known ones."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")


def get_config(recipe: str, *, quick: bool = False) -> ml_collections.ConfigDict:
    """The config of ``recipe``; ``quick``: the same stages at a few steps and tiny sizes."""
    check_recipe(recipe)
    return RECIPES[recipe].get_config(quick=quick)


def saved_config(workdir: str | Path) -> tuple[str, ml_collections.ConfigDict]:
    """The recipe and config a run was trained with (:func:`load_run`), whose unset fields
    ``--config.x=v`` can set as in the recipe's own config."""
    recipe, saved = load_run(workdir)
    if recipe in RECIPES:
        fields.settable_like(saved, get_config(recipe))
    return recipe, saved


def train_and_evaluate(recipe: str, config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains ``recipe`` with ``config`` in ``workdir`` (resuming), evaluates, writes the report."""
    check_recipe(recipe)
    workdir = Path(workdir)
    start = time.perf_counter()
    if jax.process_index() == 0:
        save_run(workdir, recipe, config.to_dict())
    RECIPES[recipe].train(config, workdir)
    return evaluate_run(workdir, seconds=time.perf_counter() - start)


def evaluate_run(
    workdir: str | Path,
    *,
    config: ml_collections.ConfigDict | None = None,
    seconds: float | None = None,
) -> dict:
    """Evaluates the run in ``workdir`` from its checkpoints, rewrites its report (on process 0;
    every process evaluates) and returns it. ``config`` replaces the saved one for this
    evaluation (another reranking CLIP, more candidates); the report then records it."""
    workdir = Path(workdir)
    recipe, saved = load_run(workdir)
    report = {"system": recipe, **RECIPES[recipe].evaluate(workdir, config or saved)}
    if config is not None and config.to_dict() != saved.to_dict():
        report["evaluated_with_config"] = config.to_dict()
    if seconds is not None:
        report["seconds"] = seconds
    if jax.process_index() == 0:
        write_report(workdir, report)
    return report
