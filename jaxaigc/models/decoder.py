"""The unCLIP decoder (Ramesh et al. 2022, Sec. 2.1): GLIDE's text-conditional ADM UNet (Nichol et
al. 2021) that also conditions on a CLIP image embedding, generating 64 px images (the upsamplers
are separate models).

Conditioning, as the paper modifies GLIDE:
- the CLIP image embedding is projected and added to the timestep embedding (``clip_to_time``),
  and projected into ``clip_tokens`` (4) extra context tokens (``clip_to_tokens``);
- the caption (optional, ``text_layers > 0``) is encoded by GLIDE's text transformer (token +
  position embeddings, per-position learned padding embeddings, non-causal, final LayerNorm);
  its last token is projected into the timestep embedding (GLIDE's ``transformer_proj``) and its
  tokens follow the CLIP tokens in the context that every UNet attention layer attends.

Kakao Brain's Karlo (the released unCLIP reproduction; diffusers' ``UnCLIPTextProjModel`` and
``UNet2DConditionModel``) reads CLIP's text features as its caption instead (``clip_text_width``):
the per-token outputs of CLIP's text transformer, projected to ``context_width`` and
LayerNormed, follow the CLIP tokens in the context, with padded tokens masked out of attention
(``text_mask``); CLIP's text embedding is projected into the timestep embedding. It has no
learned null caption: its guidance passes the empty caption's CLIP features as the caption.

Guidance: 10% of image embeddings and 50% of captions are replaced by learned null embeddings in
training (``image_drop``, ``text_drop``; rng "dropout"), independently; ``conditional`` False
replaces both (the unconditional half of classifier-free guidance). The null image embedding
lives in CLIP space, the null caption in the text encoder's output space.

Output: eps [b, r, r, 3] (or v, Salimans & Ho 2022, or x0: ``prediction``) with a fixed variance by
default; ``variance="learned_range"`` adds 3 channels of improved DDPM's variance interpolation
(trained by the hybrid loss of ``objectives.unclip``). Learned variances can NaN at small scale
(REFERENCE Sec. 3), hence the fixed default.

Scale. The unit-norm CLIP embedding is multiplied by sqrt(clip_dim) (``scale_embedding``, as the
prior scales it) before its projections, so its components have about unit variance like the
other inputs of those layers.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.diffusion import VARIANCES, Diffusion, cosine_betas
from jaxaigc.diffusion.schedules import check_prediction
from jaxaigc.models.prior import check_width, keep_conditioning
from jaxaigc.nn import Transformer, dense, layer_norm, partitioned
from jaxaigc.nn.transformer import check_remat_policy
from jaxaigc.nn.unet import UNet, timestep_embedding

# name: (image_size, model_channels, channel_mult, num_res_blocks, attention_resolutions,
#        head_channels, groups, clip_dim, text_len, text_vocab, context_width, text_layers,
#        text_heads)
PRESETS: dict[str, tuple] = {
    # GLIDE's 64 px model as unCLIP modifies it: 512 channels, (1, 2, 3, 4), 3 blocks, attention at
    # 32 / 16 / 8 px with 64-wide heads; GLIDE's text transformer (128 BPE tokens of GPT-2's
    # 50,257, width 2048, 24 blocks, 32 heads); CLIP ViT-L/14 embeddings (768).
    "paper-3.5b": (64, 512, (1, 2, 3, 4), 3, (32, 16, 8), 64, 32, 768, 128, 50257, 2048, 24, 32),
    # CPU: the shapes scenes' 32 px, the tiny CLIP presets' 64-d embeddings, the DALL-E tiny
    # preset's 16 caption tokens of 1024.
    "tiny": (32, 32, (1, 2, 2), 1, (16, 8), 16, 8, 64, 16, 1024, 64, 2, 4),
    # Kakao Brain's released Karlo decoder (kakaobrain/karlo-v1-alpha, decoder/config.json and
    # text_proj/config.json, as diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py
    # writes them): sample_size 64, block_out_channels (320, 640, 960, 1280), layers_per_block 3,
    # SimpleCrossAttn blocks on the three lower levels (32 / 16 / 8 px) and the middle,
    # attention_head_dim 64, GroupNorm 32, cross_attention_dim 1536; UnCLIPTextProjModel's
    # clip_embeddings_dim 768 and 77 CLIP ViT-L/14 caption tokens; no GLIDE text encoder.
    "karlo-decoder": (64, 320, (1, 2, 3, 4), 3, (32, 16, 8), 64, 32, 768, 77, 0, 1536, 0, 1),
}
_PRESET_FIELDS = (
    "image_size", "model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
    "head_channels", "groups", "clip_dim", "text_len", "text_vocab", "context_width",
    "text_layers", "text_heads",
)  # fmt: skip
# The paper decoder rematerialises its UNet's residual and attention blocks as well as its text
# transformer. XLA:CPU's sizing shows no saving from the UNet's (BUILD_NOTES, "Paper-scale
# sizing": a fixed ~20 GiB per device dominates); kept as the paper-scale default.
_PRESET_COMPUTE = {
    name: dict(dtype="bfloat16", scan_layers=True, remat_policy="full", unet_remat_policy="full")
    for name in ("paper-3.5b", "karlo-decoder")
}
# Karlo's options (module docstring): out_channels 6 (learned_range variances, its
# UnCLIPScheduler's variance_type), clip_extra_context_tokens 4, the raw CLIP embeddings.
_PRESET_OPTIONS = {
    "karlo-decoder": dict(
        clip_text_width=768, variance="learned_range", scale_embedding=False, text_drop=0.0
    )
}


def check_unet_fields(cfg) -> None:
    """Checks the UNet fields of a decoder-style config (:class:`DecoderConfig`, the
    upsampler's) in its ``__post_init__``, and makes its list fields tuples (hashable)."""
    for name in ("channel_mult", "attention_resolutions"):
        if isinstance(getattr(cfg, name), list):
            object.__setattr__(cfg, name, tuple(getattr(cfg, name)))
    levels = len(cfg.channel_mult)
    factor = 2 ** (levels - 1)
    if cfg.image_size < 1 or cfg.image_size % factor:
        raise ValueError(
            f"image_size {cfg.image_size} cannot be halved {levels - 1} times ({levels} "
            f"levels of channel_mult): it must be a multiple of {factor}"
        )
    sides = [cfg.image_size // 2**i for i in range(levels)]
    for side in cfg.attention_resolutions:
        if side not in sides:
            raise ValueError(f"attention resolution {side} is not a UNet level's side {sides}")
    for mult in cfg.channel_mult:
        channels = cfg.model_channels * mult
        if channels % cfg.groups:
            raise ValueError(f"{channels} channels are not divisible into {cfg.groups} groups")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    image_size: int
    in_channels: int = 3
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]  # feature-map sides (px) that get attention
    head_channels: int = 64
    groups: int = 32  # GroupNorm groups
    resblock_updown: bool = True  # GLIDE: resample inside residual blocks
    dropout_rate: float = 0.0
    clip_dim: int  # CLIP's embedding width
    clip_tokens: int = 4  # context tokens projected from the image embedding
    context_width: int  # width of the context tokens (the text transformer's width)
    text_len: int = 0
    text_vocab: int = 0
    text_layers: int = 0  # 0: no caption
    clip_text_width: int = 0  # > 0: the caption is CLIP's text features of this width (Karlo)
    text_heads: int = 1
    pad_id: int = 0
    image_drop: float = 0.1  # probability of dropping the image embedding in training
    text_drop: float = 0.5  # probability of dropping the caption in training
    variance: str = "fixed_small"  # "learned_range": 2x output channels
    prediction: str = "eps"  # what the UNet outputs: "eps", "v" or "x0"
    scale_embedding: bool = True  # multiply the image embedding by sqrt(clip_dim)
    num_timesteps: int = 1000
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False  # the text transformer's
    remat_policy: str = "none"  # the text transformer's
    unet_remat_policy: str = "none"  # the UNet's residual and attention blocks'

    def __post_init__(self):
        check_unet_fields(self)
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible into heads of {self.head_channels}"
                )
        if self.clip_text_width:
            if self.text_layers:
                raise ValueError(
                    "give the caption as CLIP features (clip_text_width) or GLIDE "
                    f"tokens (text_layers), not both: {self.text_layers} text layers"
                )
            if self.text_len < 1:
                raise ValueError("CLIP caption features need text_len of at least 1")
            if self.text_drop:
                raise ValueError(
                    f"text_drop {self.text_drop} needs a learned null caption, which a decoder "
                    "reading CLIP caption features (clip_text_width) has not: set text_drop 0"
                )
        if self.text_layers:
            if self.text_len < 1 or self.text_vocab < 1:
                raise ValueError("a text encoder needs text_len and text_vocab of at least 1")
            if self.context_width % self.text_heads:
                raise ValueError(
                    f"context_width {self.context_width} is not divisible by {self.text_heads} "
                    "heads"
                )
            if not 0 <= self.pad_id < self.text_vocab:
                raise ValueError(f"pad_id {self.pad_id} is outside [0, {self.text_vocab})")
        for name in ("image_drop", "text_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} is outside [0, 1]")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; use one of {VARIANCES}")
        check_prediction(self.prediction)
        for name in ("remat_policy", "unet_remat_policy"):
            check_remat_policy(getattr(self, name), name)

    @property
    def embedding_scale(self) -> float:
        return self.clip_dim**0.5 if self.scale_embedding else 1.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.variance == "learned_range" else 1)

    def diffusion(self) -> Diffusion:
        return Diffusion(cosine_betas(self.num_timesteps))

    @classmethod
    def from_name(cls, name: str, **changes) -> DecoderConfig:
        """A preset (``"tiny"``, ``"paper-3.5b"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown decoder model {name!r}; known: {list(PRESETS)}")
        fields = dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True))
        options = {**_PRESET_OPTIONS.get(name, {}), **_PRESET_COMPUTE.get(name, {})}
        return cls(**{**fields, **options, **changes})

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


class TextEncoder(nn.Module):
    """GLIDE's caption encoder: text int [b, text_len] (right-padded with ``pad_id``) -> tokens
    [b, text_len, context_width]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, text: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)

        def table(name, rows, axis, std):
            init = partitioned(nn.initializers.normal(std), (axis, "embed"))
            return self.param(name, init, (rows, cfg.context_width), jnp.float32)

        tokens = table("token_embedding", cfg.text_vocab, "vocab", 0.02)
        positions = table("positional_embedding", cfg.text_len, "length", 0.01)
        padding = table("padding_embedding", cfg.text_len, "length", 0.02)
        x = jnp.take(nn.with_logical_constraint(tokens, (None, None)), text, axis=0)
        x = jnp.where((text == cfg.pad_id)[..., None], padding, x) + positions
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "length", "embed"))
        x = Transformer(
            num_layers=cfg.text_layers,
            num_heads=cfg.text_heads,
            dropout_rate=cfg.dropout_rate,
            deterministic=not train,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            dtype=dtype,
            residual_init_scale=(2 * cfg.text_layers) ** -0.5,
            name="transformer",
        )(x)
        return layer_norm(dtype=dtype, name="ln_final")(x)


def config_unet(cfg, *, train: bool, **options) -> UNet:
    """The ``unet`` of a decoder-style config (:class:`DecoderConfig`, the upsampler's), with
    ``options`` for the UNet fields only some configs set."""
    return UNet(
        model_channels=cfg.model_channels,
        out_channels=cfg.out_channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attention_ds=tuple(cfg.image_size // side for side in cfg.attention_resolutions),
        head_channels=cfg.head_channels,
        groups=cfg.groups,
        resblock_updown=cfg.resblock_updown,
        dropout_rate=cfg.dropout_rate,
        deterministic=not train,
        remat_policy=cfg.unet_remat_policy,
        dtype=jnp.dtype(cfg.dtype),
        name="unet",
        **options,
    )


class Decoder(nn.Module):
    """x [b, r, r, in_channels] (noised image), t int [b] (model timesteps), image_embedding
    [b, clip_dim], text int [b, <= text_len] (when ``text_layers > 0``) -> eps / v / x0 (and
    variance channels) float32 [b, r, r, out_channels].

    With ``clip_text_width`` the caption is ``text_tokens`` float [b, text_len, clip_text_width]
    and ``text_embedding`` [b, clip_dim] (CLIP's), ``text_mask`` bool [b, text_len] optional.
    ``conditional`` bool [b] (False: null image embedding and caption; a decoder reading CLIP
    caption features keeps the caption it is given) is optional; ``train=True`` applies dropout
    and the conditioning dropout (rng "dropout").
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        image_embedding: jax.Array,
        text: jax.Array | None = None,
        *,
        text_tokens: jax.Array | None = None,
        text_embedding: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        conditional: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        cfg = self.config
        b = x.shape[0]
        check_width("x", x, cfg.in_channels, "in_channels")
        check_width("image_embedding", image_embedding, cfg.clip_dim, "clip_dim")
        dtype = jnp.dtype(cfg.dtype)
        time_dim = 4 * cfg.model_channels
        keep = keep_conditioning(self, conditional, b, 0.0, train=False)
        keep_image = keep_conditioning(self, keep, b, cfg.image_drop, train)

        null_image = self.param(
            "null_image_embedding",
            partitioned(nn.initializers.normal(cfg.clip_dim**-0.5), ("embed",)),
            (cfg.clip_dim,),
            jnp.float32,
        )
        image_embedding = jnp.where(keep_image[:, None], image_embedding, null_image)
        image_embedding = (cfg.embedding_scale * image_embedding).astype(dtype)
        emb = timestep_embedding(t, cfg.model_channels).astype(dtype)
        emb = dense(time_dim, ("embed", "mlp"), dtype=dtype, name="time_fc")(emb)
        emb = dense(time_dim, ("mlp", "embed"), dtype=dtype, name="time_proj")(nn.silu(emb))
        emb = emb + dense(time_dim, ("mlp", "embed"), dtype=dtype, name="clip_to_time")(
            image_embedding
        )
        context = dense(
            cfg.clip_tokens * cfg.context_width, ("embed", "mlp"), dtype=dtype,
            name="clip_to_tokens",
        )(image_embedding).reshape(b, cfg.clip_tokens, cfg.context_width)  # fmt: skip
        context_mask = None
        if cfg.clip_text_width:
            tokens, text_embedding = self._clip_caption(text, text_tokens, text_embedding)
            emb = emb + dense(time_dim, ("mlp", "embed"), dtype=dtype, name="text_to_time")(
                (cfg.embedding_scale * text_embedding).astype(dtype)
            )
            tokens = dense(cfg.context_width, ("mlp", "embed"), dtype=dtype, name="text_proj")(
                tokens.astype(dtype)
            )
            context = jnp.concatenate(
                [context, layer_norm(dtype=dtype, name="text_norm")(tokens)], 1
            )
            if text_mask is not None:
                context_mask = jnp.pad(
                    text_mask, ((0, 0), (cfg.clip_tokens, 0)), constant_values=True
                )
        elif text_tokens is not None or text_embedding is not None:
            raise ValueError("CLIP caption features given to a decoder without clip_text_width")
        elif cfg.text_layers:
            tokens = self._encode_text(text, keep, train)  # (b, n, w)
            emb = emb + dense(time_dim, ("mlp", "embed"), dtype=dtype, name="text_to_time")(
                tokens[:, -1]
            )
            context = jnp.concatenate([context, tokens], axis=1)
        elif text is not None:
            raise ValueError("text given to a decoder without a text encoder (text_layers 0)")

        out = config_unet(cfg, train=train)(x, emb, context, context_mask)
        return out.astype(jnp.float32)

    def _clip_caption(
        self, text: jax.Array | None, tokens: jax.Array | None, embedding: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """The CLIP caption features, checked against the config."""
        cfg = self.config
        if text is not None:
            raise ValueError(
                "this decoder reads CLIP caption features: give text_tokens and "
                "text_embedding, not text"
            )
        if tokens is None or embedding is None:
            raise ValueError(
                "this decoder reads CLIP caption features (clip_text_width): give "
                "text_tokens [batch, text_len, clip_text_width] and text_embedding"
            )
        check_width("text_tokens", tokens, cfg.clip_text_width, "clip_text_width")
        check_width("text_embedding", embedding, cfg.clip_dim, "clip_dim")
        if tokens.shape[1] != cfg.text_len:
            raise ValueError(
                f"text_tokens has {tokens.shape[1]} tokens, the config's text_len is {cfg.text_len}"
            )
        return tokens, embedding

    def _encode_text(self, text: jax.Array | None, keep: jax.Array, train: bool) -> jax.Array:
        """Caption tokens [b, text_len, context_width], the null caption where dropped."""
        cfg = self.config
        if text is None:
            raise ValueError("this decoder has a text encoder: give text [batch, <= text_len]")
        if text.ndim != 2 or text.shape[1] > cfg.text_len:
            raise ValueError(f"text of shape {text.shape} exceeds text_len {cfg.text_len}")
        text = jnp.pad(
            text, ((0, 0), (0, cfg.text_len - text.shape[1])), constant_values=cfg.pad_id
        )
        tokens = TextEncoder(cfg, name="text_encoder")(text, train=train)
        null = self.param(
            "null_text_tokens",
            partitioned(nn.initializers.normal(0.02), ("length", "embed")),
            (cfg.text_len, cfg.context_width),
            jnp.float32,
        ).astype(tokens.dtype)
        keep_text = keep_conditioning(self, keep, text.shape[0], cfg.text_drop, train)
        return jnp.where(keep_text[:, None, None], tokens, null)
