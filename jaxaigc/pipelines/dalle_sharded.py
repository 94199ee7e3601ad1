"""Text -> image from a full-size DALL-E run (``dalle-12b``): the transformer restored sharded on
its training mesh (12B parameters fit no single device), image tokens drawn there with the KV
cache, decoded by the run's dVAE and reranked by its CLIP (``stages.clip``) when it has one."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc import parallel
from jaxaigc.configs import stages
from jaxaigc.configs.saved import load_run
from jaxaigc.data.image_tokens import decode_images
from jaxaigc.data.preprocess import CenterCrop, Resize
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.dalle import DALLE
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.text_to_image import Generated, TextToImage
from jaxaigc.sample.decode import sample_image_tokens
from jaxaigc.systems import dalle_pod


def draw_samples(
    model: DALLE, params, text: np.ndarray, sample: ml_collections.ConfigDict, rng, mesh, rules
) -> np.ndarray:
    """``sample.candidates`` image token grids per caption of ``text`` int32 [g, text_len],
    drawn with the KV cache on the mesh -> int32 [g, candidates, image_len]."""
    rows = np.repeat(text, sample.candidates, axis=0)  # row i * candidates + j: caption i
    with jax.set_mesh(mesh), parallel.partitioner(mesh, rules), nn.logical_axis_rules(rules):
        tokens = sample_image_tokens(
            model.config,
            params,
            rows,
            rng=rng,
            temperature=sample.temperature,
            top_k=sample.top_k,
            top_p=sample.top_p,
        )
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(tokens).reshape(len(text), sample.candidates, -1)


def clip_scores(clip: ClipFeatures, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """CLIP cosine of images uint8 [g, n, s, s, 3] to their captions [g] -> [g, n], the images
    resized to CLIP's resolution as its preprocessing does."""
    r = clip.image_size
    ops = [Resize(r), CenterCrop(r)]
    resized = []
    for image in images.reshape(-1, *images.shape[2:]):
        record = {"image": image}
        for op in ops:
            record = op.map(record)
        resized.append(record["image"])
    return clip.scores(np.stack(resized).reshape(*images.shape[:2], r, r, -1), captions)


class ShardedDalleTextToImage(TextToImage):
    """A ``dalle-12b`` run's text -> image. Without a CLIP (``stages.clip`` empty) the samples
    keep their drawn order and their scores are NaN."""

    recipe = "dalle-12b"

    def __init__(self, workdir: str | Path):
        recipe, self.config = load_run(workdir)
        if recipe != self.recipe:
            raise ValueError(f"{workdir} holds a {recipe!r} run, not a {self.recipe} one")
        self.dvae = dalle_pod.load_dvae(self.config, workdir)
        self.model, state, _, self.mesh, self.rules = dalle_pod.restore_trained(
            self.config, workdir, self.dvae
        )
        self.params = state.eval_params
        self.clip = None
        if self.config.stages.clip:
            self.clip = load_clip(stages.trained_run(self.config, workdir, "clip"), batch_size=64)

    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated:
        text = dalle_pod.encode_captions(ClipTokenizer(), captions, self.model.config.text_len)
        sample = ml_collections.ConfigDict(self.config.sample.to_dict())
        sample.candidates = n
        tokens = draw_samples(
            self.model, self.params, text, sample, jax.random.key(seed), self.mesh, self.rules
        )
        images = decode_images(*self.dvae, tokens.reshape(len(text) * n, -1), batch_size=n)
        images = images.reshape(len(text), n, *images.shape[1:])
        if self.clip is None:
            return Generated(images, np.full((len(text), n), np.nan, np.float32))
        scores = clip_scores(self.clip, images, captions)
        order = np.argsort(-scores, axis=1, kind="stable")
        return Generated(
            np.take_along_axis(images, order[:, :, None, None, None], axis=1),
            np.take_along_axis(scores, order, axis=1),
        )
