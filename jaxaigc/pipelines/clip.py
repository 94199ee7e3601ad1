"""A small CLIP trained contrastively on the embedded image-caption data (shapes scenes, Noto
emoji and the same names in other styles, captioned Fashion-MNIST)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxaigc.data import builders, image_text, wordnet
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import clip_ops
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train import checkpoint
from jaxaigc.train.loop import Task, default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = default_train_config()
    config.model = model_fields(CLIPConfig.from_name("tiny-vit", context_length=32))
    config.loss = "softmax"  # or "sigmoid" (SigLIP; set model.logit_bias_init, e.g. -10)
    config.data = ml_collections.ConfigDict(
        dict(
            shapes=20_000,  # procedural scenes in the training mix
            emoji_repeats=4,  # the ~1,230 training emoji, repeated to weigh them up
            symbola_repeats=0,  # the same names drawn by Symbola (~960), a second style
            emojione_repeats=0,  # and by EmojiOne 2 (~980), a third, in colour
            fashion_mnist=True,
            data_dir=ml_collections.FieldReference(None, field_type=str),
            # image_text.CaptionTrueAugment on the emoji and Fashion-MNIST records (never on
            # shapes, whose captions name positions, sizes and colours)
            augment=ml_collections.ConfigDict(
                dict(
                    enabled=False,
                    crop_scale=0.5,
                    shrink=1.0,
                    flip=True,
                    greyscale=0.2,
                    style=0.0,
                    word_dropout=0.0,
                    gloss=0.0,  # WordNet definitions after names; no gain measured (BUILD_NOTES)
                )
            ),
            # Weight of a text-text InfoNCE on WordNet (noun, kind-of word) pairs whose word is
            # a training caption's, within text_pairs_depth hypernym steps ("eagle", "bird"):
            # what the captions never name, placed by the text tower near what they do. No gain
            # measured on the demo's data, at 1.35x the step time (BUILD_NOTES).
            text_pairs=0.0,
            text_pairs_depth=2,
        )
    )
    config.optim.peak_lr = 1e-3
    config.optim.weight_decay = 0.1
    config.train.batch_size = 128
    config.train.steps = 200
    return config


def model_fields(model: CLIPConfig) -> ml_collections.ConfigDict:
    """``model`` as ``config.model``, its SigLIP logit bias settable from the command line
    (``--config.model.logit_bias_init=-10``) also when it is None."""
    fields = ml_collections.ConfigDict(dataclasses.asdict(model))
    if model.logit_bias_init is None:
        fields.logit_bias_init = ml_collections.config_dict.placeholder(float)
    return fields


def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    fields = config.model.to_dict()
    if isinstance(fields["vision_layers"], list):
        fields["vision_layers"] = tuple(fields["vision_layers"])
    return CLIPConfig(**fields)


def training_source(config: ml_collections.ConfigDict) -> image_text.Concatenate:
    """The training mix: image-caption records at any size (the transforms resize them)."""
    data, resolution = config.data, config.model.image_resolution
    mark = image_text.Augmentable if data.augment.enabled else (lambda source: source)
    sources = []
    if data.shapes:
        sources.append(
            image_text.shapes_source(data.shapes, resolution, seed=config.seed, split="train")
        )
    if data.emoji_repeats:
        emoji = builders.load(
            "emoji", split="train", data_dir=data.data_dir, resolution=32, in_memory=True
        )
        sources.extend([mark(emoji)] * data.emoji_repeats)
    if data.symbola_repeats:
        symbola = builders.load(
            "symbola", split="train", data_dir=data.data_dir, resolution=32, in_memory=True
        )
        sources.extend([mark(symbola)] * data.symbola_repeats)
    if data.emojione_repeats:
        emojione = builders.load(
            "emojione", split="train", data_dir=data.data_dir, resolution=32, in_memory=True
        )
        sources.extend([mark(emojione)] * data.emojione_repeats)
    if data.fashion_mnist:
        fashion = builders.load("fashion_mnist", split="train", data_dir=data.data_dir)
        sources.append(
            mark(image_text.CaptionedFashionMnist(fashion, image_text.FASHION_TRAIN_TEMPLATES))
        )
    if not sources:
        raise ValueError("config.data selects no training data")
    return image_text.Concatenate(sources)


def _init_fn(model: CLIP):
    cfg = model.config

    def init(rng: jax.Array):
        images = jnp.zeros((1, cfg.image_resolution, cfg.image_resolution, 3), jnp.float32)
        return model.init(rng, images, jnp.zeros((1, cfg.context_length), jnp.int32))

    return init


def load_trained(
    workdir: str | Path, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[CLIP, dict, int]:
    """The CLIP trained in ``workdir`` by :func:`build` and :func:`jaxaigc.train.loop.train`:
    ``(model, variables, step)`` with the EMA weights and statistics when the run kept them."""

    def init_fn(config: dict):
        return _init_fn(CLIP(model_config(ml_collections.ConfigDict(config))))

    try:
        config, variables, step = checkpoint.load_trained(
            workdir, init_fn, step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no CLIP checkpoint in {Path(workdir).absolute() / 'checkpoints'}; train one with "
            f"`python experiments/clip/tiny_clip.py --workdir {workdir}`"
        ) from error
    return CLIP(model_config(ml_collections.ConfigDict(config))), variables, step


def build(config: ml_collections.ConfigDict) -> tuple[CLIP, Task, BatchIterator, ClipTokenizer]:
    """The model, the task for :func:`jaxaigc.train.loop.train`, the batches and the tokenizer."""
    model = CLIP(model_config(config))
    cfg = model.config
    if config.loss == "sigmoid" and cfg.logit_bias_init is None:
        raise ValueError("the sigmoid loss needs a logit bias: set config.model.logit_bias_init")
    tokenizer = ClipTokenizer()
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the CLIP tokenizer has {tokenizer.vocab_size} tokens; config.model.vocab_size is "
            f"{cfg.vocab_size}"
        )

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
        image_text.Tokenize(tokenizer.encode, cfg.context_length),
        *clip_ops(cfg.image_resolution, train=False),
    ]
    source = training_source(config)
    if config.data.text_pairs:
        distinct = {id(s): s for s in source.sources}.values()  # emoji sources repeat
        captions = {s[i]["caption"] for s in distinct for i in range(len(s))}
        words = {w for caption in captions for w in caption.lower().split()}
        pairs = wordnet.kinds_of(words, depth=config.data.text_pairs_depth)
        ops.insert(2, image_text.TextPairs(pairs, tokenizer.encode, cfg.context_length))
    batches = BatchIterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=ops,
    )
    task = Task(
        init=_init_fn(model),
        loss_fn=clip_loss_fn(model, loss=config.loss, text_pairs=config.data.text_pairs),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    return model, task, batches, tokenizer
