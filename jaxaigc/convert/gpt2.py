"""Hugging Face GPT-2 state dicts (``GPT2LMHeadModel`` or ``GPT2Model``) ->
:mod:`jaxaigc.models.gpt` variables.

Layouts: GPT-2's ``Conv1D`` weights are already [in, out]; ``attn.c_attn`` holds q, k and v
concatenated on the output axis, split here into query/key/value kernels [d, heads, d / heads] and
``attn.c_proj`` becomes the out kernel [heads, d / heads, d]. The key bias is dropped: it adds the
same number to every score of a query, which softmax ignores, so the model has none. The LM head is
the token embedding (tied) unless the state dict carries a different ``lm_head.weight``. GPT-2's
activation is ``gelu_new`` (the tanh approximation) and its LayerNorm epsilon 1e-5, as
:class:`~jaxaigc.models.gpt.GPTConfig`'s defaults; ``attn.bias`` / ``attn.masked_bias`` are causal
mask buffers, not weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxaigc.convert.clip import _to_numpy
from jaxaigc.models.gpt import GPTConfig

HEAD_WIDTH = 64  # every released GPT-2 size uses 64-wide heads; the state dict does not say


def gpt2_from_torch(
    state_dict: Mapping[str, Any], num_heads: int | None = None, *, scan_layers: bool = False
) -> tuple[GPTConfig, dict]:
    """Converts a GPT-2 state dict (NumPy arrays or torch tensors, any float type).

    The configuration comes from the shapes: vocabulary and width from ``wte``, context from
    ``wpe``, depth from the ``h.{i}`` blocks, MLP ratio from ``c_fc``; heads are ``width // 64``
    unless ``num_heads`` is given. ``scan_layers`` stacks the blocks for a scanned model.

    Returns ``(config, {"params": ...})`` for ``GPT(config)``.
    """
    sd = {
        re.sub(r"^transformer\.", "", k): _to_numpy(v)
        for k, v in state_dict.items()
        if not re.search(r"\.attn\.(masked_)?bias$", k)
    }
    for key in ("wte.weight", "wpe.weight", "ln_f.weight"):
        if key not in sd:
            raise ValueError(f"the state dict has no {key!r}; is it a GPT-2 state dict?")
    vocab, width = sd["wte.weight"].shape
    heads = num_heads or width // HEAD_WIDTH
    if heads < 1 or width % heads:
        raise ValueError(f"width {width} is not divisible by num_heads={heads}")
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))})
    if layers == 0:
        raise ValueError("the state dict has no transformer blocks (keys h.{i}.*)")
    head_dim = width // heads

    def pop(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"the state dict has no {key!r}")
        return sd.pop(key)

    def norm(prefix: str) -> dict:
        return {"scale": pop(f"{prefix}.weight"), "bias": pop(f"{prefix}.bias")}

    blocks = []
    for i in range(layers):
        p = f"h.{i}"
        qkv, qkv_bias = pop(f"{p}.attn.c_attn.weight"), pop(f"{p}.attn.c_attn.bias")
        q, k, v = np.split(qkv, 3, axis=1)  # [d, d] each
        q_bias, _, v_bias = np.split(qkv_bias, 3)  # the key bias is dropped (see the docstring)
        blocks.append(
            {
                "ln_1": norm(f"{p}.ln_1"),
                "attn": {
                    "query": {
                        "kernel": q.reshape(width, heads, head_dim),
                        "bias": q_bias.reshape(heads, head_dim),
                    },
                    "key": {"kernel": k.reshape(width, heads, head_dim)},
                    "value": {
                        "kernel": v.reshape(width, heads, head_dim),
                        "bias": v_bias.reshape(heads, head_dim),
                    },
                    "out": {
                        "kernel": pop(f"{p}.attn.c_proj.weight").reshape(heads, head_dim, width),
                        "bias": pop(f"{p}.attn.c_proj.bias"),
                    },
                },
                "ln_2": norm(f"{p}.ln_2"),
                "mlp": {
                    "c_fc": {
                        "kernel": pop(f"{p}.mlp.c_fc.weight"),
                        "bias": pop(f"{p}.mlp.c_fc.bias"),
                    },
                    "c_proj": {
                        "kernel": pop(f"{p}.mlp.c_proj.weight"),
                        "bias": pop(f"{p}.mlp.c_proj.bias"),
                    },
                },
            }
        )
    token_embedding = pop("wte.weight")
    params = {
        "token_embedding": token_embedding,
        "positional_embedding": pop("wpe.weight"),
        "ln_final": norm("ln_f"),
    }
    if scan_layers:
        params["transformer"] = {"resblocks": _stack(blocks)}
    else:
        params["transformer"] = {f"resblocks_{i}": b for i, b in enumerate(blocks)}
    head = sd.pop("lm_head.weight", None)
    tied = head is None or np.array_equal(head, token_embedding)
    if not tied:
        params["head"] = {"kernel": head.T}
    if sd:
        raise ValueError(f"unexpected keys in the GPT-2 state dict: {sorted(sd)[:8]}")
    config = GPTConfig(
        vocab_size=vocab,
        context_length=params["positional_embedding"].shape[0],
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=blocks[0]["mlp"]["c_fc"]["kernel"].shape[1] / width,
        activation="gelu_tanh",
        ln_eps=1e-5,
        scan_layers=scan_layers,
        tie_embeddings=tied,
    )
    return config, {"params": _contiguous(params)}


def _stack(blocks: list[dict]) -> dict:
    """Per-layer trees -> one tree with a leading ``layers`` axis."""
    if isinstance(blocks[0], dict):
        return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
    return np.stack(blocks)


def _contiguous(tree: dict) -> dict:
    return {
        k: _contiguous(v) if isinstance(v, dict) else np.ascontiguousarray(v, np.float32)
        for k, v in tree.items()
    }
