"""The DALL-E transformer (Ramesh et al. 2021, "Zero-shot text-to-image generation"): a
decoder-only transformer over text tokens followed by dVAE image tokens, with the paper's sparse
attention masks by layer (:mod:`jaxaigc.nn.sparse`).

Inputs: text int [b, <= text_len], right-padded with ``pad_id`` (default 0, a reserved id of the
text vocabulary; shorter captions are padded here), and image tokens int [b, m <= image_side**2]
in raster order. The transformer sees the ``text_len + m`` tokens as they are, so the masks (and
their block counts) are the paper's; position p predicts token p + 1. The first text token, which
has nothing before it, is predicted by learned logits (``start_logits``): a causal transformer's
output at a start position could only be a constant, so the constant is learned directly and the
sequence keeps its ``text_len + image_side**2`` positions.

Embeddings: text tokens plus learned text positions, except that padded positions take a learned
pad embedding per position instead of the token embedding (paper App. B.2); image tokens plus
learned row and column embeddings. Two heads, text and image, each over its own vocabulary only:
no logits are computed for the other vocabulary just to be masked out.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.nn import Transformer, check_remat_policy, dense, layer_norm, partitioned
from jaxaigc.nn.attention import decode_positions
from jaxaigc.nn.layers import ACTIVATIONS
from jaxaigc.nn.sparse import KINDS, SPARSE_KERNELS, DALLEMask, block_sparse_attention, layer_masks

# "sparse": the platform's block-sparse kernel (splash on TPU, Triton on GPU, portable on CPU);
# "dense": the masked dense attention; or one of the kernels by name.
ATTENTION_PATHS = ("sparse", "dense", *SPARSE_KERNELS)

# name: (text_len, text_vocab, image_side, image_vocab, width, layers, heads)
PRESETS: dict[str, tuple] = {
    # The paper's 12B model: 256 BPE tokens of 16,384, 32 x 32 image tokens of 8,192.
    "paper-12b": (256, 16384, 32, 8192, 3968, 64, 62),
    # CPU: the tiny dVAE's 8 x 8 grid of 512 codes (jaxaigc.models.dvae "tiny", 64 px images).
    "tiny": (16, 1024, 8, 512, 128, 4, 4),
}
_PRESET_FIELDS = ("text_len", "text_vocab", "image_side", "image_vocab", "width", "layers", "heads")
# Not architecture: how the 12B model is computed (bf16, one scanned block, recomputed in backward).
_PRESET_COMPUTE = {"paper-12b": dict(dtype="bfloat16", scan_layers=True, remat_policy="full")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DALLEConfig:
    text_len: int
    text_vocab: int
    image_side: int  # the image token grid is image_side x image_side
    image_vocab: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-5
    dropout_rate: float = 0.0
    pad_id: int = 0  # text padding id (its token embedding is never used)
    conv_kernel: int = 11  # side of the convolutional mask's neighbourhood
    layer_kinds: tuple[str, ...] | None = None  # mask kind per layer; None: the paper's schedule
    attention: str = "sparse"  # one of ATTENTION_PATHS
    block_size: int = 128  # query tokens per block of the portable path (whole grid rows)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False  # one compiled block for any depth; lax.switch picks each mask
    remat_policy: str = "none"
    # KV-cache mode for sampling: config.replace(decode=True). See DALLE.__call__.
    decode: bool = False

    def __post_init__(self):
        if isinstance(self.layer_kinds, list):  # keep the config hashable (a Module attribute)
            object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        for name in ("text_len", "text_vocab", "image_side", "image_vocab", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if not 0 <= self.pad_id < self.text_vocab:
            raise ValueError(
                f"pad_id {self.pad_id} is outside the text vocabulary [0, {self.text_vocab})"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel {self.conv_kernel} must be a positive odd number")
        if self.layer_kinds is not None:
            if len(self.layer_kinds) != self.layers:
                raise ValueError(
                    f"{len(self.layer_kinds)} layer_kinds given for {self.layers} layers"
                )
            unknown = set(self.layer_kinds) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown mask kinds {sorted(unknown)}; known: {KINDS}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention {self.attention!r}; known: {ATTENTION_PATHS}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}"
            )
        check_remat_policy(self.remat_policy)

    @property
    def image_len(self) -> int:
        return self.image_side**2

    @property
    def length(self) -> int:
        """Tokens in a full sequence: text then image."""
        return self.text_len + self.image_len

    @property
    def kinds(self) -> tuple[str, ...]:
        """The mask kind of each layer."""
        return self.layer_kinds or tuple(layer_masks(self.layers))

    @classmethod
    def from_name(cls, name: str, **changes) -> DALLEConfig:
        """A preset (``"tiny"``, ``"paper-12b"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown DALL-E model {name!r}; known: {list(PRESETS)}")
        fields = dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True))
        return cls(**{**fields, **_PRESET_COMPUTE.get(name, {}), **changes})

    def replace(self, **changes) -> DALLEConfig:
        return dataclasses.replace(self, **changes)


def _attention_alternatives(cfg: DALLEConfig):
    """Distinct mask kinds, each layer's index into them, their mask builders and kernels."""
    distinct = tuple(dict.fromkeys(cfg.kinds))
    patterns = tuple(distinct.index(kind) for kind in cfg.kinds)
    geometry = dict(text_len=cfg.text_len, image_side=cfg.image_side, kernel=cfg.conv_kernel)
    masks = tuple(DALLEMask(kind, **geometry) for kind in distinct)
    if cfg.attention == "dense":
        return patterns, masks, None
    implementation = None if cfg.attention == "sparse" else cfg.attention
    kernel = functools.partial(
        block_sparse_attention,
        block_size=cfg.block_size,
        implementation=implementation,
        **geometry,
    )
    return patterns, masks, tuple(functools.partial(kernel, kind=kind) for kind in distinct)


def _check_ids(name: str, ids: jax.Array, vocab: int) -> None:
    """Out-of-vocabulary ids name the value and the limit (concrete inputs only)."""
    if isinstance(ids, jax.core.Tracer) or ids.size == 0:
        return
    low, high = int(np.min(ids)), int(np.max(ids))
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"{name} token {bad} is outside the {name} vocabulary [0, {vocab})")


class DALLE(nn.Module):
    """text int [b, <= text_len], image int [b, m] -> (text logits float32 [b, text_len,
    text_vocab], image logits float32 [b, min(m + 1, image_side**2), image_vocab]).

    ``text_logits[:, j]`` predicts text token j and ``image_logits[:, j]`` image token j, each
    from the tokens before it. With ``decode=True`` (KV cache, sized by the inputs given to
    ``init``: pass a full-length image there) the first call gives the text and an image prefix
    (often empty) and returns as above; later calls give ``text=None`` and the next image tokens
    and return ``(None, logits [b, n, image_vocab])``, each row predicting the token after its
    input. Feeding the last image token or more than the cache holds is the caller's to prevent.
    """

    config: DALLEConfig

    @nn.compact
    def __call__(
        self, text: jax.Array | None, image: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array | None, jax.Array]:
        cfg = self.config
        if text is None and not cfg.decode:
            raise ValueError("text is required outside decode mode")
        if image.ndim != 2 or image.shape[1] > cfg.image_len:
            raise ValueError(
                f"image tokens must be [batch, <= image_side**2 = {cfg.image_len}], got shape "
                f"{image.shape}"
            )
        _check_ids("image", image, cfg.image_vocab)
        tokens = image
        if text is not None:
            if text.ndim != 2 or text.shape[1] > cfg.text_len:
                raise ValueError(
                    f"caption of shape {text.shape} exceeds text_len {cfg.text_len} (or is not "
                    "[batch, length])"
                )
            _check_ids("text", text, cfg.text_vocab)
            text = jnp.pad(
                text, ((0, 0), (0, cfg.text_len - text.shape[1])), constant_values=cfg.pad_id
            )
            tokens = jnp.concatenate([text, image.astype(text.dtype)], 1)
        positions = decode_positions(self, tokens.shape[1], cfg.decode)

        dtype = jnp.dtype(cfg.dtype)
        x = self._embed(tokens, positions)
        x = nn.Dropout(cfg.dropout_rate)(x.astype(dtype), deterministic=not train)
        patterns, masks, kernels = _attention_alternatives(cfg)
        x = Transformer(
            num_layers=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            activation=cfg.activation,
            ln_eps=cfg.ln_eps,
            dropout_rate=cfg.dropout_rate,
            mask_fn=masks,
            attention_fn=kernels,
            layer_patterns=patterns,
            deterministic=not train,
            decode=cfg.decode,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            dtype=dtype,
            residual_init_scale=(2 * cfg.layers) ** -0.5,
            name="transformer",
        )(x)
        x = layer_norm(eps=cfg.ln_eps, dtype=dtype, name="ln_final")(x)

        def head(name: str, vocab: int, h: jax.Array) -> jax.Array:
            logits = dense(vocab, ("embed", "vocab"), use_bias=False, dtype=dtype, name=name)(h)
            return logits.astype(jnp.float32)

        start_logits = self.param(
            "start_logits", partitioned(nn.initializers.zeros, ("vocab",)), (cfg.text_vocab,)
        )
        if text is None:  # decode steps: every position is an image position
            return None, head("image_head", cfg.image_vocab, x)
        t = cfg.text_len
        # Position p predicts token p + 1: text 1.. from positions .. t - 2, image 0.. from t - 1 ..
        text_logits = jnp.concatenate(
            [
                jnp.broadcast_to(start_logits, (x.shape[0], 1, cfg.text_vocab)),
                head("text_head", cfg.text_vocab, x[:, : t - 1]),
            ],
            1,
        )
        image_logits = head("image_head", cfg.image_vocab, x[:, t - 1 : t - 1 + cfg.image_len])
        return text_logits, image_logits

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens int [b, n] at sequence positions [n] (traced when decoding) -> [b, n, width].

        Both the text and the image embedding are gathered for every position and one is kept:
        a decode step's positions are known only at run time.
        """
        cfg = self.config
        normal = nn.initializers.normal

        def table(name: str, rows: int, axis: str, std: float) -> jax.Array:
            param = self.param(
                name, partitioned(normal(std), (axis, "embed")), (rows, cfg.width), jnp.float32
            )
            # Gather from whole tables (FSDP all-gathers them anyway), as in GPT.
            return nn.with_logical_constraint(param, (None, None))

        text_embedding = table("text_embedding", cfg.text_vocab, "vocab", 0.02)
        text_positions = table("text_positional_embedding", cfg.text_len, "length", 0.01)
        pad_embedding = table("pad_embedding", cfg.text_len, "length", 0.02)
        image_embedding = table("image_embedding", cfg.image_vocab, "vocab", 0.02)
        row_embedding = table("row_embedding", cfg.image_side, "height", 0.01)
        column_embedding = table("column_embedding", cfg.image_side, "width", 0.01)

        is_text = positions < cfg.text_len  # (n,)
        text_pos = jnp.clip(positions, 0, cfg.text_len - 1)
        image_pos = jnp.clip(positions - cfg.text_len, 0, cfg.image_len - 1)
        is_pad = (tokens == cfg.pad_id)[..., None]
        text_ids = jnp.where(is_text, jnp.clip(tokens, 0, cfg.text_vocab - 1), 0)
        image_ids = jnp.where(is_text, 0, jnp.clip(tokens, 0, cfg.image_vocab - 1))
        text_x = (
            jnp.where(is_pad, pad_embedding[text_pos], jnp.take(text_embedding, text_ids, axis=0))
            + text_positions[text_pos]
        )
        image_x = (
            jnp.take(image_embedding, image_ids, axis=0)
            + row_embedding[image_pos // cfg.image_side]
            + column_embedding[image_pos % cfg.image_side]
        )
        x = jnp.where(is_text[:, None], text_x, image_x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))
