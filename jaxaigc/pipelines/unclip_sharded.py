"""Text -> image from the full-size unCLIP runs, which train apart: an ``unclip-decoder-3.5b`` run
and the ``unclip-prior-1b`` run paired with it (the decoder's ``stages.prior``, or one named when
loading). Each is restored sharded on its training mesh and samples there.

The caption's CLIP features come from the frozen text tower the prior run keeps in
``model_state["frozen"]["clip"]`` (the features it trained on, so the prior run alone suffices);
the prior's DDIM gives z_i (best of ``prior_candidates`` by z_i . z_t, paper 2), renormalised;
the decoder draws N images from it with the decoder recipe's sampler and guidance; the CLIP of
the prior's ``stages.clip`` reranks them when that run is at hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc import parallel
from jaxaigc.configs import fields
from jaxaigc.configs.saved import RUN_FILE, load_run
from jaxaigc.configs.stages import stage_dir
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.dalle_sharded import clip_scores
from jaxaigc.pipelines.text_to_image import Generated, TextToImage
from jaxaigc.pipelines.unclip import to_uint8
from jaxaigc.sample.diffusion import sample_decoder, sample_prior
from jaxaigc.systems import unclip_pod
from jaxaigc.train import checkpoint, loop

log = logging.getLogger(__name__)

PRIOR, DECODER = "unclip-prior-1b", "unclip-decoder-3.5b"


@dataclasses.dataclass(frozen=True)
class ShardedRun:
    """A run's model and evaluation variables (EMA when kept), sharded over its training mesh."""

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: parallel.Rules

    @contextlib.contextmanager
    def on_mesh(self) -> Iterator[None]:
        """Traces and runs on the run's mesh with its logical rules, as training did."""
        with (
            jax.set_mesh(self.mesh),
            parallel.partitioner(self.mesh, self.rules),
            nn.logical_axis_rules(self.rules),
        ):
            yield


def read_run(workdir: str | Path, recipe: str, role: str) -> ml_collections.ConfigDict:
    """The config of the ``recipe`` run in ``workdir``; a missing run or another recipe's is
    named with its ``role`` (prior, decoder)."""
    try:
        found, config = load_run(workdir)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the unCLIP {role} run {workdir} has no {RUN_FILE}: train it with `jaxaigc train "
            f"{recipe} --workdir {workdir}`"
        ) from error
    if found != recipe:
        raise ValueError(f"{workdir} holds a {found!r} run; the unCLIP {role} is an {recipe} run")
    return config


def restore_run(
    workdir: str | Path,
    config: ml_collections.ConfigDict,
    make_task: Callable[[ml_collections.ConfigDict], tuple[Any, loop.Task]],
    recipe: str,
) -> ShardedRun:
    """The latest checkpoint's evaluation variables of the run in ``workdir``, read straight
    into their shards on ``config.mesh`` (the optimiser state is not read)."""
    mesh = parallel.make_mesh(config.mesh.shape.to_dict())
    rules = parallel.make_rules(config.mesh.rules.to_dict())
    model, task = make_task(config)
    try:
        _, variables, _ = checkpoint.load_trained(
            workdir, lambda _: task.init, mesh=mesh, rules=rules
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}: train it with `jaxaigc train {recipe} --workdir {workdir}`"
        ) from error
    return ShardedRun(model, variables, config, mesh, rules)


def gather(x: jax.Array) -> np.ndarray:
    """A sample sharded over the mesh, whole on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ShardedUnclipTextToImage(TextToImage):
    """Full-size unCLIP's text -> image: per caption one prior sample, decoded N times, in CLIP's
    order; without the prior's CLIP at hand, in drawn order with NaN scores."""

    recipe = DECODER

    def __init__(self, workdir: str | Path, *, prior: str | Path | None = None):
        config = read_run(workdir, DECODER, "decoder")
        if prior is None:
            if not config.get("stages", {}).get("prior"):
                raise ValueError(
                    f"the decoder run {workdir} names no prior run: pass one "
                    f"(`jaxaigc generate {workdir} --prior DIR ...`, or pipelines.load(..., "
                    "prior=DIR)) or train the decoder with --config.stages.prior=DIR"
                )
            prior = stage_dir(config, workdir, "prior")
        prior_config = read_run(prior, PRIOR, "prior")
        width, clip_dim = prior_config.model.embed_dim, config.model.clip_dim
        if width != clip_dim:
            raise ValueError(
                f"the prior run {prior} draws {width}-wide CLIP image embeddings; the decoder run "
                f"{workdir} reads {clip_dim}-wide ones (config.model.clip_dim): pair runs "
                "trained on the same CLIP's embeddings"
            )
        self.decoder = restore_run(workdir, config, unclip_pod.make_decoder_task, DECODER)
        self.prior = restore_run(prior, prior_config, unclip_pod.make_prior_task, PRIOR)
        tower = CLIP(fields.to_dataclass(CLIPConfig, prior_config.clip))
        self.text = ClipFeatures(
            tower, {"params": self.prior.variables["frozen"]["clip"]}, batch_size=None
        )
        self.clip = None
        clip_dir = stage_dir(prior_config, prior, "clip")
        if (clip_dir / "checkpoints").is_dir():
            self.clip = load_clip(clip_dir, batch_size=64)
        else:
            log.warning("no CLIP run in %s (the prior's stages.clip): no reranking", clip_dir)

    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated:
        prior, decoder = self.prior, self.decoder
        ps, ds = prior.config.sample, decoder.config.sample
        prior_rng, decoder_rng = jax.random.split(jax.random.key(seed))
        with prior.on_mesh():
            text = self.text.text_features(captions, length=prior.model.config.text_len)
            z = sample_prior(
                prior.model, prior.variables["params"], prior.model.config.diffusion(),
                text["text_tokens"], text["text_embedding"], prior_rng,
                text_mask=text["text_mask"], steps=ps.prior_steps, guidance_scale=ps.prior_guidance,
                candidates=ps.prior_candidates,
            )  # fmt: skip
        z = gather(z)
        z = np.repeat(z / np.linalg.norm(z, axis=-1, keepdims=True), n, axis=0)  # row i * n + j
        m = decoder.model.config
        tokens = None
        if m.text_layers:  # tokenised as the decoder's training data are
            tokens = ClipTokenizer().encode(captions, context_length=m.text_len, truncate=True)
            tokens = np.repeat(np.asarray(tokens, np.int32), n, axis=0)
        with decoder.on_mesh():
            images = sample_decoder(
                decoder.model, decoder.variables["params"], m.diffusion(), z, decoder_rng,
                text=tokens, steps=ds.decoder_steps, guidance_scale=ds.decoder_guidance,
                method=ds.decoder_method,
            )  # fmt: skip
        images = to_uint8(gather(images))
        images = images.reshape(len(captions), n, *images.shape[1:])
        if self.clip is None:
            return Generated(images, np.full((len(captions), n), np.nan, np.float32))
        scores = clip_scores(self.clip, images, captions)
        order = np.argsort(-scores, axis=1, kind="stable")
        return Generated(
            np.take_along_axis(images, order[:, :, None, None, None], axis=1),
            np.take_along_axis(scores, order, axis=1),
        )
