"""A GPT-style decoder-only language model (Radford et al. 2019): the tiny LM the training loop is
tested on, and InstructGPT's policy (``head="lm"``), reward and value models (``head="scalar"``:
one number per position; Ouyang et al. 2022). Converted GPT-2 checkpoints
(:func:`jaxaigc.convert.gpt2_from_torch`) are ``GPT`` s with ``tie_embeddings=True``.

Padded batches pass ``valid`` (True at real tokens, left or right padding): a token's position is
the number of real tokens before it, and pads are masked as keys, so a left-padded prompt gives
the same outputs at its real tokens as the prompt alone. Packed rows (several sequences end to end,
so short sequences do not pay for pads) pass ``segments`` instead: each sequence's positions start
at 0 and it attends only to itself, so its outputs are those of the sequence alone. ``branches``
adds continuations that share a prefix (a prompt and its K responses, each scored once): every
branch sees the prefix and itself, so its outputs are those of prefix + branch alone.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn import Transformer, causal_mask, dense, layer_norm, partitioned
from jaxaigc.nn.attention import check_attention_impl, decode_positions

# name: (vocab_size, context_length, width, layers, heads). GPT-2 (Radford et al. 2019) and the
# GPT-3 sizes of Brown et al. 2020, Table 2.1 (dense attention here: GPT-3 alternates dense and
# locally banded layers); all tie the LM head to the token embedding.
PRESETS: dict[str, tuple] = {
    "gpt2-small": (50257, 1024, 768, 12, 12),
    "gpt2-medium": (50257, 1024, 1024, 24, 16),
    "gpt2-large": (50257, 1024, 1280, 36, 20),
    "gpt2-xl": (50257, 1024, 1600, 48, 25),
    "gpt3-1.3b": (50257, 2048, 2048, 24, 16),  # InstructGPT's smallest policy
    "gpt3-6.7b": (50257, 2048, 4096, 32, 32),  # the size of InstructGPT's 6B reward model
    "gpt3-175b": (50257, 2048, 12288, 96, 96),
}
_PRESET_FIELDS = ("vocab_size", "context_length", "width", "layers", "heads")
# Not architecture: how the GPT-3 sizes are computed (bf16, one scanned block, recomputed in
# backward), as DALL-E's paper-12b.
_GPT3_COMPUTE = dict(dtype="bfloat16", scan_layers=True, remat_policy="full")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    context_length: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    activation: str = "gelu_tanh"  # GPT-2's GELU
    ln_eps: float = 1e-5
    dropout_rate: float = 0.0
    scan_layers: bool = False  # one compiled block for any depth
    remat_policy: str = "none"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    tie_embeddings: bool = False  # GPT-2: the LM head is the token embedding, transposed
    head: str = "lm"  # "lm": logits over the vocabulary; "scalar": a score per position
    # KV-cache mode for sampling: config.replace(decode=True). Decoding past context_length is the
    # caller's to prevent (jaxaigc.sample.decode checks it): positions beyond it give NaN logits.
    decode: bool = False
    attention_impl: str = "auto"  # jaxaigc.nn.attention.ATTENTION_IMPLS: cuDNN on GPU where it can

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; use one of {HEADS}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        check_attention_impl(self.attention_impl)

    @classmethod
    def from_name(cls, name: str, **changes) -> GPTConfig:
        """A preset (``"gpt2-small"``, ``"gpt3-1.3b"`` ...) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT model {name!r}; known: {list(PRESETS)}")
        fields = dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True), tie_embeddings=True)
        compute = _GPT3_COMPUTE if name.startswith("gpt3") else {}
        return cls(**{**fields, **compute, **changes})

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)


HEADS = ("lm", "scalar")


class ScalarHead(nn.Module):
    """x [b, t, d] -> float32 [b, t]: ``x . kernel + bias`` (kernel [d])."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(x.shape[-1] ** -0.5)
        kernel = self.param("kernel", partitioned(init, ("embed",)), (x.shape[-1],), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ()), (), jnp.float32)
        out = jnp.einsum("btd,d->bt", x, kernel.astype(self.dtype)).astype(jnp.float32)
        return out + bias


class GPT(nn.Module):
    """tokens int32 [b, t] (``valid`` bool [b, t], default all True) -> logits float32
    [b, t, vocab], or with ``head="scalar"`` scores float32 [b, t].

    ``segments`` int [b, t] (instead of ``valid``, not in decode mode) packs several sequences in a
    row: a run of equal ids > 0 is one sequence, ids change at each sequence's first token, 0 is
    padding. ``branches`` int [b, t] (with ``segments``) splits a sequence into its
    prefix (0) and continuations 1, 2, ... placed after it, each attending to the prefix and
    itself; such rows may be longer than the context as long as prefix + branch is not. In decode
    mode every call appends its tokens and their ``valid`` flags to the cache."""

    config: GPTConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        valid: jax.Array | None = None,
        segments: jax.Array | None = None,
        branches: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if valid is not None and valid.shape != tokens.shape:
            raise ValueError(f"valid has shape {valid.shape}; tokens have {tokens.shape}")
        if segments is not None:
            if segments.shape != tokens.shape:
                raise ValueError(f"segments have shape {segments.shape}; tokens {tokens.shape}")
            if valid is not None or cfg.decode:
                raise ValueError("segments (packed rows) take neither valid nor decode mode")
        if branches is not None and (segments is None or branches.shape != tokens.shape):
            raise ValueError(f"branches {branches.shape} need segments of the tokens' shape")
        if branches is None and tokens.shape[1] > cfg.context_length:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the context length {cfg.context_length}"
            )
        dtype = jnp.dtype(cfg.dtype)
        embed_init = nn.initializers.normal(0.02)
        token_embedding = self.param(
            "token_embedding",
            partitioned(embed_init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.width),
            jnp.float32,
        )
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(0.01), ("length", "embed")),
            (cfg.context_length, cfg.width),
            jnp.float32,
        )
        if segments is None:
            positions, mask = self._positions_and_mask(tokens, valid)
        else:
            positions, mask = _packed_positions_and_mask(segments, branches)
        # Gather from whole tables (FSDP all-gathers them anyway): a gather from a table sharded
        # along embed forces XLA into a full rematerialisation to reach the batch sharding.
        token_embedding = nn.with_logical_constraint(token_embedding, (None, None))
        positional_embedding = nn.with_logical_constraint(positional_embedding, (None, None))
        x = jnp.take(token_embedding, tokens, axis=0) + jnp.take(positional_embedding, positions, 0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(cfg.dropout_rate)(x.astype(dtype), deterministic=not train)
        x = Transformer(
            num_layers=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            activation=cfg.activation,
            ln_eps=cfg.ln_eps,
            dropout_rate=cfg.dropout_rate,
            mask_fn=causal_mask,
            deterministic=not train,
            decode=cfg.decode,
            scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            dtype=dtype,
            attention_impl=cfg.attention_impl,
            name="transformer",
        )(x, mask)
        x = layer_norm(eps=cfg.ln_eps, dtype=dtype, name="ln_final")(x)
        if cfg.head == "scalar":
            return ScalarHead(dtype, name="score")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, token_embedding.astype(dtype))
        else:
            logits = dense(
                cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, name="head"
            )(x)
        return logits.astype(jnp.float32)

    def _positions_and_mask(self, tokens: jax.Array, valid: jax.Array | None):
        """Position ids (int [t] or [b, t]) and the key padding mask (bool [b, 1, 1, keys] or
        None). In decode mode the keys are the cache's slots and their flags are cached."""
        cfg = self.config
        slots = decode_positions(self, tokens.shape[1], cfg.decode)  # cache slots of the tokens
        if valid is None and not cfg.decode:
            return slots, None
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        if cfg.decode:
            initialized = self.has_variable("cache", "valid")
            cached = self.variable("cache", "valid", jnp.zeros, valid.shape, bool)
            if initialized:  # the call creating the cache only sizes it
                cached.value = jax.lax.dynamic_update_slice(cached.value, valid, (0, slots[0]))
                keys = cached.value
                # Real tokens before each slot; leading pads get position 0 (they are masked).
                positions = jnp.take(jnp.cumsum(keys, axis=1) - 1, slots, axis=1)
                return jnp.maximum(positions, 0), keys[:, None, None, :]
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        return positions, valid[:, None, None, :]


def _packed_positions_and_mask(
    segments: jax.Array, branches: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Position ids int [b, t] and the mask bool [b, 1, t, t] keeping a query to keys of its own
    sequence (and of its own branch or the prefix); with the causal mask, its past. A token's
    position is the number of keys it sees before itself."""
    mask = segments[:, :, None] == segments[:, None, :]
    if branches is not None:
        mask &= (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    index = jnp.arange(segments.shape[1])
    positions = (mask & (index[None, :] < index[:, None])).sum(-1, dtype=jnp.int32)
    # Padding may run past the context in a row longer than it (its outputs are never read).
    return jnp.where(segments > 0, positions, 0), mask[:, None]
