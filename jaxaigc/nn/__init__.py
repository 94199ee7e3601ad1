"""Reusable layers shared by every model; each parameter carries logical axis names."""

from jaxaigc.nn.attention import (
    MultiHeadAttention,
    SeqLengths,
    causal_mask,
    combine_masks,
    select_attention,
)
from jaxaigc.nn.layers import ACTIVATIONS, MLP, activation, dense, layer_norm, partitioned
from jaxaigc.nn.sparse import dalle_mask, dalle_mask_fn, layer_masks, sparse_attention
from jaxaigc.nn.transformer import (
    REMAT_POLICIES,
    Transformer,
    TransformerBlock,
    check_remat_policy,
)
from jaxaigc.nn.unet import AttentionBlock, ResBlock, UNet, group_norm, timestep_embedding

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "REMAT_POLICIES",
    "AttentionBlock",
    "MultiHeadAttention",
    "ResBlock",
    "SeqLengths",
    "Transformer",
    "TransformerBlock",
    "UNet",
    "activation",
    "causal_mask",
    "check_remat_policy",
    "combine_masks",
    "dalle_mask",
    "dalle_mask_fn",
    "dense",
    "group_norm",
    "layer_masks",
    "layer_norm",
    "partitioned",
    "select_attention",
    "sparse_attention",
    "timestep_embedding",
]
