"""unCLIP at full size on your own data, training (Ramesh et al. 2022; recipes ``unclip-prior-1b``
and ``unclip-decoder-3.5b``, configs :mod:`jaxaigc.configs.pod.unclip`).

- Prior: clip-retrieval's embeddings (:class:`jaxaigc.data.embeddings.ClipEmbeddings`) give z_i
  and z_t; the caption's per-token features, which clip-retrieval does not keep, are computed in
  the step from its CLIP BPE tokens by the frozen text tower of the CLIP that made the
  embeddings, held in ``model_state["frozen"]["clip"]`` (:func:`caption_features`, equal to
  :meth:`jaxaigc.pipelines.clip.ClipFeatures.text_features`).
- Decoder: WebDataset images joined by key to their z_i
  (:class:`jaxaigc.data.embeddings.EmbeddedImages`), resized and centre-cropped to the model's
  side in [-1, 1], with the caption's CLIP BPE tokens when the decoder encodes captions.

Losses: :mod:`jaxaigc.objectives.unclip`. Each recipe is one :func:`jaxaigc.train.loop.train`
run in its workdir.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.configs.stages import trained_run
from jaxaigc.data import shards
from jaxaigc.data.embeddings import ClipEmbeddings, EmbeddedImages
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import CenterCrop, Normalize, Resize, ToFloat, ToRGB
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.objectives.unclip import decoder_loss_fn, prior_loss_fn
from jaxaigc.pipelines.unclip import decoder_init, prior_init
from jaxaigc.systems import clip as clip_system
from jaxaigc.train import loop
from jaxaigc.train.ppo import load_params

# The CLIP fields that shape its text tower: a CLIP run must match config.clip in these.
TOWER_FIELDS = ("embed_dim", "context_length", "vocab_size", "transformer_width",
                "transformer_heads", "transformer_layers")  # fmt: skip


def require(config: ml_collections.ConfigDict, name: str, example: str) -> str:
    """``config.<name>`` (a dotted path), which must be set; empty names the field and an
    example."""
    value = config
    for part in name.split("."):
        value = value[part]
    if not value:
        raise ValueError(f"config.{name} is empty: set --config.{name}={example}")
    return value


def text_tower(variables: dict) -> dict:
    """The CLIP parameters its text features read: all but the image tower's."""
    return {name: value for name, value in variables["params"].items() if name != "visual"}


def caption_features(clip: CLIP, tower: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The prior's caption conditioning from CLIP BPE tokens int [b, n], as
    :meth:`~jaxaigc.pipelines.clip.ClipFeatures.text_features` takes it: the final LayerNorm's
    per-token features float32 [b, n, width] and the mask bool [b, n] of SOT..EOT (the causal
    tower makes the positions after EOT padding)."""
    _, per_token = clip.apply({"params": tower}, tokens, method="text_features")
    mask = jnp.arange(tokens.shape[1]) <= jnp.argmax(tokens, axis=-1)[:, None]
    return per_token, mask


def check_clip(config: ml_collections.ConfigDict, clip: CLIPConfig, where: str) -> None:
    """The CLIP of ``where`` must be ``config.clip``'s text tower and fit the prior."""
    for name in TOWER_FIELDS:
        if getattr(clip, name) != config.clip[name]:
            raise ValueError(
                f"the CLIP in {where} has {name} {getattr(clip, name)}; config.clip.{name} "
                f"is {config.clip[name]}: set --config.clip.{name}="
                f"{getattr(clip, name)}"
            )
    m = config.model
    for what, value, field in (
        ("embedding width", clip.embed_dim, "embed_dim"),
        ("text transformer width", clip.transformer_width, "text_width"),
    ):
        if value != m[field]:
            raise ValueError(
                f"the CLIP's {what} is {value}; config.model.{field} is {m[field]}: set "
                f"--config.model.{field}={value}"
            )
    if m.text_len > clip.context_length:
        raise ValueError(
            f"config.model.text_len {m.text_len} exceeds the CLIP's context of "
            f"{clip.context_length} tokens"
        )


def make_prior_task(
    config: ml_collections.ConfigDict, clip: tuple[CLIP, dict] | None = None
) -> tuple[Prior, loop.Task]:
    """The prior and its task; no data is read. ``clip``: the frozen CLIP ``(model, variables)``
    whose text tower computes the caption features in the step; None: a random one of
    ``config.clip``'s shapes (to size the step)."""
    model = Prior(fields.to_dataclass(PriorConfig, config.model))
    if clip is None:
        clip_model, tower = CLIP(fields.to_dataclass(CLIPConfig, config.clip)), None
    else:
        clip_model, tower = clip[0], text_tower(clip[1])
    check_clip(config, clip_model.config, "the frozen CLIP")
    init_prior, text_len = prior_init(model), model.config.text_len
    prior_loss = prior_loss_fn(model, model.config.diffusion())

    def init(rng: jax.Array) -> dict:
        prior_rng, clip_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, text_len), jnp.int32)
        boxed = clip_model.init(clip_rng, tokens, method="text_features")["params"]
        return {
            "params": init_prior(prior_rng)["params"],
            "frozen": {"clip": load_params(boxed, tower, "CLIP")},
        }

    def loss_fn(params, model_state, batch, rng):
        text_tokens, text_mask = caption_features(
            clip_model, model_state["frozen"]["clip"], batch["tokens"]
        )
        features = {
            "text_tokens": text_tokens,
            "text_mask": text_mask,
            "text_embedding": batch["text_embedding"],
            "image_embedding": batch["image_embedding"],
        }
        loss, metrics = prior_loss(params, features, rng)
        return loss, (metrics, model_state)

    return model, loop.Task(init=init, loss_fn=loss_fn, has_model_state=True)


def prior_batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One prior example's ``{name: (shape, dtype)}``: the caption's CLIP BPE tokens and the
    caption's and the image's CLIP embeddings."""
    m = config.model
    return {
        "tokens": ((m.text_len,), jnp.int32),
        "text_embedding": ((m.embed_dim,), jnp.float32),
        "image_embedding": ((m.embed_dim,), jnp.float32),
    }


def make_decoder_task(config: ml_collections.ConfigDict) -> tuple[Decoder, loop.Task]:
    """The decoder and its task (its loss weighted by ``config.loss``); no data is read."""
    model = Decoder(fields.to_dataclass(DecoderConfig, config.model))
    loss_fn = decoder_loss_fn(model, model.config.diffusion(), **config.loss.to_dict())
    return model, loop.Task(init=decoder_init(model), loss_fn=loss_fn)


def decoder_batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One decoder example's ``{name: (shape, dtype)}``: an image in [-1, 1], its CLIP image
    embedding and (with a caption encoder) the caption's CLIP BPE tokens."""
    m = config.model
    spec = {
        "image": ((m.image_size, m.image_size, 3), jnp.float32),
        "image_embedding": ((m.clip_dim,), jnp.float32),
    }
    if m.text_layers:
        spec["text_tokens"] = ((m.text_len,), jnp.int32)
    return spec


@dataclasses.dataclass(frozen=True)
class TokenizeCaption(grain.transforms.Map):
    """The record's ``keep`` fields and, with ``length``, its caption's tokens int32 [length]
    as ``key`` (long captions keep their EOT); the strings go: a batch holds arrays only."""

    keep: tuple[str, ...]
    _: dataclasses.KW_ONLY
    encode: Callable[..., Any] | None = None
    length: int = 0
    key: str = "tokens"

    def map(self, element: dict) -> dict:
        out = {name: element[name] for name in self.keep}
        if self.length:
            tokens = self.encode([element["caption"]], context_length=self.length, truncate=True)
            out[self.key] = np.asarray(tokens[0], np.int32)
        return out


def prior_operations(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer) -> list:
    """An embeddings record -> the prior's example (:func:`prior_batch_spec`)."""
    keep = ("text_embedding", "image_embedding")
    return [TokenizeCaption(keep, encode=tokenizer.encode, length=config.model.text_len)]


def decoder_operations(
    config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, *, extra: tuple[str, ...] = ()
) -> list:
    """A joined image record -> the decoder's example (:func:`decoder_batch_spec`): the image
    resized (shorter side) and centre-cropped to the model's side, in [-1, 1]; ``extra`` fields
    of the record kept too (the evaluation's captions)."""
    m = config.model
    tokens = dict(encode=tokenizer.encode, length=m.text_len) if m.text_layers else {}
    return [
        ToRGB(),
        Resize(m.image_size),
        CenterCrop(m.image_size),
        ToFloat(),
        Normalize(0.5, 0.5),
        TokenizeCaption(("image", "image_embedding", *extra), key="text_tokens", **tokens),
    ]


def load_clip_run(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[CLIP, dict]:
    """The frozen CLIP of ``stages.clip`` (relative to ``workdir``), checked against the config."""
    require(config, "stages.clip", "DIR (a CLIP run: `jaxaigc convert clip ViT-L-14.pt DIR`)")
    directory = trained_run(config, workdir, "clip")
    model, variables, _ = clip_system.load_trained(directory)
    check_clip(config, model.config, str(directory))
    return model, variables


def check_width(embeddings: ClipEmbeddings, width: int, field: str) -> None:
    if embeddings.width != width:
        raise ValueError(
            f"{embeddings!r} holds {embeddings.width}-wide embeddings; config.model.{field} is "
            f"{width}: set --config.model.{field}={embeddings.width}, the width of the CLIP that "
            "made them"
        )


def prior_source(config: ml_collections.ConfigDict, field: str) -> ClipEmbeddings:
    """The embeddings of ``config.data.<field>``, of the prior's width."""
    folders = require(config, f"data.{field}", "gs://BUCKET/embeddings (clip-retrieval's output)")
    embeddings = ClipEmbeddings(folders)
    check_width(embeddings, config.model.embed_dim, "embed_dim")
    return embeddings


def decoder_source(
    config: ml_collections.ConfigDict, *, source: str = "source", embeddings: str = "embeddings"
) -> EmbeddedImages:
    """The images of ``config.data.<source>`` joined to the embeddings of
    ``config.data.<embeddings>``, of the decoder's width."""
    spec = require(config, f"data.{source}", "webdataset:gs://BUCKET/{00000..00999}.tar")
    if not spec.startswith("webdataset:"):
        raise ValueError(
            f"config.data.{source} is {spec!r}: the decoder joins images to their embeddings by "
            "the WebDataset key, so it must be webdataset:PATTERN"
        )
    folders = require(config, f"data.{embeddings}", "gs://BUCKET/embeddings")
    embedded = ClipEmbeddings(folders)
    check_width(embedded, config.model.clip_dim, "clip_dim")
    return EmbeddedImages(shards.image_text_source(spec), embedded)


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer) -> None:
    """The decoder's caption encoder must have a row for every CLIP BPE id."""
    m = config.model
    if m.text_layers and m.text_vocab < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.text_vocab {m.text_vocab} is smaller than CLIP's BPE vocabulary of "
            f"{tokenizer.vocab_size}: set --config.model.text_vocab={tokenizer.vocab_size}"
        )


def build_prior(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[Prior, loop.Task, BatchIterator]:
    """The prior, its task with the frozen CLIP of ``stages.clip``, and its batches of
    ``data.embeddings``; every path and width checked before anything compiles."""
    require(config, "data.embeddings", "gs://BUCKET/embeddings (clip-retrieval's output)")
    clip = load_clip_run(config, workdir)
    source = prior_source(config, "embeddings")
    tokenizer = ClipTokenizer()
    if tokenizer.vocab_size != clip[0].config.vocab_size:
        raise ValueError(
            f"the CLIP in config.stages.clip has {clip[0].config.vocab_size} token ids; the "
            f"CLIP BPE tokenizer the prior's captions go through has {tokenizer.vocab_size}"
        )
    model, task = make_prior_task(config, clip)
    batches = BatchIterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=prior_operations(config, tokenizer),
    )
    return model, task, batches


def build_decoder(config: ml_collections.ConfigDict) -> tuple[Decoder, loop.Task, BatchIterator]:
    """The decoder, its task and its batches of ``data.source`` joined to ``data.embeddings``."""
    tokenizer = ClipTokenizer()
    check_tokenizer(config, tokenizer)
    source = decoder_source(config)
    model, task = make_decoder_task(config)
    batches = BatchIterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=decoder_operations(config, tokenizer),
    )
    return model, task, batches


def train_prior(
    config: ml_collections.ConfigDict, workdir: Path, *, hooks: Sequence[loop.Hook] = ()
) -> Any:
    """Trains the prior in ``workdir`` (resuming); returns the final train state."""
    _, task, batches = build_prior(config, workdir)
    return loop.train(task, batches, config, workdir, hooks=hooks)


def train_decoder(
    config: ml_collections.ConfigDict, workdir: Path, *, hooks: Sequence[loop.Hook] = ()
) -> Any:
    """Trains the decoder in ``workdir`` (resuming); returns the final train state."""
    _, task, batches = build_decoder(config)
    return loop.train(task, batches, config, workdir, hooks=hooks)
