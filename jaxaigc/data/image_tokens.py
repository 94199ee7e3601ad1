"""DALL-E's training pairs (Ramesh et al. 2021, Sec. 2.2): caption tokens from a byte-level BPE
and image tokens from a trained dVAE, for procedural shapes scenes.

The images are encoded once, as the paper does before training the transformer: the argmax of
the dVAE encoder's logits, one jitted program for every batch. The pairs are written as a TFDS
``array_record`` dataset (no TensorFlow needed) and read back as grain random-access sources,
so :class:`~jaxaigc.data.pipeline.BatchIterator` can save and restore the data position.

The cache is keyed by a fingerprint of everything the records depend on: the data config (counts,
seed, resolution, lengths, held-out pairs), the dVAE (config, checkpoint step, a hash of its
parameters) and the tokenizer (a hash of its JSON). A new dVAE checkpoint or a changed config
builds a new dataset beside the old one instead of reusing stale tokens.

Records: ``text`` int32 [text_len] (the caption's ids, EOS, then pad ids; no BOS, which the
model prepends), ``image`` int32 [image_side ** 2] (raster order), ``caption`` str and
``held_out`` bool (the scene holds a (colour, shape) pair kept out of training). Record i of a
split is scene i of :func:`jaxaigc.data.shapes.generate` for that split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from jaxaigc.compile_options import apply_in_batches, jit_inference
from jaxaigc.data import builders, shapes
from jaxaigc.data.tokenizers import BPETokenizer, train_bpe
from jaxaigc.models import dvae

TOKENIZER_FILE = "tokenizer.json"
# Part of the fingerprint: bumped when the records or the way they are made change.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenPairsConfig:
    """What the cached pairs hold; every field is part of the cache's fingerprint."""

    resolution: int = 32  # scene side in pixels, as the dVAE stage trained on
    image_side: int = 8  # side of the dVAE's token grid: image_side ** 2 tokens per image
    text_len: int = 20  # caption ids with EOS; the longest shapes caption is 16
    bpe_vocab_size: int = 512  # an upper bound: shapes captions run out of merges at ~370 ids
    train: int = 20_000  # scenes per split, from the split's own random stream
    validation: int = 1_000
    test: int = 1_000
    seed: int = 0
    truncate: bool = False  # cut captions longer than text_len instead of raising
    held_out: tuple[tuple[str, str], ...] = tuple(sorted(shapes.HELD_OUT))

    def __post_init__(self):
        for name in ("resolution", "image_side", "train", "validation", "test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_len < 2:
            raise ValueError(f"text_len {self.text_len} leaves no room for a caption and EOS")

    def replace(self, **changes: Any) -> TokenPairsConfig:
        return dataclasses.replace(self, **changes)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


@dataclasses.dataclass(frozen=True)
class TokenPairs:
    """The cached pairs: a grain source per split, and the tokenizer that made their text."""

    config: TokenPairsConfig
    tokenizer: BPETokenizer
    splits: dict[str, builders.Source]
    directory: Path  # the array_record files and tokenizer.json
    fingerprint: str


def check_grid(model: dvae.DVAEConfig, *, resolution: int, image_side: int) -> None:
    """Raises ``ValueError`` unless ``model`` turns ``resolution`` px images into an
    ``image_side`` x ``image_side`` token grid."""
    grid = resolution // model.downsample
    if resolution % model.downsample or grid != image_side:
        raise ValueError(
            f"the dVAE downsamples {model.downsample}x ({model.group_count} groups), so "
            f"{resolution} px images give a {resolution / model.downsample:g} x "
            f"{resolution / model.downsample:g} token grid, but image_side is {image_side}; "
            f"use {model.downsample * image_side} px images or a dVAE with that grid"
        )


def _decode_uint8(model: dvae.DVAEConfig, variables: dict, ids: jax.Array) -> jax.Array:
    return jnp.round(dvae.decode(model, variables, ids) * 255).astype(jnp.uint8)


@functools.cache
def _jitted(fn: Callable) -> Callable:
    """``fn`` jitted on first use, not at import: ``jit_inference`` asks for the backend, which
    would start it before a multi-process run has joined. One compiled program per (model config,
    batch shape): the config is hashable and static."""
    return jit_inference(fn, static_argnums=0)


def encode_images(
    model: dvae.DVAEConfig, variables: dict, images: np.ndarray, *, batch_size: int = 500
) -> np.ndarray:
    """The dVAE's argmax tokens of ``images`` uint8 [n, H, W, c] as int32 [n, h * w] (raster).

    Args:
      model, variables: the dVAE, variables ``{"encoder": {"params"}, ...}``.
      images: uint8 images, or floats in [0, 1].
      batch_size: images per call of the one compiled program (the last batch is padded).
    """
    encode = _jitted(dvae.encode)
    ids = apply_in_batches(lambda chunk: encode(model, variables, chunk), images, batch_size)
    return ids.reshape(len(images), -1)


def decode_images(
    model: dvae.DVAEConfig, variables: dict, tokens: np.ndarray, *, batch_size: int = 500
) -> np.ndarray:
    """Image tokens int [n, side ** 2] (raster) -> uint8 images [n, H, W, c] from the decoder."""
    n, length = tokens.shape
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"{length} tokens per image is not a square grid")
    grids = np.asarray(tokens, np.int32).reshape(n, side, side)
    decode = _jitted(_decode_uint8)
    return apply_in_batches(lambda chunk: decode(model, variables, chunk), grids, batch_size)


def params_digest(variables: Any) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fingerprint(
    config: TokenPairsConfig,
    model: dvae.DVAEConfig,
    variables: dict,
    tokenizer: BPETokenizer,
    *,
    dvae_step: int | None,
) -> tuple[str, dict]:
    """The cache key (16 hex digits) and the inputs it hashes, as JSON-ready data."""
    inputs = {
        "format": FORMAT_VERSION,
        "data": dataclasses.asdict(config),
        "dvae": {
            "config": dataclasses.asdict(model),
            "step": dvae_step,
            "params_sha256": params_digest(variables),
        },
        # __getstate__ is the tokenizer's JSON (vocabulary, merges, special tokens).
        "tokenizer_sha256": hashlib.sha256(tokenizer.__getstate__().encode()).hexdigest(),
    }
    text = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], json.loads(text)


@dataclasses.dataclass(kw_only=True)
class _CacheConfig(tfds.core.BuilderConfig):
    text_len: int = 0
    image_side: int = 0


class ShapesTokenPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shapes scenes as (caption tokens, dVAE image tokens); one builder config per fingerprint.

    ``make_records(split)`` yields the records; it runs only when the dataset is not built yet.
    ``inputs`` (what the fingerprint hashes) are saved in the dataset's ``metadata.json``.
    """

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # reads nothing from disk or network (see builders._OfflineBuilder)

    def __init__(
        self,
        *,
        make_records: Callable[[str], Iterator[dict]] | None = None,
        inputs: dict | None = None,
        **kwargs: Any,
    ):
        self._make_records, self._inputs = make_records, inputs
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=c.description,
            # The fingerprint's inputs, written to metadata.json with the dataset.
            metadata=tfds.core.MetadataDict(fingerprint=self._inputs),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Tensor(shape=(c.text_len,), dtype=np.int32),
                    "image": tfds.features.Tensor(shape=(c.image_side**2,), dtype=np.int32),
                    "caption": tfds.features.Text(),
                    "held_out": tfds.features.Scalar(np.bool_),
                }
            ),
            # Written in order, so record i is scene i of the split's stream.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._make_records is None:
            raise RuntimeError(f"{self.builder_config.name} is not built; build it with load()")
        return {split: self._generate_examples(split) for split in shapes.SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        yield from enumerate(self._make_records(split))


def _encode_captions(
    tokenizer: BPETokenizer, captions: list[str], config: TokenPairsConfig, split: str
) -> np.ndarray:
    try:
        return tokenizer.encode(
            captions, length=config.text_len, eos=True, truncate=config.truncate
        )
    except ValueError as error:
        raise ValueError(
            f"{split} split: {error}. Raise TokenPairsConfig.text_len or set truncate=True"
        ) from error


def load(
    config: TokenPairsConfig,
    model: dvae.DVAEConfig,
    variables: dict,
    *,
    dvae_step: int | None,
    data_dir: str | Path | None = None,
    encode_batch_size: int = 500,
) -> TokenPairs:
    """The (caption tokens, image tokens) pairs of ``config``, built on first use, reused after.

    The scenes are generated and the tokenizer trained on the train captions (about a second
    for 20,000 scenes) to compute the fingerprint; the images are encoded only when no dataset
    with that fingerprint is built in ``data_dir``.

    Args:
      config: the scenes and lengths.
      model, variables: the dVAE that encodes the images, e.g. from
        :func:`jaxaigc.pipelines.dvae.load_trained`.
      dvae_step: its checkpoint step (None for untrained parameters); part of the fingerprint.
      data_dir: where built datasets live; defaults to :func:`builders.default_data_dir`.
      encode_batch_size: images per call of the encoder.

    Returns:
      The splits as grain sources of the records in the module docstring, and the tokenizer.
    """
    check_grid(model, resolution=config.resolution, image_side=config.image_side)
    held_out = frozenset(config.held_out)
    scenes = {
        split: shapes.generate(
            n, config.resolution, seed=config.seed, split=split, held_out=held_out
        )
        for split, n in config.sizes.items()
    }
    tokenizer = train_bpe(scenes["train"][1], vocab_size=config.bpe_vocab_size)
    # Captions are checked against text_len before any image is encoded.
    texts = {
        split: _encode_captions(tokenizer, captions, config, split)
        for split, (_, captions, _) in scenes.items()
    }
    key, inputs = fingerprint(config, model, variables, tokenizer, dvae_step=dvae_step)

    def make_records(split: str) -> Iterator[dict]:
        images, captions, split_scenes = scenes[split]
        tokens = encode_images(model, variables, images, batch_size=encode_batch_size)
        for text, image, caption, scene in zip(
            texts[split], tokens, captions, split_scenes, strict=True
        ):
            held = any((o.colour, o.shape) in held_out for o in scene.objects)
            yield {"text": text, "image": image, "caption": caption, "held_out": held}

    builder = ShapesTokenPairs(
        make_records=make_records,
        inputs=inputs,
        config=_CacheConfig(
            name=key,
            description="Shapes scenes as BPE caption tokens and dVAE image tokens.",
            text_len=config.text_len,
            image_side=config.image_side,
        ),
        data_dir=str(Path(data_dir) if data_dir is not None else builders.default_data_dir()),
        file_format="array_record",
    )
    builder.download_and_prepare()  # a no-op once built
    directory = Path(builder.data_dir)
    if not (directory / TOKENIZER_FILE).exists():
        tokenizer.save(directory / TOKENIZER_FILE)
    return TokenPairs(
        config=config,
        tokenizer=tokenizer,
        splits={split: builders.Source(builder, split) for split in shapes.SPLITS},
        directory=directory,
        fingerprint=key,
    )
