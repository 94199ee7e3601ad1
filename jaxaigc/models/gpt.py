"""A GPT-style decoder-only language model (Radford et al. 2019), the policy of the InstructGPT
pipeline and the tiny LM the training loop is tested on."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn import Transformer, causal_mask, dense, layer_norm, partitioned
from jaxaigc.nn.attention import decode_positions


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
    # KV-cache mode for sampling: config.replace(decode=True). Decoding past context_length is the
    # caller's to prevent (jaxaigc.sample.decode checks it): positions beyond it give NaN logits.
    decode: bool = False

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)


class GPT(nn.Module):
    """tokens int32 [b, t] -> logits float32 [b, t, vocab]."""

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if tokens.shape[1] > cfg.context_length:
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
        positions = decode_positions(self, tokens.shape[1], cfg.decode)
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
            name="transformer",
        )(x)
        x = layer_norm(eps=cfg.ln_eps, dtype=dtype, name="ln_final")(x)
        logits = dense(
            cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, name="head"
        )(x)
        return logits.astype(jnp.float32)
