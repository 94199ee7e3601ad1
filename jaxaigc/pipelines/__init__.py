"""Inference with one shape for every system: a run directory (trained, or converted from
OpenAI's or Hugging Face's weights) loads into an object you call.

- text -> image (DALL-E, unCLIP): ``load(workdir)(captions, n=16, seed=0)`` -> :class:`Generated`;
  the full-size unCLIP, trained as two runs: ``load(decoder_run, prior=prior_run)``;
- CLIP: ``load_clip(workdir).classify(images, labels)``, ``.scores``, ``.encode_images``, ...;
- InstructGPT: ``load_policy(workdir, "ppo_ptx").respond(prompts)``; a converted GPT-2:
  ``load(workdir).respond(prompts)`` continues them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxaigc.configs.saved import load_run
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.dalle import DalleTextToImage
from jaxaigc.pipelines.dalle_sharded import ShardedDalleTextToImage
from jaxaigc.pipelines.instructgpt import Policy, load_policy
from jaxaigc.pipelines.language_model import LanguageModel, load_language_model
from jaxaigc.pipelines.text_to_image import Generated, TextToImage
from jaxaigc.pipelines.unclip import UnclipTextToImage
from jaxaigc.pipelines.unclip_sharded import ShardedUnclipTextToImage

__all__ = [
    "ClipFeatures",
    "Generated",
    "LanguageModel",
    "Policy",
    "TextToImage",
    "load",
    "load_clip",
    "load_language_model",
    "load_policy",
    "read_images",
]


def load(
    workdir: str | Path, *, prior: str | Path | None = None
) -> TextToImage | ClipFeatures | Policy | LanguageModel:
    """The inference object of the run in ``workdir``, as its recipe says: a DALL-E or unCLIP
    :class:`TextToImage`, a CLIP's :class:`ClipFeatures`, an InstructGPT :class:`Policy`, a
    converted GPT-2's :class:`LanguageModel`. ``prior``: the ``unclip-prior-1b`` run an
    ``unclip-decoder-3.5b`` run generates with (by default its ``stages.prior``)."""
    recipe, _ = load_run(workdir)
    if recipe == ShardedUnclipTextToImage.recipe:
        return ShardedUnclipTextToImage(workdir, prior=prior)
    if prior is not None:
        raise ValueError(
            f"prior= pairs an {ShardedUnclipTextToImage.recipe} run with its prior; {workdir} "
            f"is a {recipe!r} run"
        )
    if recipe == "unclip-prior-1b":
        raise ValueError(
            f"{workdir} is a full-size unCLIP prior: load its decoder run, "
            f"pipelines.load(DECODER_RUN, prior={str(workdir)!r})"
        )
    loaders = {
        "dalle": DalleTextToImage,
        "dalle-12b": ShardedDalleTextToImage,
        "unclip": UnclipTextToImage,
        "clip": load_clip,
        "clip-vit-b32": load_clip,
        "clip-vit-b16": load_clip,
        "siglip-vit-b16": load_clip,
        "instructgpt": load_policy,
        "instructgpt-gpt2": load_policy,
        "gpt2": load_language_model,
    }
    if recipe not in loaders:
        raise ValueError(
            f"{workdir} is a {recipe!r} run, which has no inference object; these do: "
            f"{', '.join(loaders)}"
        )
    return loaders[recipe](workdir)


def read_images(paths: Sequence[str | Path], *, size: int) -> np.ndarray:
    """Image files -> uint8 [n, size, size, 3]: RGB, the shorter side resized to ``size`` with
    bicubic filtering, then centre-cropped (CLIP's preprocessing)."""
    images = []
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path} is not an image PIL can read: {error}") from error
        scale = size / min(image.size)
        w, h = (max(size, round(side * scale)) for side in image.size)
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        images.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return np.stack(images)
