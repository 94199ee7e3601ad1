"""unCLIP (Ramesh et al. 2022) on shapes scenes, inference: a trained run's diffusion prior (CLIP
text features -> CLIP image embedding) and diffusion decoder (image embedding -> pixels) read back,
and the text -> image pipeline that chains them (training: :mod:`jaxaigc.systems.unclip`).

Both stages read the features of a trained CLIP run (:class:`jaxaigc.pipelines.clip.ClipFeatures`):
the image embedding z_i, the text embedding z_t and the caption's per-token features, the CLIP
text transformer's final LayerNorm outputs [b, text_len, transformer_width] (the tokens its text
projection reads the pooled EOT token from; ``text_mask`` marks SOT..EOT, the causal text
transformer makes the tokens after EOT padding).

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
import ml_collections
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.configs.saved import load_run
from jaxaigc.configs.stages import stage_dir, trained_run
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig
from jaxaigc.pipelines.clip import ClipFeatures, load_clip
from jaxaigc.pipelines.text_to_image import Generated, TextToImage
from jaxaigc.sample.diffusion import check_guidance, sample_decoder, sample_prior
from jaxaigc.train import checkpoint


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def clip_features(config: ml_collections.ConfigDict, workdir: str | Path) -> ClipFeatures:
    """The CLIP of the ``clip`` stage, encoding ``config.data.encode_batch`` inputs per call."""
    return load_clip(trained_run(config, workdir, "clip"), batch_size=config.data.encode_batch)


def prior_init(model: Prior):
    """``init(rng)``: the prior's variables, from one example of zeros (traced for the shapes a
    checkpoint is read into; :mod:`jaxaigc.systems.unclip` trains from it)."""
    cfg = model.config

    def init(rng: jax.Array):
        d, n = cfg.embed_dim, cfg.text_len
        return model.init(
            rng, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, n, cfg.text_width)),
            jnp.zeros((1, d)), text_mask=jnp.ones((1, n), bool),
        )  # fmt: skip

    return init


def decoder_init(model: Decoder):
    """``init(rng)``: the decoder's variables, from one example of zeros (as :func:`prior_init`)."""
    cfg = model.config

    def init(rng: jax.Array):
        r = cfg.image_size
        text = jnp.zeros((1, cfg.text_len), jnp.int32) if cfg.text_layers else None
        caption = {}
        if cfg.clip_text_width:  # CLIP's caption features (Karlo)
            caption = dict(
                text_tokens=jnp.zeros((1, cfg.text_len, cfg.clip_text_width)),
                text_embedding=jnp.zeros((1, cfg.clip_dim)),
            )
        return model.init(
            rng, jnp.zeros((1, r, r, cfg.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, cfg.clip_dim)), text, **caption,
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

    directory = Path(directory)
    model, variables, step, _ = checkpoint.load_model(
        directory,
        lambda run_config: module(fields.to_dataclass(config_class, run_config["model"])),
        init,
        what=f"unCLIP {stage}",
        train_command=f"jaxaigc train unclip --workdir {directory.parent}",
        step=step,
        device=device,
    )
    return model, variables["params"], step


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
    clip: ClipFeatures,
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
    text = clip.text_features(captions, length=prior_model.config.text_len)
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


class UnclipTextToImage(TextToImage):
    """unCLIP's text -> image: per caption one prior sample (best of the run's
    ``prior_candidates``), decoded N times with the run's sampler, in CLIP's order."""

    recipe = "unclip"

    def __init__(self, workdir: str | Path):
        _, config = load_run(workdir)
        self.clip = clip_features(config, workdir)
        self.prior, self.decoder = (
            load_stage(stage_dir(config, workdir, name), name)[:2] for name in ("prior", "decoder")
        )
        self.sample = config.sample

    def generate(self, captions: list[str], *, n: int, seed: int) -> Generated:
        sc = self.sample
        images = generate(
            captions,
            prior=self.prior,
            decoder=self.decoder,
            clip=self.clip,
            rng=jax.random.key(seed),
            prior_steps=sc.prior_steps,
            decoder_steps=sc.decoder_steps,
            prior_guidance=sc.prior_guidance,
            decoder_guidance=sc.decoder_guidance,
            candidates=n,
            prior_candidates=sc.prior_candidates,
            decoder_method=sc.decoder_method,
        )["images"]
        scores = self.clip.scores(images, captions)
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked = np.take_along_axis(images, order[:, :, None, None, None], axis=1)
        return Generated(ranked, np.take_along_axis(scores, order, axis=1))
