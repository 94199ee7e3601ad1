"""unCLIP (Ramesh et al. 2022) on shapes scenes, training: the diffusion prior and then the
diffusion decoder, both on the CLIP features of the ``clip`` stage's run.

The features are computed once (:func:`encode_scenes`) and kept in memory: per scene the image
embedding z_i, the text embedding z_t and the caption's per-token features
(:class:`jaxaigc.pipelines.clip.ClipFeatures`). The prior learns z_t and the caption tokens ->
z_i; the decoder learns z_i -> the scene in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.configs.stages import stage_dir
from jaxaigc.configs.unclip import TEXT_LEN
from jaxaigc.data import shapes
from jaxaigc.data.pipeline import ArrayRecords, BatchIterator
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.objectives.unclip import decoder_loss_fn, prior_loss_fn
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.unclip import clip_features, decoder_init, prior_init
from jaxaigc.train import loop


@dataclasses.dataclass(frozen=True)
class SceneFeatures:
    """Shapes scenes with their CLIP features, row-aligned."""

    images: np.ndarray  # uint8 [n, r, r, 3]
    captions: list[str]
    scenes: list[shapes.Scene]
    tokens: np.ndarray  # int32 [n, text_len]
    text_tokens: np.ndarray  # float32 [n, text_len, text_width]
    text_mask: np.ndarray  # bool [n, text_len]
    text_embedding: np.ndarray  # float32 [n, embed_dim], unit norm
    image_embedding: np.ndarray  # float32 [n, embed_dim], unit norm

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> SceneFeatures:
        """The first ``n`` scenes."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)}
        )

    @property
    def held_out(self) -> np.ndarray:
        """bool [n]: the scene has a (colour, shape) pair that training never shows."""
        return np.array(
            [any((o.colour, o.shape) in shapes.HELD_OUT for o in s.objects) for s in self.scenes]
        )


def encode_scenes(
    clip: ClipFeatures, n: int, *, split: str, seed: int, text_len: int = TEXT_LEN
) -> SceneFeatures:
    """``n`` shapes scenes of ``split`` at CLIP's resolution with their CLIP features."""
    images, captions, scenes = shapes.generate(n, clip.image_size, seed=seed, split=split)
    arrays = clip.text_features(captions, length=text_len)
    arrays["image_embedding"] = clip.encode_images(images)
    return SceneFeatures(images=images, captions=captions, scenes=scenes, **arrays)


def training_scenes(config: ml_collections.ConfigDict, clip: ClipFeatures) -> SceneFeatures:
    """The ``config.data`` training scenes with the features of ``clip``."""
    data = config.data
    return encode_scenes(
        clip, data.scenes, split="train", seed=data.seed, text_len=config.prior.model.text_len
    )


def to_signed_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], the decoder's data (:func:`~jaxaigc.pipelines.unclip.to_uint8`
    inverts it)."""
    return images.astype(np.float32) / 127.5 - 1.0


def _features(config, clip, features) -> SceneFeatures:
    if features is not None:
        return features
    if clip is None:
        raise ValueError("give clip (a ClipFeatures or the CLIP run's workdir) or features")
    if not isinstance(clip, ClipFeatures):
        clip = load_clip(clip, batch_size=config.data.encode_batch)
    return training_scenes(config, clip)


def _fit_fields(checks, model: ml_collections.ConfigDict, section: str) -> None:
    """Sets each unset field of ``model`` to the value the features give; a set one must match."""
    for what, value, field in checks:
        if model[field] is None:
            model[field] = int(value)
        elif value != model[field]:
            raise ValueError(
                f"{what} is {value}, but the {section}'s {field} is {model[field]}: set "
                f"config.{section}.model.{field} to {value}"
            )


def make_prior_task(config: ml_collections.ConfigDict) -> tuple[Prior, loop.Task]:
    """The prior and its task (``config.prior``, its CLIP fields set); no data is read."""
    model = Prior(fields.to_dataclass(PriorConfig, config.prior.model))
    loss_fn = prior_loss_fn(model, model.config.diffusion())
    return model, loop.Task(init=prior_init(model), loss_fn=loss_fn)


def prior_batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One prior example's ``{name: (shape, dtype)}``: CLIP's per-token caption features, their
    mask, and the caption's and the image's embeddings."""
    m = config.prior.model
    return {
        "text_tokens": ((m.text_len, m.text_width), jnp.float32),
        "text_mask": ((m.text_len,), jnp.bool_),
        "text_embedding": ((m.embed_dim,), jnp.float32),
        "image_embedding": ((m.embed_dim,), jnp.float32),
    }


def make_decoder_task(config: ml_collections.ConfigDict) -> tuple[Decoder, loop.Task]:
    """The decoder and its task (``config.decoder``, its CLIP fields set); no data is read."""
    model = Decoder(fields.to_dataclass(DecoderConfig, config.decoder.model))
    loss_fn = decoder_loss_fn(model, model.config.diffusion(), **config.decoder.loss.to_dict())
    return model, loop.Task(init=decoder_init(model), loss_fn=loss_fn)


def decoder_batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One decoder example's ``{name: (shape, dtype)}``: an image in [-1, 1], its CLIP image
    embedding and (with a caption encoder) the caption's tokens, or (reading CLIP's caption
    features, Karlo) the caption's CLIP token features, their mask and its CLIP embedding."""
    m = config.decoder.model
    spec = {
        "image": ((m.image_size, m.image_size, 3), jnp.float32),
        "image_embedding": ((m.clip_dim,), jnp.float32),
    }
    if m.text_layers:
        spec["text_tokens"] = ((m.text_len,), jnp.int32)
    if m.get("clip_text_width"):
        spec["text_tokens"] = ((m.text_len, m.clip_text_width), jnp.float32)
        spec["text_mask"] = ((m.text_len,), jnp.bool_)
        spec["text_embedding"] = ((m.clip_dim,), jnp.float32)
    return spec


def build_prior(
    config: ml_collections.ConfigDict,
    clip: ClipFeatures | str | Path | None,
    *,
    features: SceneFeatures | None = None,
) -> tuple[Prior, loop.Task, BatchIterator]:
    """The prior, its task for :func:`jaxaigc.train.loop.train` (with ``config.prior``) and its
    batches of training-scene CLIP features (``features``, else encoded here by ``clip``).
    Unset ``configs.unclip.CLIP_FIELDS`` of ``config.prior.model`` are filled in, in place, from
    them."""
    features = _features(config, clip, features)
    checks = [
        ("the CLIP embedding width", features.text_embedding.shape[1], "embed_dim"),
        ("the CLIP text transformer's width", features.text_tokens.shape[2], "text_width"),
        ("the encoded captions' length", features.text_tokens.shape[1], "text_len"),
    ]
    _fit_fields(checks, config.prior.model, "prior")
    model, task = make_prior_task(config)
    source = ArrayRecords(
        {
            "text_tokens": features.text_tokens,
            "text_mask": features.text_mask,
            "text_embedding": features.text_embedding,
            "image_embedding": features.image_embedding,
        },
        name=f"unclip-prior/{len(features)}",
    )
    batches = BatchIterator(
        source, global_batch_size=config.prior.train.batch_size, seed=config.prior.seed
    )
    return model, task, batches


def build_decoder(
    config: ml_collections.ConfigDict,
    clip: ClipFeatures | str | Path | None,
    *,
    features: SceneFeatures | None = None,
) -> tuple[Decoder, loop.Task, BatchIterator]:
    """The decoder, its task (with ``config.decoder``; its loss weighted by
    ``config.decoder.loss``) and its batches of training scenes in [-1, 1] with their CLIP image
    embeddings (and CLIP caption tokens when the decoder has a text encoder). Unset
    ``configs.unclip.CLIP_FIELDS`` of ``config.decoder.model`` are filled in, in place, from
    them."""
    features = _features(config, clip, features)
    checks = [
        ("the CLIP embedding width", features.image_embedding.shape[1], "clip_dim"),
        ("the scenes' side", features.images.shape[1], "image_size"),
    ]
    _fit_fields(checks, config.decoder.model, "decoder")
    model, task = make_decoder_task(config)
    cfg = model.config
    arrays = {
        "image": to_signed_range(features.images),
        "image_embedding": features.image_embedding,
    }
    if cfg.text_layers:
        vocab = int(features.tokens.max()) + 1
        if vocab > cfg.text_vocab or features.tokens.shape[1] > cfg.text_len:
            raise ValueError(
                f"the decoder's caption encoder takes {cfg.text_len} tokens of {cfg.text_vocab} "
                f"ids; the CLIP captions have {features.tokens.shape[1]} tokens with ids up to "
                f"{vocab - 1}: set config.decoder.model.text_vocab and text_len to fit"
            )
        arrays["text_tokens"] = features.tokens
    source = ArrayRecords(arrays, name=f"unclip-decoder/{len(features)}")
    batches = BatchIterator(
        source, global_batch_size=config.decoder.train.batch_size, seed=config.decoder.seed
    )
    return model, task, batches


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Trains the prior, then the decoder (each resuming from its checkpoints), on the features
    of the CLIP run the ``clip`` stage names."""
    # The stages' paths go through the workdir ("<workdir>/../clip"), so it must exist.
    Path(workdir).mkdir(parents=True, exist_ok=True)
    clip = clip_features(config, workdir)
    features = training_scenes(config, clip)
    for name, build in (("prior", build_prior), ("decoder", build_decoder)):
        _, task, batches = build(config, clip, features=features)
        loop.train(task, batches, config[name], stage_dir(config, workdir, name))
