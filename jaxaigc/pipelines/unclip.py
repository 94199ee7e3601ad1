"""unCLIP (Ramesh et al. 2022) on shapes scenes, inference: a trained run's diffusion prior (CLIP
text features -> CLIP image embedding) and diffusion decoder (image embedding -> pixels) read back,
and the text -> image pipeline that chains them (training: :mod:`jaxaigc.systems.unclip`).

Both stages read CLIP features (:class:`ClipEncoder`) of a trained CLIP run
(:func:`jaxaigc.systems.clip.load_trained`): the image embedding z_i, the text embedding z_t
and the caption's per-token features. The per-token features are the CLIP text transformer's
final LayerNorm outputs [b, text_len, transformer_width], the tokens that CLIP's text projection
reads its pooled EOT token from. ``CLIP.encode_text`` returns only the pooled projection, so they
are read with Flax's ``capture_intermediates`` during that same call (one pass gives both,
without re-implementing the text tower here). The causal text transformer makes tokens after EOT
padding; ``text_mask`` marks SOT..EOT.

Generation (Sec. 2): caption -> CLIP (z_t, token features) -> prior (``prior_candidates`` DDIM
samples, the one with the higher z_i . z_t kept; paper 2) -> renormalised z_i -> decoder (DDIM)
-> uint8 images. Each sampler is one ``lax.scan`` in one jit (:mod:`jaxaigc.sample.diffusion`),
batched over captions. The decoder takes images in [-1, 1] at the CLIP run's resolution (32 px
for the tiny CLIP presets).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.compile_options import jit_inference
from jaxaigc.configs import fields
from jaxaigc.data.preprocess import CLIP_MEAN, CLIP_STD
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import CLIP
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.sample.diffusion import check_guidance, sample_decoder, sample_prior
from jaxaigc.systems import clip as clip_system
from jaxaigc.train import checkpoint


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
    """The CLIP trained in ``workdir`` (:func:`jaxaigc.systems.clip.load_trained`)."""
    model, variables, _ = clip_system.load_trained(workdir)
    return ClipEncoder(model, variables)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


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


def load_stage(
    directory: str | Path, stage: str, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[Prior | Decoder, Any, int]:
    """The prior or the decoder (``stage``) trained in ``directory``, as :func:`generate` takes
    it: the EMA parameters when the run kept them, on ``device``
    (:func:`jaxaigc.train.checkpoint.load_trained`).

    Returns:
      ``(model, params, step)``: the model built from the checkpoint's run config, its parameters
      and the checkpoint's step.
    """
    if stage not in _STAGES:
        raise ValueError(f"unknown unCLIP stage {stage!r}; use one of {list(_STAGES)}")
    module, config_class, init = _STAGES[stage]

    def model_of(run_config: dict):
        return module(fields.to_dataclass(config_class, run_config["model"]))

    directory = Path(directory)
    try:
        run_config, variables, step = checkpoint.load_trained(
            directory, lambda c: init(model_of(c)), step=step, device=device
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no unCLIP {stage} checkpoint in {directory.absolute() / 'checkpoints'}; train one "
            f"with `jaxaigc train unclip --workdir {directory.parent}`"
        ) from error
    return model_of(run_config), variables["params"], step


def load_trained(
    workdir: str | Path, stage: str, *, step: int | None = None, device: jax.Device | None = None
) -> tuple[Prior | Decoder, Any, int]:
    """:func:`load_stage` of ``<workdir>/<stage>``, where ``jaxaigc train unclip --workdir
    WORKDIR`` trains it."""
    return load_stage(Path(workdir) / stage, stage, step=step, device=device)


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
