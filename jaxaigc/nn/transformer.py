"""Pre-LN Transformer block and stack, with optional ``nn.scan`` over layers and rematerialisation.

Block (GPT-2 / CLIP): x + attn(ln_1(x)); x + mlp(ln_2(x)). Parameter names follow OpenAI's CLIP
(``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``) so checkpoints map one to one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.attention import AttentionFn, MaskFn, MultiHeadAttention
from jaxaigc.nn.layers import MLP, layer_norm

# Names of rematerialisation policies accepted in configs; "none" stores every activation, "full"
# recomputes the whole block in the backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str, name: str = "remat policy") -> None:
    """Raises ValueError naming ``policy`` (the setting ``name``) unless it is in
    ``REMAT_POLICIES``."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown {name} {policy!r}; known: {sorted(REMAT_POLICIES)}")


class TransformerBlock(nn.Module):
    """One pre-LN residual block: self-attention then MLP.

    ``residual_init_scale`` multiplies the initial standard deviation of the two projections that
    write into the residual stream (attention out, mlp.c_proj); GPT-2 and CLIP use
    ``(2 * num_layers) ** -0.5`` so the stream's variance does not grow with depth.
    ``mask_fn`` / ``attention_fn``, ``attention_impl`` and the call's ``pattern``: see
    :class:`MultiHeadAttention`.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dropout_rate: float = 0.0
    mask_fn: MaskFn | tuple[MaskFn, ...] | None = None
    attention_fn: AttentionFn | tuple[AttentionFn, ...] | None = None
    deterministic: bool = True
    decode: bool = False
    dtype: jnp.dtype = jnp.float32
    residual_init_scale: float = 1.0
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, pattern: int | jax.Array = 0
    ) -> jax.Array:
        """x [b, t, d] -> [b, t, d]."""
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layer_norm(eps=self.ln_eps, dtype=self.dtype, name="ln_1")(x)
        h = MultiHeadAttention(
            self.num_heads,
            mask_fn=self.mask_fn,
            attention_fn=self.attention_fn,
            dropout_rate=self.dropout_rate,
            deterministic=self.deterministic,
            decode=self.decode,
            dtype=self.dtype,
            out_init_scale=self.residual_init_scale,
            attention_impl=self.attention_impl,
            name="attn",
        )(h, mask=mask, pattern=pattern)
        x = x + h
        h = layer_norm(eps=self.ln_eps, dtype=self.dtype, name="ln_2")(x)
        h = MLP(
            int(x.shape[-1] * self.mlp_ratio),
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            deterministic=self.deterministic,
            dtype=self.dtype,
            out_init_scale=self.residual_init_scale,
            name="mlp",
        )(h)
        return x + h


class _ScannedBlock(TransformerBlock):
    """A block with the ``(carry, x) -> (carry, y)`` signature ``nn.scan`` needs."""

    def __call__(self, x: jax.Array, mask: jax.Array | None, pattern: jax.Array):
        return super().__call__(x, mask, pattern), None


class Transformer(nn.Module):
    """A stack of ``num_layers`` blocks.

    ``scan_layers`` compiles one block and loops over stacked parameters (leading ``layers`` axis):
    compile time independent of depth, the usual choice for big models. ``remat_policy`` names an
    entry of ``REMAT_POLICIES``. Parameters: ``resblocks_{i}`` unscanned, ``resblocks`` scanned.
    ``residual_init_scale`` as in :class:`TransformerBlock`.

    Per-layer attention patterns: ``mask_fn`` (and ``attention_fn``) as a tuple of alternatives and
    ``layer_patterns[i]`` the one layer i uses. Scanned, the block gets its layer's pattern as a
    scanned int and chooses with ``lax.switch``: one compiled block for any schedule. (Scanning
    repeated groups of layers instead would need the schedule to be periodic, and DALL-E's is not
    quite: row, then (column, row, row, row) repeated, with a final conv layer.) Differentiated,
    ``lax.switch`` stores the residuals of every alternative (zeros for those not taken), so a
    remat policy keeps a scanned mixed stack's memory down (the DALL-E 12B preset uses "full").
    """

    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dropout_rate: float = 0.0
    mask_fn: MaskFn | tuple[MaskFn, ...] | None = None
    attention_fn: AttentionFn | tuple[AttentionFn, ...] | None = None
    layer_patterns: tuple[int, ...] | None = None  # default: pattern 0 everywhere
    deterministic: bool = True
    decode: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    residual_init_scale: float = 1.0
    attention_impl: str = "auto"  # see MultiHeadAttention

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        check_remat_policy(self.remat_policy)
        patterns = self.layer_patterns or (0,) * self.num_layers
        if len(patterns) != self.num_layers:
            raise ValueError(f"{len(patterns)} layer patterns given for {self.num_layers} layers")
        block_args = dict(
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            ln_eps=self.ln_eps,
            dropout_rate=self.dropout_rate,
            mask_fn=self.mask_fn,
            attention_fn=self.attention_fn,
            deterministic=self.deterministic,
            decode=self.decode,
            dtype=self.dtype,
            residual_init_scale=self.residual_init_scale,
            attention_impl=self.attention_impl,
        )
        block_cls = _ScannedBlock if self.scan_layers else TransformerBlock
        if self.remat_policy != "none":
            # Unscanned, the pattern (argument 3, counting self) is a Python int: keep it static.
            static = () if self.scan_layers else (3,)
            block_cls = nn.remat(
                block_cls, policy=REMAT_POLICIES[self.remat_policy], static_argnums=static
            )
        if not self.scan_layers:
            for i in range(self.num_layers):
                x = block_cls(**block_args, name=f"resblocks_{i}")(x, mask, patterns[i])
            return x
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(**block_args, name="resblocks")(x, mask, jnp.asarray(patterns, jnp.int32))
        return x
