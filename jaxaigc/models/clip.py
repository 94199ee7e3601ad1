"""CLIP (Radford et al. 2021, "Learning transferable visual models from natural language
supervision"): an image encoder (ModifiedResNet or ViT) and a causal text Transformer mapped into
one embedding space, compared by cosine similarity times a learned temperature.

Parameter names follow OpenAI's ``clip/model.py`` so that ``jaxaigc.convert.clip`` maps released
checkpoints one to one. Images are NHWC and already normalised; tokens are int32 with the
end-of-text token the largest id of each row.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn import (
    REMAT_POLICIES,
    Transformer,
    causal_mask,
    check_remat_policy,
    layer_norm,
    partitioned,
)
from jaxaigc.nn.attention import check_attention_impl
from jaxaigc.nn.resnet import BLURS, AttentionPool2d, Bottleneck, batch_norm, blur_pool, conv

# name: (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#        transformer_width, transformer_heads, transformer_layers); OpenAI's released models, then
# tiny CPU presets (32 px images; the full vocabulary and context so that the real tokenizer fits,
# set vocab_size / context_length smaller for toy data).
PRESETS: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
    "tiny-vit": (64, 32, 2, 128, 8, 128, 2, 2),
    "tiny-rn": (64, 32, (1, 1, 1, 1), 8, None, 128, 2, 2),
}
_PRESET_FIELDS = (
    "embed_dim",
    "image_resolution",
    "vision_layers",
    "vision_width",
    "vision_patch_size",
    "transformer_width",
    "transformer_heads",
    "transformer_layers",
)


# The learned log temperature stays in [0, ln 100]: open_clip clamps the parameter after every
# update (a clamp inside the loss would zero its gradient above ln 100 while Adam's momentum kept
# pushing the raw value up, and the model's own logits would differ from the trained ones).
LOGIT_SCALE_RANGE = (0.0, math.log(100.0))


def clamp_logit_scale(params: dict) -> dict:
    """``params`` with ``logit_scale`` clipped to :data:`LOGIT_SCALE_RANGE` (a train-step
    constraint: ``Task(constrain_params=clamp_logit_scale)``)."""
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], *LOGIT_SCALE_RANGE)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """The architecture (the arguments of OpenAI's ``CLIP``) and how to compute it."""

    embed_dim: int  # the joint embedding space
    image_resolution: int
    vision_layers: int | tuple[int, ...]  # ViT depth, or Bottlenecks per ResNet stage
    vision_width: int  # ViT width, or the ResNet's base width (its output has 32x as many channels)
    vision_patch_size: int | None = None  # None for a ResNet
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False  # scan identical layers: Transformer blocks, a ResNet stage's rest
    remat_policy: str = "none"  # for Transformer layers and ResNet Bottlenecks
    attention_impl: str = "auto"  # jaxaigc.nn.attention.ATTENTION_IMPLS: cuDNN on GPU where it can
    blur: str = "avg"  # ResNet downsampling: "avg" (OpenAI's weights) or "binomial" (BlurPool)
    # SigLIP's learned logit bias (paper init -10, with logit_scale ln 10); None: none (OpenAI).
    logit_bias_init: float | None = None
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        if isinstance(self.vision_layers, list):  # keep the config hashable (a Module attribute)
            object.__setattr__(self, "vision_layers", tuple(self.vision_layers))
        if self.is_resnet:
            if len(self.vision_layers) != 4 or self.vision_patch_size is not None:
                raise ValueError("a ResNet has 4 stages and no patch size")
            if self.image_resolution % 32:
                raise ValueError(
                    f"ResNet resolution {self.image_resolution} is not a multiple of 32"
                )
        elif not self.vision_patch_size or self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"ViT resolution {self.image_resolution} is not a multiple of the patch size "
                f"{self.vision_patch_size}"
            )
        if (32 * self.vision_width if self.is_resnet else self.vision_width) % 64:
            raise ValueError(f"vision width {self.vision_width} does not give 64-wide heads")
        if self.blur not in BLURS:
            raise ValueError(f"unknown blur {self.blur!r}; known: {BLURS}")
        check_remat_policy(self.remat_policy)
        check_attention_impl(self.attention_impl)
        low, high = LOGIT_SCALE_RANGE
        if not low <= self.logit_scale_init <= high:
            raise ValueError(
                f"logit_scale_init {self.logit_scale_init} is outside [0, ln 100 = {high:.4f}]"
            )

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        """OpenAI's convention: 64-dimensional heads (a ResNet's features are 32x its width)."""
        return (32 * self.vision_width if self.is_resnet else self.vision_width) // 64

    @classmethod
    def from_name(cls, name: str, **changes) -> CLIPConfig:
        """A preset (``"ViT-B/32"``, ``"RN50"``, ``"tiny-vit"`` ...) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP model {name!r}; known: {list(PRESETS)}")
        return cls(**{**dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True)), **changes})

    def replace(self, **changes) -> CLIPConfig:
        return dataclasses.replace(self, **changes)


class _ScannedBottleneck(Bottleneck):
    """A Bottleneck with the ``(carry, x) -> (carry, y)`` signature ``nn.scan`` needs."""

    def __call__(self, x: jax.Array):
        return super().__call__(x), None


class ModifiedResNet(nn.Module):
    """3-conv stem, blur-pooled Bottleneck stages (strides 1, 2, 2, 2), attention pooling.

    Blocks are ``layer{stage}_{i}``. With ``scan_layers`` the identical blocks 1.. of a stage are
    one scanned ``layer{stage}_rest`` (leading ``layers`` axis): RN50x64 compiles 8 blocks, not 64.
    """

    layers: tuple[int, ...]
    width: int
    out_features: int
    num_heads: int
    blur: str = "avg"
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x [b, r, r, 3] -> [b, out_features]."""
        stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))  # (features, stride)
        for i, (features, stride) in enumerate(stem, 1):
            x = conv(features, 3, stride=stride, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train=train, dtype=self.dtype, name=f"bn{i}")(x))
        x = blur_pool(x, 2, self.blur)  # (b, r/4, r/4, width)
        remat = self.remat_policy != "none"
        policy = REMAT_POLICIES[self.remat_policy]
        block = nn.remat(Bottleneck, policy=policy) if remat else Bottleneck
        for stage, depth in enumerate(self.layers):
            args = dict(planes=self.width * 2**stage, blur=self.blur, train=train, dtype=self.dtype)
            first = block(**args, stride=2 if stage > 0 else 1, name=f"layer{stage + 1}_0")
            x = first(x)
            if self.scan_layers and depth > 1:
                scanned = (
                    nn.remat(_ScannedBottleneck, policy=policy) if remat else _ScannedBottleneck
                )
                rest = nn.scan(
                    scanned,
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True},
                    length=depth - 1,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                x, _ = rest(**args, name=f"layer{stage + 1}_rest")(x)
            else:
                for i in range(1, depth):
                    x = block(**args, name=f"layer{stage + 1}_{i}")(x)
        # x: (b, r/32, r/32, 32 * width)
        return AttentionPool2d(self.num_heads, self.out_features, self.dtype, name="attnpool")(x)


class VisionTransformer(nn.Module):
    """Patchify -> [class] + patches + positions -> ln_pre -> Transformer -> ln_post -> proj."""

    patch_size: int
    width: int
    layers: int
    num_heads: int
    out_features: int
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, r, r, 3] -> [b, out_features]."""
        p, scale = self.patch_size, self.width**-0.5
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(
                nn.initializers.lecun_normal(), ("height", "width", "conv_in", "embed")
            ),
            name="conv1",
        )(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # raster order of the patch grid, as OpenAI's flatten
        class_embedding = self.param(
            "class_embedding", partitioned(nn.initializers.normal(scale), ("embed",)), (d,)
        )
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(scale), ("length", "embed")),
            (gh * gw + 1, d),
        )
        cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = layer_norm(dtype=self.dtype, name="ln_pre")(x)
        x = Transformer(
            num_layers=self.layers,
            num_heads=self.num_heads,
            activation="quick_gelu",
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="transformer",
        )(x)
        x = layer_norm(dtype=self.dtype, name="ln_post")(x[:, 0])
        proj = self.param(
            "proj",
            partitioned(nn.initializers.normal(scale), ("embed", None)),
            (d, self.out_features),
        )
        return x @ proj.astype(self.dtype)


class CLIP(nn.Module):
    """``__call__(images, tokens)`` -> (logits_per_image [b_i, b_t], logits_per_text [b_t, b_i]).

    ``encode_image`` / ``encode_text`` give unnormalised embeddings [b, embed_dim] (float32);
    ``encode`` gives both L2-normalised plus ``logit_scale``, the log temperature: logits are
    ``exp(logit_scale) * cosine`` here and in the losses; training keeps the parameter in
    :data:`LOGIT_SCALE_RANGE` with :func:`clamp_logit_scale`. Variables: ``params``, and
    ``batch_stats`` for a ResNet, which ``train=True`` updates (call ``apply`` with
    ``mutable=["batch_stats"]``).
    """

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.is_resnet:
            self.visual = ModifiedResNet(
                layers=cfg.vision_layers,
                width=cfg.vision_width,
                out_features=cfg.embed_dim,
                num_heads=cfg.vision_heads,
                blur=cfg.blur,
                scan_layers=cfg.scan_layers,
                remat_policy=cfg.remat_policy,
                dtype=dtype,
            )
        else:
            self.visual = VisionTransformer(
                patch_size=cfg.vision_patch_size,
                width=cfg.vision_width,
                layers=cfg.vision_layers,
                num_heads=cfg.vision_heads,
                out_features=cfg.embed_dim,
                scan_layers=cfg.scan_layers,
                remat_policy=cfg.remat_policy,
                dtype=dtype,
                attention_impl=cfg.attention_impl,
            )
        width = cfg.transformer_width
        self.token_embedding = self.param(
            "token_embedding",
            partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, width),
        )
        self.positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(0.01), ("length", "embed")),
            (cfg.context_length, width),
        )
        self.transformer = Transformer(
            num_layers=cfg.transformer_layers,
            num_heads=cfg.transformer_heads,
            activation="quick_gelu",
            mask_fn=causal_mask,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            dtype=dtype,
            attention_impl=cfg.attention_impl,
            residual_init_scale=(2 * cfg.transformer_layers) ** -0.5,
        )
        self.ln_final = layer_norm(dtype=dtype)
        self.text_projection = self.param(
            "text_projection",
            partitioned(nn.initializers.normal(width**-0.5), ("embed", None)),
            (width, cfg.embed_dim),
        )
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(cfg.logit_scale_init), ()), ()
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(cfg.logit_bias_init), ()), ()
            )

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images float [b, r, r, 3] (normalised, NHWC) -> [b, embed_dim]."""
        cfg = self.config
        expected = (cfg.image_resolution, cfg.image_resolution, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}] (NHWC), "
                f"got {tuple(images.shape)}"
            )
        x = images.astype(jnp.dtype(cfg.dtype))
        x = nn.with_logical_constraint(x, ("batch", "height", "width", None))
        x = self.visual(x, train=train) if cfg.is_resnet else self.visual(x)
        return x.astype(jnp.float32)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int [b, t <= context_length] -> [b, embed_dim], read at each row's largest id."""
        return self.text_features(tokens)[0]

    def text_features(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int [b, t <= context_length] -> (the embedding [b, embed_dim] of
        :meth:`encode_text`, the final layer norm's per-token features [b, t, width]), float32;
        unCLIP's prior and decoder read the per-token ones."""
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be integer [batch, length], got {tokens.dtype}{tokens.shape}"
            )
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the context length {cfg.context_length}"
            )
        # Gather from whole tables, as in the GPT model: a table sharded along embed makes XLA
        # rematerialise the gather to reach the batch sharding.
        table = nn.with_logical_constraint(self.token_embedding, (None, None))
        positions = nn.with_logical_constraint(self.positional_embedding, (None, None))
        x = jnp.take(table, tokens, axis=0) + positions[: tokens.shape[1]]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = self.transformer(x.astype(jnp.dtype(cfg.dtype)))
        per_token = self.ln_final(x)
        # The end-of-text token has the largest id, so argmax finds it (the first, if repeated).
        x = per_token[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]  # (b, width)
        pooled = (x @ self.text_projection.astype(x.dtype)).astype(jnp.float32)
        return pooled, per_token.astype(jnp.float32)

    def encode(
        self, images: jax.Array, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embeddings, text embeddings), each L2-normalised, and logit_scale."""
        image = self.encode_image(images, train=train)
        text = self.encode_text(tokens)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return image, text, self.logit_scale

    def __call__(
        self, images: jax.Array, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        image, text, logit_scale = self.encode(images, tokens, train=train)
        logits_per_image = jnp.exp(logit_scale) * image @ text.T  # cosine similarity / temperature
        return logits_per_image, logits_per_image.T
