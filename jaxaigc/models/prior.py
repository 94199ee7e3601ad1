"""The unCLIP diffusion prior (Ramesh et al. 2022, "Hierarchical text-conditional image generation
with CLIP latents", Sec. 2.2): a decoder-only causal transformer that denoises a CLIP image
embedding given its caption.

The sequence, one token each unless stated (all projected to ``width``, plus learned positions):

    [caption tokens (text_len) | z_t | timestep | z_i^(t) | final query]

caption tokens are the CLIP text encoder's per-token outputs [b, text_len, text_width]; z_t the
CLIP text embedding; z_i^(t) the noised image embedding. Under a causal mask the final query's
output, projected to ``embed_dim``, predicts the unnoised z_i (prediction "x0": the paper's
||f(z_i^(t), t, y) - z_i||^2). Padded caption positions (``text_mask`` False) take the learned null
caption token of their position, as lucidrains' DALLE2-pytorch does.

Scale. CLIP embeddings are L2-normalised, so each of their d components has variance about 1 / d,
far below the unit-variance noise of the diffusion. Both z_t and z_i are multiplied by ``scale``
(default sqrt(embed_dim), lucidrains' choice; the paper used 17.2 for ViT-L/14): the diffusion
variable is x0 = scale * z_i, whose components have about unit variance. With ``clip_stats``
(Karlo) z_i is standardised per dimension instead, x0 = (z_i - clip_mean) / clip_std, by two
parameters of the prior. The model takes the raw z_t and scales it itself; ``objectives.unclip``
and :func:`jaxaigc.sample.diffusion.sample_prior` convert z_i (:func:`embedding_to_latent`).

Kakao Brain's Karlo (the released unCLIP reproduction; diffusers' ``PriorTransformer``) is this
network with three options: padded caption tokens masked out of attention (``text_padding``
"mask") rather than replaced by null tokens; no learned null caption (``null_caption`` False: its
guidance encodes the empty caption with CLIP and passes that as the caption); ``clip_stats``. It
reads CLIP's projected text embedding as it comes, not unit-normed (``scale`` 1).

Guidance (Sec. 2.2: text conditioning dropped 10% of the time). ``conditional`` False, per
example, replaces the caption tokens and z_t by learned null embeddings; in training
(``train=True``) each example is also dropped with probability ``text_drop`` from the "dropout"
rng. :func:`jaxaigc.sample.diffusion.sample_prior` draws ``candidates`` (paper 2) embeddings per
caption with strided DDIM (paper 64 steps of the 1000-step cosine process) and keeps the one with
the higher z_i . z_t.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.diffusion import Diffusion, cosine_betas
from jaxaigc.nn import (
    Transformer,
    causal_mask,
    check_remat_policy,
    dense,
    layer_norm,
    partitioned,
)
from jaxaigc.nn.attention import check_attention_impl
from jaxaigc.nn.unet import timestep_embedding

# name: (embed_dim, text_len, text_width, width, layers, heads)
PRESETS: dict[str, tuple] = {
    # REFERENCE Sec. 3: width 2048, 24 blocks (1.2B parameters), on CLIP ViT-L/14 (77 caption
    # tokens of its 768-wide text transformer, 768-d embeddings); 64-wide heads.
    "paper-1b": (768, 77, 768, 2048, 24, 32),
    # CPU: the tiny CLIP presets' 64-d embeddings and 128-wide text transformer, 16 tokens.
    "tiny": (64, 16, 128, 128, 4, 4),
    # Kakao Brain's released Karlo prior (kakaobrain/karlo-v1-alpha, prior/config.json): diffusers'
    # PriorTransformer defaults, which its conversion script (scripts/
    # convert_kakao_brain_unclip_to_diffusers.py, PRIOR_CONFIG = {}) keeps: embedding_dim 768,
    # num_embeddings 77, 32 heads of 64 (width 2048), num_layers 20; CLIP ViT-L/14's text features.
    "karlo-prior": (768, 77, 768, 2048, 20, 32),
}
_PRESET_FIELDS = ("embed_dim", "text_len", "text_width", "width", "layers", "heads")
_PRESET_COMPUTE = {
    name: dict(dtype="bfloat16", scan_layers=True, remat_policy="full")
    for name in ("paper-1b", "karlo-prior")
}
# Karlo's options (module docstring); it feeds the raw CLIP text embedding (scale 1) and was
# trained without a learned null caption, so no conditioning dropout here.
_PRESET_OPTIONS = {
    "karlo-prior": dict(
        scale=1.0, text_padding="mask", null_caption=False, clip_stats=True, text_drop=0.0
    )
}
TEXT_PADDINGS = ("null", "mask")
EXTRA_TOKENS = 4  # z_t, timestep, z_i^(t), final query


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriorConfig:
    embed_dim: int  # CLIP's joint embedding width
    text_len: int  # caption tokens
    text_width: int  # width of the CLIP text encoder's per-token outputs
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dropout_rate: float = 0.0
    scale: float | None = None  # CLIP embeddings are multiplied by it; None: sqrt(embed_dim)
    text_drop: float = 0.1  # probability of dropping the text conditioning in training
    text_padding: str = "null"  # padded caption tokens: "null" tokens or "mask"ed from attention
    null_caption: bool = True  # learned null caption and z_t; False: the caller gives the empty one
    clip_stats: bool = False  # x0 = (z_i - clip_mean) / clip_std (parameters), not scale * z_i
    num_timesteps: int = 1000  # of the cosine process the prior is trained on
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"  # jaxaigc.nn.attention.ATTENTION_IMPLS: cuDNN on GPU where it can

    def __post_init__(self):
        for name in ("embed_dim", "text_len", "text_width", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if not 0 <= self.text_drop <= 1:
            raise ValueError(f"text_drop {self.text_drop} is outside [0, 1]")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.text_padding not in TEXT_PADDINGS:
            raise ValueError(
                f"unknown text_padding {self.text_padding!r}; use one of {TEXT_PADDINGS}"
            )
        if self.text_padding == "null" and not self.null_caption:
            raise ValueError('text_padding "null" needs the learned null caption (null_caption)')
        if self.text_drop and not self.null_caption:
            raise ValueError(
                f"text_drop {self.text_drop} needs a learned null caption; with null_caption False "
                "drop captions in the data (the empty caption) and set text_drop 0"
            )
        check_remat_policy(self.remat_policy)
        check_attention_impl(self.attention_impl)

    @property
    def embedding_scale(self) -> float:
        return float(np.sqrt(self.embed_dim)) if self.scale is None else float(self.scale)

    @property
    def length(self) -> int:
        return self.text_len + EXTRA_TOKENS

    def diffusion(self) -> Diffusion:
        """The process the prior is trained on: ``num_timesteps`` cosine steps."""
        return Diffusion(cosine_betas(self.num_timesteps))

    @classmethod
    def from_name(cls, name: str, **changes) -> PriorConfig:
        """A preset (``"tiny"``, ``"paper-1b"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown prior model {name!r}; known: {list(PRESETS)}")
        fields = dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True))
        options = {**_PRESET_OPTIONS.get(name, {}), **_PRESET_COMPUTE.get(name, {})}
        return cls(**{**fields, **options, **changes})

    def replace(self, **changes) -> PriorConfig:
        return dataclasses.replace(self, **changes)


def embedding_to_latent(config: PriorConfig, params, z: jax.Array) -> jax.Array:
    """CLIP image embeddings [b, embed_dim] -> the prior's diffusion variable x0 (module
    docstring, "Scale"); ``params`` the prior's."""
    if config.clip_stats:
        return (z - params["clip_mean"]) / params["clip_std"]
    return config.embedding_scale * z


def latent_to_embedding(config: PriorConfig, params, x: jax.Array) -> jax.Array:
    """The inverse of :func:`embedding_to_latent`."""
    if config.clip_stats:
        return x * params["clip_std"] + params["clip_mean"]
    return x / config.embedding_scale


def keep_conditioning(
    module: nn.Module, conditional: jax.Array | None, batch: int, drop: float, train: bool
) -> jax.Array:
    """bool [b]: ``conditional`` (default all True), in training also dropped with probability
    ``drop`` per example from ``module``'s "dropout" rng."""
    keep = jnp.ones((batch,), bool) if conditional is None else jnp.asarray(conditional, bool)
    if keep.shape != (batch,):
        raise ValueError(f"conditional has shape {keep.shape}, expected ({batch},)")
    if train and drop > 0:
        keep = keep & jax.random.bernoulli(module.make_rng("dropout"), 1.0 - drop, (batch,))
    return keep


def check_width(name: str, x: jax.Array, width: int, field: str) -> None:
    """An input whose last axis is not the configured width names both."""
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]}, the config's {field} is {width}")


class Prior(nn.Module):
    """x [b, embed_dim] (the noised, scaled image embedding), t int [b] (model timesteps),
    text_tokens float [b, text_len, text_width], text_embedding [b, embed_dim] (unit-norm CLIP
    z_t) -> the predicted scaled z_i, float32 [b, embed_dim].

    ``text_mask`` bool [b, text_len] (True: a caption token) and ``conditional`` bool [b]
    (False: the null caption; only with ``null_caption``) are optional; ``train=True`` applies
    dropout and conditioning dropout (rng "dropout").
    """

    config: PriorConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        text_tokens: jax.Array,
        text_embedding: jax.Array,
        *,
        text_mask: jax.Array | None = None,
        conditional: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        cfg = self.config
        b = x.shape[0]
        check_width("x", x, cfg.embed_dim, "embed_dim")
        check_width("text_embedding", text_embedding, cfg.embed_dim, "embed_dim")
        check_width("text_tokens", text_tokens, cfg.text_width, "text_width")
        if text_tokens.shape[1] != cfg.text_len:
            raise ValueError(
                f"text_tokens has {text_tokens.shape[1]} tokens, the config's text_len is "
                f"{cfg.text_len}"
            )
        if conditional is not None and not cfg.null_caption:
            raise ValueError(
                "this prior has no learned null caption (null_caption False): pass the empty "
                "caption's CLIP features as the caption instead of conditional"
            )
        dtype = jnp.dtype(cfg.dtype)
        keep = keep_conditioning(self, conditional, b, cfg.text_drop, train)[:, None, None]

        def project(name: str, h: jax.Array) -> jax.Array:
            return dense(cfg.width, ("mlp", "embed"), dtype=dtype, name=name)(h)

        def embedding(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            init = partitioned(nn.initializers.normal(0.02), axes)
            return self.param(name, init, shape, jnp.float32).astype(dtype)

        query = embedding("final_query", (cfg.width,), ("embed",))
        positions = embedding("positional_embedding", (cfg.length, cfg.width), ("length", "embed"))
        if cfg.clip_stats:  # read by embedding_to_latent; Karlo's statistics of CLIP's z_i
            for name, init in (
                ("clip_mean", nn.initializers.zeros),
                ("clip_std", nn.initializers.ones),
            ):
                self.param(name, partitioned(init, ("embed",)), (cfg.embed_dim,), jnp.float32)

        caption = project("text_proj", text_tokens.astype(dtype))  # (b, n, w)
        z_t = project("text_embedding_proj", cfg.embedding_scale * text_embedding.astype(dtype))
        if cfg.null_caption:
            null_tokens = embedding(
                "null_text_tokens", (cfg.text_len, cfg.width), ("length", "embed")
            )
            if text_mask is not None and cfg.text_padding == "null":
                caption = jnp.where(text_mask[..., None], caption, null_tokens)
            caption = jnp.where(keep, caption, null_tokens)
            z_t = jnp.where(
                keep[:, 0], z_t, embedding("null_text_embedding", (cfg.width,), ("embed",))
            )
        attention_mask = None
        if text_mask is not None and cfg.text_padding == "mask":  # keys of padded tokens masked
            keys = jnp.pad(text_mask, ((0, 0), (0, EXTRA_TOKENS)), constant_values=True)
            attention_mask = keys[:, None, None, :]  # (b, 1, 1, n + 4)
        time = timestep_embedding(t, cfg.width).astype(dtype)
        time = project("time_proj", nn.silu(project("time_fc", time)))
        noised = project("x_proj", x.astype(dtype))
        extra = jnp.stack([z_t, time, noised, jnp.broadcast_to(query, noised.shape)], axis=1)
        h = jnp.concatenate([caption, extra], axis=1) + positions  # (b, n + 4, w)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=not train)
        h = Transformer(
            num_layers=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            activation=cfg.activation,
            dropout_rate=cfg.dropout_rate,
            mask_fn=causal_mask,
            deterministic=not train,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            dtype=dtype,
            residual_init_scale=(2 * cfg.layers) ** -0.5,
            attention_impl=cfg.attention_impl,
            name="transformer",
        )(h, attention_mask)
        h = layer_norm(dtype=dtype, name="ln_final")(h[:, -1])
        out = dense(cfg.embed_dim, ("embed", "mlp"), dtype=dtype, name="out_proj")(h)
        return out.astype(jnp.float32)
