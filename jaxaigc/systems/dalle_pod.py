"""The full-size DALL-E (Ramesh et al. 2021) on your own (caption, image) pairs: each step
tokenises its images with the frozen encoder of a converted OpenAI dVAE (the argmax of its logits
over the logit-Laplace-mapped pixels, paper Sec. 2.1) and trains the transformer on the caption's
BPE tokens then those image tokens (Sec. 2.2, :func:`jaxaigc.objectives.dalle.dalle_loss_fn`).

The encoder's parameters sit in ``model_state["frozen"]`` (no optimiser touches them; they are
sharded and checkpointed with the rest), so nothing is pre-encoded and the data stay images.
Recipe: :mod:`jaxaigc.configs.pod.dalle`; evaluation: :mod:`jaxaigc.evaluate.dalle_pod`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc import parallel
from jaxaigc.configs import fields, stages
from jaxaigc.data import shards
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import CenterCrop, Resize
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.dvae import DVAEConfig, Encoder, encode
from jaxaigc.objectives.dalle import dalle_loss_fn
from jaxaigc.pipelines import dvae as dvae_pipeline
from jaxaigc.pipelines.dalle import init_fn
from jaxaigc.train import loop
from jaxaigc.train.checkpoint import Checkpointer
from jaxaigc.train.ppo import load_params
from jaxaigc.train.state import TrainState, create_sharded_state

SOURCE_EXAMPLE = "webdataset:/data/{00000..01023}.tar (or folder:/data/captions.csv)"


def encode_captions(tokenizer: ClipTokenizer, captions: list[str], text_len: int) -> np.ndarray:
    """int32 [b, text_len]: SOT, the caption's CLIP BPE ids, EOT, and EOT again to the end (the
    transformer's ``pad_id``: each padded position takes its own learned embedding). Long
    captions are cut, keeping their EOT."""
    ids = tokenizer.encode(captions, context_length=text_len, truncate=True)
    ended = np.arange(text_len) > np.argmax(ids == tokenizer.eot_token, axis=1)[:, None]
    return np.where(ended, tokenizer.eot_token, ids).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CaptionTokens(grain.transforms.Map):
    """``{"image", "caption", ...}`` -> ``{"text": int32 [text_len], "image"}``."""

    tokenizer: ClipTokenizer
    text_len: int

    def map(self, element: dict) -> dict:
        text = encode_captions(self.tokenizer, [element["caption"]], self.text_len)[0]
        return {"text": text, "image": element["image"]}


def image_ops(config: ml_collections.ConfigDict) -> list[Any]:
    """An image's preprocessing: the shorter side resized to ``data.image_size`` (bicubic) and
    the centre square kept, uint8 (the dVAE maps the pixels itself)."""
    return [Resize(config.data.image_size), CenterCrop(config.data.image_size)]


def pair_ops(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer) -> list[Any]:
    """A record's preprocessing: :func:`image_ops`, then the caption tokenised."""
    return [*image_ops(config), CaptionTokens(tokenizer, config.model.text_len)]


def check_compatible(
    model: DALLEConfig, dvae: DVAEConfig, *, image_size: int, where: str = "config.dvae"
) -> None:
    """Raises ``ValueError`` naming the value and the fix where the transformer does not fit the
    dVAE (``where``: whose it is) or the image size."""
    if dvae.vocab_size != model.image_vocab:
        also = "" if where == "config.dvae" else f" and config.dvae.vocab_size={dvae.vocab_size}"
        raise ValueError(
            f"the dVAE ({where}) has {dvae.vocab_size} codes, but the transformer's image_vocab "
            f"is {model.image_vocab}: set config.model.image_vocab={dvae.vocab_size}{also}"
        )
    grid = image_size / dvae.downsample
    if grid != model.image_side:
        raise ValueError(
            f"the dVAE ({where}) turns data.image_size={image_size} px images into {grid:g} x "
            f"{grid:g} tokens (it downsamples {dvae.downsample}x), but the transformer's "
            f"image_side is {model.image_side}: set config.data.image_size="
            f"{model.image_side * dvae.downsample}"
        )


def check_tokenizer(model: DALLEConfig, tokenizer: ClipTokenizer) -> None:
    """Raises ``ValueError`` naming the fix where the transformer does not fit the captions."""
    if tokenizer.vocab_size > model.text_vocab:
        raise ValueError(
            f"the caption tokenizer has {tokenizer.vocab_size} ids, but the transformer's "
            f"text_vocab is {model.text_vocab}: set config.model.text_vocab={tokenizer.vocab_size}"
        )
    if model.pad_id != tokenizer.eot_token:
        raise ValueError(
            f"captions are padded with EOT ({tokenizer.eot_token}), but the transformer's pad_id "
            f"is {model.pad_id}: set config.model.pad_id={tokenizer.eot_token}"
        )


def _check_architecture(expected: DVAEConfig, loaded: DVAEConfig, where: str) -> None:
    """The loaded dVAE must be ``config.dvae``'s architecture (its compute dtype may differ)."""
    differ = [
        f.name
        for f in dataclasses.fields(DVAEConfig)
        if f.name != "dtype" and getattr(expected, f.name) != getattr(loaded, f.name)
    ]
    if differ:
        shown = ", ".join(f"{name} {getattr(loaded, name)}" for name in differ)
        fix = " ".join(f"--config.dvae.{name}={getattr(loaded, name)}" for name in differ)
        raise ValueError(f"the dVAE ({where}) has {shown}, unlike config.dvae: set {fix}")


def image_tokens(dvae: DVAEConfig, encoder: Any, images: jax.Array) -> jax.Array:
    """uint8 images [b, H, W, 3] -> the frozen encoder's argmax tokens int32 [b, h * w]."""
    ids = encode(dvae, {"encoder": {"params": encoder}}, images)
    return ids.reshape(ids.shape[0], -1)


def make_task(
    config: ml_collections.ConfigDict, dvae: tuple[DVAEConfig, dict] | None = None
) -> tuple[DALLE, loop.Task]:
    """The transformer and the task :func:`jaxaigc.train.loop.train` trains (no data read).

    ``dvae``: ``(config, variables)`` of the converted dVAE (:func:`load_dvae`), whose encoder
    starts ``model_state["frozen"]["dvae_encoder"]``; None initialises it randomly with
    ``config.dvae``'s shapes (``jaxaigc plan``, tests).
    """
    model = DALLE(fields.to_dataclass(DALLEConfig, config.model))
    dvae_config = fields.to_dataclass(DVAEConfig, config.dvae)
    image_size, encoder_params = config.data.image_size, None
    if dvae is not None:
        where = f"config.stages.dvae={config.stages.dvae!r}"
        check_compatible(model.config, dvae[0], image_size=image_size, where=where)
        _check_architecture(dvae_config, dvae[0], where)
        encoder_params = dvae[1]["encoder"]["params"]
    check_compatible(model.config, dvae_config, image_size=image_size)
    init_transformer, transformer_loss = init_fn(model), dalle_loss_fn(model)

    def init(rng: jax.Array) -> dict:
        transformer_rng, encoder_rng = jax.random.split(rng)
        side = dvae_config.downsample  # the convolutions do not depend on the image size
        images = jnp.zeros((1, side, side, dvae_config.input_channels), jnp.float32)
        encoder = Encoder(dvae_config).init(encoder_rng, images)["params"]
        return {
            "params": init_transformer(transformer_rng)["params"],
            "frozen": {"dvae_encoder": load_params(encoder, encoder_params, "dVAE encoder")},
        }

    def loss_fn(params, model_state, batch, rng):
        image = image_tokens(dvae_config, model_state["frozen"]["dvae_encoder"], batch["image"])
        loss, metrics = transformer_loss(params, {"text": batch["text"], "image": image}, rng)
        return loss, (metrics, model_state)

    return model, loop.Task(init=init, loss_fn=loss_fn, has_model_state=True)


def batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One training example's ``{name: (shape, dtype)}``: caption token ids and the image's
    preprocessed uint8 pixels."""
    side, channels = config.data.image_size, config.dvae.input_channels
    return {
        "text": ((config.model.text_len,), jnp.int32),
        "image": ((side, side, channels), jnp.uint8),
    }


def load_dvae(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[DVAEConfig, dict]:
    """``(config, variables)`` of the dVAE in ``stages.dvae`` (a converted or trained run)."""
    if not config.stages.dvae:
        raise ValueError(
            "config.stages.dvae is empty: convert OpenAI's dVAE with `jaxaigc convert dvae "
            "encoder.pkl DEST --trust-pickle` (decoder.pkl beside it) and set "
            "--config.stages.dvae=DEST"
        )
    dvae_config, variables, _ = dvae_pipeline.load_trained(
        stages.trained_run(config, workdir, "dvae")
    )
    return dvae_config, variables


def pair_source(config: ml_collections.ConfigDict, field: str = "source") -> Any:
    """The (image, caption) source of ``config.data.<field>``; empty is an error naming it."""
    spec = config.data[field]
    if not spec:
        raise ValueError(
            f"config.data.{field} is empty: set it to your (caption, image) pairs, e.g. "
            f"--config.data.{field}={SOURCE_EXAMPLE}"
        )
    return shards.image_text_source(spec)


def build(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[DALLE, loop.Task, BatchIterator]:
    """The model, its task (the encoder of ``stages.dvae`` frozen in it) and the batches of
    ``data.source``; every input is checked before anything compiles."""
    source = pair_source(config)
    tokenizer = ClipTokenizer()
    dvae = load_dvae(config, workdir)
    model, task = make_task(config, dvae)
    check_tokenizer(model.config, tokenizer)
    batches = BatchIterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        operations=pair_ops(config, tokenizer),
    )
    return model, task, batches


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if config.stages.clip:  # the evaluation reranks with it: missing, fail before training
        stages.trained_run(config, workdir, "clip")
    _, task, batches = build(config, workdir)
    loop.train(task, batches, config, workdir)


def restore_trained(
    config: ml_collections.ConfigDict, workdir: str | Path, dvae: tuple[DVAEConfig, dict]
) -> tuple[DALLE, TrainState, int, jax.sharding.Mesh, parallel.Rules]:
    """The latest training state of the run in ``workdir``, sharded over ``config.mesh`` as
    training shards it (a 12B model fits no single device): ``(model, state, step, mesh,
    rules)``."""
    mesh = parallel.make_mesh(config.mesh.shape.to_dict())
    rules = parallel.make_rules(config.mesh.rules.to_dict())
    model, task = make_task(config, dvae)
    tx, _ = loop.optimizer(task, config)
    _, _, abstract = create_sharded_state(
        task.init,
        tx,
        jax.random.key(config.seed),
        mesh,
        rules,
        use_ema=config.train.ema_decay > 0,
        materialize=False,
    )
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", save_every=1, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no DALL-E checkpoint in {checkpointer.directory}; train one with "
                f"`jaxaigc train dalle-12b --workdir {workdir}`"
            )
        state, _ = checkpointer.restore(steps[-1], abstract)
    finally:
        checkpointer.close()
    return model, state, steps[-1], mesh, rules
