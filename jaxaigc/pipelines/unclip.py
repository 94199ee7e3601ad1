"""unCLIP (Ramesh et al. 2022) on shapes scenes: a diffusion prior from CLIP text features to the
CLIP image embedding, a diffusion decoder from the image embedding to pixels, and the text ->
image pipeline that chains them.

Both stages train on CLIP features computed once (:func:`encode_scenes`) by a trained CLIP run
(:func:`jaxaigc.pipelines.clip.load_trained`) and kept in memory: per scene the image embedding
z_i, the text embedding z_t and the caption's per-token features. The per-token features are the
CLIP text transformer's final LayerNorm outputs [b, text_len, transformer_width], the tokens that
CLIP's text projection reads its pooled EOT token from. ``CLIP.encode_text`` returns only the
pooled projection, so they are read with Flax's ``capture_intermediates`` during that same call
(one pass gives both, without re-implementing the text tower here). The causal text transformer
makes tokens after EOT padding; ``text_mask`` marks SOT..EOT.

Generation (Sec. 2): caption -> CLIP (z_t, token features) -> prior (``prior_candidates`` DDIM
samples, the one with the higher z_i . z_t kept; paper 2) -> renormalised z_i -> decoder (DDIM)
-> uint8 images. Each sampler is one ``lax.scan`` in one jit (``jaxaigc.diffusion``), batched over
captions. The decoder takes images in [-1, 1] at the CLIP run's resolution (32 px for the tiny
CLIP presets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.compile_options import jit_inference
from jaxaigc.data import shapes
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP
from jaxaigc.models.decoder import Decoder, DecoderConfig, sample_decoder
from jaxaigc.models.prior import Prior, PriorConfig, check_guidance, sample_prior
from jaxaigc.objectives.unclip import decoder_loss_fn, prior_loss_fn
from jaxaigc.pipelines import clip as clip_pipeline
from jaxaigc.train import checkpoint
from jaxaigc.train.loop import Task, default_train_config

# Shapes captions are at most 19 CLIP tokens with SOT and EOT.
TEXT_LEN = 24


def get_config() -> ml_collections.ConfigDict:
    """Sections ``prior`` and ``decoder`` (each a full train config with its ``model``), ``data``
    (the scenes whose CLIP features both stages train on) and ``sample`` (generation)."""
    config = ml_collections.ConfigDict()
    config.clip_workdir = ml_collections.FieldReference(None, field_type=str)
    config.data = ml_collections.ConfigDict(dict(scenes=4000, seed=1, encode_batch=500))

    prior = default_train_config()
    prior.model = dataclasses.asdict(PriorConfig.from_name("tiny", text_len=TEXT_LEN))
    _leave_to_clip(prior.model, "prior")
    prior.optim.update(dict(peak_lr=1e-3, warmup_steps=50, b2=0.96, weight_decay=0.06))
    prior.train.update(dict(batch_size=64, steps=1000, log_every=50, checkpoint_every=500))
    config.prior = prior

    decoder = default_train_config()
    # No caption pathway by default: the paper found it "offers little help" with binding, and
    # the image embedding alone keeps the tiny decoder cheap. Attention only at 8 px: at 16 px
    # (256 tokens) it made a CPU train step 1.7x slower (1.25 -> 0.75 s at batch 32, loaded
    # 2-core machine), and 8 px already sees the whole 32 px scene. v prediction: after 600
    # updates the round trip cos(CLIP(decode(z_i)), z_i) was 0.77-0.81 against eps's 0.09-0.28,
    # with black backgrounds and the scene's colours where eps left noise (BUILD_NOTES, unCLIP).
    decoder.model = dataclasses.asdict(
        DecoderConfig.from_name(
            "tiny", attention_resolutions=(8,), text_layers=0, text_len=0, text_vocab=0,
            prediction="v",
        )
    )  # fmt: skip
    _leave_to_clip(decoder.model, "decoder")
    # The loss's timestep weighting (objectives.diffusion.loss_weights): "none" or "min_snr".
    decoder.loss = ml_collections.ConfigDict(dict(weighting="none", min_snr_gamma=5.0))
    decoder.optim.update(dict(peak_lr=2e-3, warmup_steps=50))
    decoder.train.update(dict(batch_size=32, steps=1000, log_every=50, checkpoint_every=500))
    config.decoder = decoder

    config.sample = ml_collections.ConfigDict(
        dict(
            prior_steps=64,  # paper: 64 strided DDIM steps
            prior_candidates=2,  # paper: best of 2 by z_i . z_t
            prior_guidance=1.0,
            # The v decoder after 600 updates (100 test scenes, round trip cos(CLIP(decode(z_i)),
            # z_i)): DDIM 25 steps 0.768 unguided, 0.805 at guidance 3; DDPM 100 steps at
            # guidance 3 0.814 for 3.4x the time. (An eps decoder needed DDPM's fresh noise.)
            decoder_method="ddim",
            decoder_steps=25,
            decoder_guidance=3.0,
            candidates=1,  # images per caption
        )
    )
    return config


# The model fields that only the CLIP decides. get_config leaves them unset, and build_prior and
# build_decoder fill them in from the CLIP features (so they follow the CLIP run, whatever its
# size); a value set by hand is checked against the features instead.
CLIP_FIELDS = {"prior": ("embed_dim", "text_width"), "decoder": ("clip_dim", "image_size")}


def _leave_to_clip(model: ml_collections.ConfigDict, section: str) -> None:
    for field in CLIP_FIELDS[section]:
        model[field] = ml_collections.config_dict.placeholder(int)


def prior_config(config: ml_collections.ConfigDict) -> PriorConfig:
    return PriorConfig(**config.prior.model.to_dict())


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
    return DecoderConfig(**config.decoder.model.to_dict())


class ClipEncoder:
    """A trained CLIP's features for the prior and the decoder, jitted once each."""

    def __init__(self, model: CLIP, variables: dict, tokenizer: ClipTokenizer | None = None):
        self.model, self.config = model, model.config
        self.tokenizer = tokenizer or ClipTokenizer()
        is_final_norm = lambda module, method: module.name == "ln_final"  # noqa: E731

        def text(tokens):
            pooled, state = model.apply(
                variables, tokens, method="encode_text", capture_intermediates=is_final_norm,
                mutable=["intermediates"],
            )  # fmt: skip
            features = state["intermediates"]["ln_final"]["__call__"][0]  # (b, n, width)
            return _normalise(pooled), features.astype(jnp.float32)

        self._text = jit_inference(text)
        self._image = jit_inference(
            lambda x: _normalise(model.apply(variables, x, method="encode_image"))
        )

    def encode_text(self, captions: Sequence[str], *, text_len: int) -> dict[str, np.ndarray]:
        """``tokens`` int32 [b, text_len] (truncated captions keep their EOT), ``text_embedding``
        float32 [b, embed_dim] (unit norm), ``text_tokens`` float32 [b, text_len,
        transformer_width] and ``text_mask`` bool [b, text_len] (SOT..EOT)."""
        if not 1 <= text_len <= self.config.context_length:
            raise ValueError(
                f"text_len {text_len} is outside [1, {self.config.context_length}], the CLIP "
                "context length"
            )
        tokens = self.tokenizer.encode(list(captions), context_length=text_len, truncate=True)
        tokens = np.asarray(tokens, np.int32)
        embedding, features = self._text(tokens)
        # Causal attention: positions up to the end-of-text token (the largest id) read the caption.
        mask = np.arange(text_len) <= np.argmax(tokens, axis=-1)[:, None]
        return {
            "tokens": tokens,
            "text_embedding": np.asarray(embedding),
            "text_tokens": np.asarray(features),
            "text_mask": mask,
        }

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, r, r, 3] at CLIP's resolution -> unit-norm z_i float32 [b, embed_dim]."""
        r = self.config.image_resolution
        if images.shape[1:] != (r, r, 3):
            raise ValueError(f"images have shape {images.shape[1:]}; this CLIP takes {(r, r, 3)}")
        # clip_ops at the native resolution: the resize and the centre crop are identities.
        x = (images.astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD
        return np.asarray(self._image(x.astype(np.float32)))


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def load_clip(workdir: str | Path) -> ClipEncoder:
    """The CLIP trained in ``workdir`` (:func:`jaxaigc.pipelines.clip.load_trained`)."""
    model, variables, _ = clip_pipeline.load_trained(workdir)
    return ClipEncoder(model, variables)


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

    @property
    def held_out(self) -> np.ndarray:
        """bool [n]: the scene has a (colour, shape) pair that training never shows."""
        return np.array(
            [any((o.colour, o.shape) in shapes.HELD_OUT for o in s.objects) for s in self.scenes]
        )


def encode_scenes(
    clip: ClipEncoder, n: int, *, split: str, seed: int, text_len: int = TEXT_LEN, batch: int = 500
) -> SceneFeatures:
    """``n`` shapes scenes of ``split`` at CLIP's resolution with their CLIP features."""
    images, captions, scenes = shapes.generate(
        n, clip.config.image_resolution, seed=seed, split=split
    )
    parts = []
    for start in range(0, n, batch):
        text = clip.encode_text(captions[start : start + batch], text_len=text_len)
        text["image_embedding"] = clip.encode_images(images[start : start + batch])
        parts.append(text)
    arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return SceneFeatures(images=images, captions=captions, scenes=scenes, **arrays)


class ArrayRecords:
    """Row ``i`` of each named array as one record: an in-memory random-access source."""

    def __init__(self, arrays: dict[str, np.ndarray], *, name: str):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays of different lengths {sorted(lengths)}")
        self.arrays, self.name = arrays, name

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[index] for key, value in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArrayRecords({self.name!r}, n={len(self)})"


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _clip_and_features(config, clip, features) -> tuple[ClipEncoder | None, SceneFeatures]:
    if features is not None:
        return None, features
    if clip is None:
        raise ValueError("give clip (a ClipEncoder or the CLIP run's workdir) or features")
    clip = clip if isinstance(clip, ClipEncoder) else load_clip(clip)
    data = config.data
    features = encode_scenes(
        clip, data.scenes, split="train", seed=data.seed, batch=data.encode_batch,
        text_len=config.prior.model.text_len,
    )  # fmt: skip
    return clip, features


def build_prior(
    config: ml_collections.ConfigDict,
    clip: ClipEncoder | str | Path | None,
    *,
    features: SceneFeatures | None = None,
) -> tuple[Prior, Task, BatchIterator]:
    """The prior, its task for :func:`jaxaigc.train.loop.train` (with ``config.prior``) and its
    batches of training-scene CLIP features (``features``, else encoded here by ``clip``).
    Unset :data:`CLIP_FIELDS` of ``config.prior.model`` are filled in, in place, from them."""
    _, features = _clip_and_features(config, clip, features)
    checks = [
        ("the CLIP embedding width", features.text_embedding.shape[1], "embed_dim"),
        ("the CLIP text transformer's width", features.text_tokens.shape[2], "text_width"),
        ("the encoded captions' length", features.text_tokens.shape[1], "text_len"),
    ]
    _fit_fields(checks, config.prior.model, "prior")
    model = Prior(prior_config(config))

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
    task = Task(init=prior_init(model), loss_fn=prior_loss_fn(model, model.config.diffusion()))
    return model, task, batches


def build_decoder(
    config: ml_collections.ConfigDict,
    clip: ClipEncoder | str | Path | None,
    *,
    features: SceneFeatures | None = None,
) -> tuple[Decoder, Task, BatchIterator]:
    """The decoder, its task (with ``config.decoder``; its loss weighted by
    ``config.decoder.loss``) and its batches of training scenes in [-1, 1] with their CLIP image
    embeddings (and CLIP caption tokens when the decoder has a text encoder). Unset
    :data:`CLIP_FIELDS` of ``config.decoder.model`` are filled in, in place, from them."""
    _, features = _clip_and_features(config, clip, features)
    checks = [
        ("the CLIP embedding width", features.image_embedding.shape[1], "clip_dim"),
        ("the scenes' side", features.images.shape[1], "image_size"),
    ]
    _fit_fields(checks, config.decoder.model, "decoder")
    model = Decoder(decoder_config(config))
    cfg = model.config
    arrays = {
        "image": to_unit_range(features.images),
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
    loss_fn = decoder_loss_fn(model, cfg.diffusion(), **config.decoder.loss.to_dict())
    task = Task(init=decoder_init(model), loss_fn=loss_fn)
    return model, task, batches


def prior_init(model: Prior):
    """``init(rng)``: the prior's variables, from one example of zeros."""
    cfg = model.config

    def init(rng: jax.Array):
        d, n = cfg.embed_dim, cfg.text_len
        return model.init(
            rng, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, n, cfg.text_width)),
            jnp.zeros((1, d)), text_mask=jnp.ones((1, n), bool),
        )  # fmt: skip

    return init


def decoder_init(model: Decoder):
    """``init(rng)``: the decoder's variables, from one example of zeros."""
    cfg = model.config

    def init(rng: jax.Array):
        r = cfg.image_size
        text = jnp.zeros((1, cfg.text_len), jnp.int32) if cfg.text_layers else None
        return model.init(
            rng, jnp.zeros((1, r, r, cfg.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, cfg.clip_dim)), text,
        )  # fmt: skip

    return init


_STAGES = {
    "prior": (Prior, PriorConfig, prior_init),
    "decoder": (Decoder, DecoderConfig, decoder_init),
}


def load_trained(
    workdir: str | Path, stage: str, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[Prior | Decoder, Any, int]:
    """The prior or the decoder (``stage``) trained in ``<workdir>/<stage>`` (by
    ``experiments/unclip/train_unclip.py`` or the demo), as :func:`generate` takes it: the EMA
    parameters when the run kept them, on ``device``
    (:func:`jaxaigc.train.checkpoint.load_trained`).

    Returns:
      ``(model, params, step)``: the model built from the checkpoint's run config, its parameters
      and the checkpoint's step.
    """
    if stage not in _STAGES:
        raise ValueError(f"unknown unCLIP stage {stage!r}; use one of {list(_STAGES)}")
    module, config_class, init = _STAGES[stage]

    def model_of(run_config: dict):
        return module(config_class(**run_config["model"]))

    directory = Path(workdir) / stage
    try:
        run_config, variables, step = checkpoint.load_trained(
            directory, lambda c: init(model_of(c)), step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no unCLIP {stage} checkpoint in {directory.absolute() / 'checkpoints'}; train one "
            f"with `python experiments/unclip/train_unclip.py --workdir {workdir}`"
        ) from error
    return model_of(run_config), variables["params"], step


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


def decode(
    decoder: tuple[Decoder, Any],
    image_embedding: jax.Array | np.ndarray,
    rng: jax.Array,
    *,
    steps: int | None,
    guidance_scale: float = 1.0,
    method: str = "ddim",
    text: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 [b, r, r, 3] images of CLIP image embeddings [b, clip_dim] (renormalised here), DDIM
    or DDPM (``method``) over ``steps`` strided steps (``text`` int [b, <= text_len] when the
    decoder reads captions)."""
    model, params = decoder
    z = _normalise(jnp.asarray(image_embedding, jnp.float32))
    text = text if model.config.text_layers else None
    images = sample_decoder(
        model, params, model.config.diffusion(), z, rng, text=text, steps=steps,
        guidance_scale=guidance_scale, method=method,
    )  # fmt: skip
    return to_uint8(images)


def generate(
    captions: Sequence[str],
    *,
    prior: tuple[Prior, Any],
    decoder: tuple[Decoder, Any],
    clip: ClipEncoder,
    rng: jax.Array,
    prior_steps: int | None = 64,
    decoder_steps: int | None = 50,
    prior_guidance: float = 1.0,
    decoder_guidance: float = 1.0,
    candidates: int = 1,
    prior_candidates: int = 2,
    decoder_method: str = "ddim",
) -> dict[str, np.ndarray]:
    """Text -> image: caption -> CLIP -> prior (best of ``prior_candidates``) -> decoder.

    Args:
      captions: b captions.
      prior, decoder: ``(model, params)`` of the trained stages.
      clip: the CLIP whose features the stages were trained on.
      rng: key of all samples.
      prior_steps, decoder_steps: strided DDIM steps (None: the whole process).
      prior_guidance, decoder_guidance: classifier-free guidance scales (1: none; others need
        the stage's conditioning dropout, else ``ValueError`` before any sampling).
      candidates: images per caption, each decoded from the caption's one prior sample.
      prior_candidates: prior samples per caption, the one closest to z_t kept (paper 2).
      decoder_method: "ddim" or "ddpm" (ancestral; better for an undertrained decoder).

    Returns:
      ``images`` uint8 [b, candidates, r, r, 3], ``image_embedding`` [b, embed_dim] (the prior's
      choice, unit norm) and ``text_embedding`` [b, embed_dim].
    """
    prior_model, prior_params = prior
    decoder_cfg = decoder[0].config
    check_guidance(prior_guidance, prior_model.config.text_drop, "text_drop")
    for name in ("image_drop", "text_drop") if decoder_cfg.text_layers else ("image_drop",):
        check_guidance(decoder_guidance, getattr(decoder_cfg, name), name)
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    text = clip.encode_text(captions, text_len=prior_model.config.text_len)
    prior_rng, decoder_rng = jax.random.split(rng)
    z = sample_prior(
        prior_model, prior_params, prior_model.config.diffusion(), text["text_tokens"],
        text["text_embedding"], prior_rng, text_mask=text["text_mask"], steps=prior_steps,
        guidance_scale=prior_guidance, candidates=prior_candidates,
    )  # fmt: skip
    z = np.asarray(_normalise(z))
    b = len(captions)
    images = decode(
        decoder,
        np.repeat(z, candidates, axis=0),  # row i * candidates + j: caption i, image j
        decoder_rng,
        steps=decoder_steps,
        guidance_scale=decoder_guidance,
        method=decoder_method,
        text=np.repeat(text["tokens"], candidates, axis=0),
    )
    return {
        "images": images.reshape(b, candidates, *images.shape[1:]),
        "image_embedding": z,
        "text_embedding": text["text_embedding"],
    }
