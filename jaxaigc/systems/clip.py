"""A small CLIP (Radford et al. 2021) trained contrastively on the embedded image-caption data:
shapes scenes, Noto emoji and the same names in other styles, captioned Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxaigc.configs import fields
from jaxaigc.data import builders, image_text, shards, wordnet
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train import checkpoint, loop


def _init_fn(model: CLIP):
    cfg = model.config

    def init(rng: jax.Array):
        images = jnp.zeros((1, cfg.image_resolution, cfg.image_resolution, 3), jnp.float32)
        return model.init(rng, images, jnp.zeros((1, cfg.context_length), jnp.int32))

    return init


def training_source(config: ml_collections.ConfigDict) -> image_text.Concatenate:
    """The training mix: image-caption records at any size (the transforms resize them); with
    ``data.source``, those shards or that folder alone."""
    data, resolution = config.data, config.model.image_resolution
    if data.source:
        return image_text.Concatenate([shards.image_text_source(data.source)])
    mark = image_text.Augmentable if data.augment.enabled else (lambda source: source)
    sources = []
    if data.shapes:
        sources.append(
            image_text.shapes_source(data.shapes, resolution, seed=config.seed, split="train")
        )
    for name, repeats in (
        ("emoji", data.emoji_repeats),
        ("symbola", data.symbola_repeats),
        ("emojione", data.emojione_repeats),
    ):
        if repeats:
            source = builders.load(
                name, split="train", data_dir=data.data_dir, resolution=32, in_memory=True
            )
            sources.extend([mark(source)] * repeats)
    if data.fashion_mnist:
        fashion = builders.load("fashion_mnist", split="train", data_dir=data.data_dir)
        sources.append(
            mark(image_text.CaptionedFashionMnist(fashion, image_text.FASHION_TRAIN_TEMPLATES))
        )
    if not sources:
        raise ValueError("config.data selects no training data")
    return image_text.Concatenate(sources)


def make_task(config: ml_collections.ConfigDict) -> tuple[CLIP, loop.Task]:
    """The model and the task :func:`jaxaigc.train.loop.train` trains (no data is read)."""
    model = CLIP(fields.to_dataclass(CLIPConfig, config.model))
    if config.loss == "sigmoid" and model.config.logit_bias_init is None:
        raise ValueError("the sigmoid loss needs a logit bias: set config.model.logit_bias_init")
    task = loop.Task(
        init=_init_fn(model),
        loss_fn=clip_loss_fn(model, loss=config.loss, text_pairs=config.data.text_pairs),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    return model, task


def batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One training example's ``{name: (shape, dtype)}``: a preprocessed image and its caption's
    tokens (with ``data.text_pairs``, two more token rows)."""
    r, length = config.model.image_resolution, config.model.context_length
    spec = {"image": ((r, r, 3), jnp.float32), "tokens": ((length,), jnp.int32)}
    if config.data.text_pairs:
        spec |= {"pair_a": ((length,), jnp.int32), "pair_b": ((length,), jnp.int32)}
    return spec


def build(
    config: ml_collections.ConfigDict,
) -> tuple[CLIP, loop.Task, BatchIterator, ClipTokenizer]:
    """The model, the task for :func:`jaxaigc.train.loop.train`, the batches and the tokenizer."""
    model, task = make_task(config)
    cfg = model.config
    tokenizer = ClipTokenizer()
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the CLIP tokenizer has {tokenizer.vocab_size} tokens; config.model.vocab_size is "
            f"{cfg.vocab_size}"
        )

    tokenize = image_text.Tokenize(tokenizer.encode, cfg.context_length)
    source = training_source(config)
    if config.data.source:  # your pairs: CLIP's one augmentation, a random crop
        ops = [tokenize, *clip_ops(cfg.image_resolution, train=True)]
    else:
        augment = config.data.augment
        ops = [
            image_text.CaptionTrueAugment(
                crop_scale=augment.crop_scale,
                shrink=augment.shrink,
                flip=augment.flip,
                greyscale=augment.greyscale,
                style=augment.style,
                word_dropout=augment.word_dropout,
                gloss=augment.gloss,
            ),
            tokenize,
            *clip_ops(cfg.image_resolution, train=False),
        ]
    if config.data.text_pairs:
        distinct = {id(s): s for s in source.sources}.values()  # emoji sources repeat
        captions = {s[i]["caption"] for s in distinct for i in range(len(s))}
        words = {w for caption in captions for w in caption.lower().split()}
        pairs = wordnet.kinds_of(words, depth=config.data.text_pairs_depth)
        ops.insert(
            ops.index(tokenize) + 1,
            image_text.TextPairs(pairs, tokenizer.encode, cfg.context_length),
        )
    batches = BatchIterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=ops,
    )
    return model, task, batches, tokenizer


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    _, task, batches, _ = build(config)
    loop.train(task, batches, config, workdir)


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[CLIP, dict, int]:
    """The CLIP trained in ``workdir`` by :func:`train`: ``(model, variables, step)`` with the EMA
    weights and statistics when the run kept them."""
    model, variables, step, _ = checkpoint.load_model(
        workdir,
        lambda run_config: CLIP(fields.to_dataclass(CLIPConfig, run_config["model"])),
        _init_fn,
        what="CLIP",
        train_command=f"jaxaigc train clip --workdir {workdir}",
        step=step,
        device=device,
    )
    return model, variables, step


def train_on_pairs(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """The full-size recipes' training (:mod:`jaxaigc.configs.pod.clip`): on
    ``config.data.source`` alone, which must be given."""
    if not config.data.source:
        raise ValueError(
            "config.data.source is empty: give your image-text pairs, e.g. "
            "--config.data.source='webdataset:/data/{00000..00099}.tar' (or folder:CAPTIONS.csv, "
            "tfds:coco_captions/2017:train?caption=captions/text)"
        )
    train(config, workdir)
