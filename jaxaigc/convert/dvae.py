"""Conversion between OpenAI's ``dall_e`` dVAE (PyTorch, NCHW) and :mod:`jaxaigc.models.dvae`.

Torch names ``blocks.group_{g}.block_{i}.res_path.conv_{j}.{w,b}`` become
``group_{g}_block_{i}/conv_{j}/{kernel,bias}``; ``id_path`` stays ``id_path``; ``blocks.input``
and ``blocks.output.conv`` become ``input`` and ``output``. Kernels go from [out, in, k, k] to
[k, k, in, out].
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.models.dvae import DVAEConfig, init_dvae

_BLOCK_KEY = re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.")
_BLOCK_NAME = re.compile(r"group_(\d+)_block_(\d+)")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch itself stays an optional dependency
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.float32)


def _block_layout(state: Mapping[str, np.ndarray], half: str) -> tuple[int, int]:
    """(group_count, n_blk_per_group) from the block names of one half's state dict."""
    blocks = {tuple(map(int, m.groups())) for key in state if (m := _BLOCK_KEY.match(key))}
    groups = sorted({g for g, _ in blocks})
    counts = {g: len({i for gg, i in blocks if gg == g}) for g in groups}
    if not groups or groups != list(range(1, len(groups) + 1)) or len(set(counts.values())) != 1:
        raise ValueError(f"{half}: unexpected residual block layout {sorted(blocks)}")
    return len(groups), counts[1]


def _half_params(state: dict[str, np.ndarray], half: str) -> dict:
    """One half's Flax params; every key of ``state`` must be used."""
    unused = dict(state)

    def conv(prefix: str) -> dict:
        try:
            w, b = unused.pop(f"{prefix}.w"), unused.pop(f"{prefix}.b")
        except KeyError as e:
            raise ValueError(f"{half}: missing {e.args[0]!r}") from None
        return {"kernel": w.transpose(2, 3, 1, 0), "bias": b}

    params = {"input": conv("blocks.input"), "output": conv("blocks.output.conv")}
    group_count, n_blk = _block_layout(state, half)
    for g in range(1, group_count + 1):
        for i in range(1, n_blk + 1):
            prefix = f"blocks.group_{g}.block_{i}"
            block = {f"conv_{j}": conv(f"{prefix}.res_path.conv_{j}") for j in range(1, 5)}
            if f"{prefix}.id_path.w" in unused:
                block["id_path"] = conv(f"{prefix}.id_path")
            params[f"group_{g}_block_{i}"] = block
    if unused:
        raise ValueError(f"{half}: unexpected keys {sorted(unused)}")
    return params


def dvae_from_torch(
    encoder_state_dict: Mapping[str, Any], decoder_state_dict: Mapping[str, Any]
) -> tuple[DVAEConfig, dict]:
    """``dall_e.Encoder`` / ``dall_e.Decoder`` state dicts (torch tensors or NumPy arrays) ->
    ``(config, {"encoder": {"params"}, "decoder": {"params"}})``, the config read off the shapes."""
    enc = {k: _to_numpy(v) for k, v in encoder_state_dict.items()}
    dec = {k: _to_numpy(v) for k, v in decoder_state_dict.items()}
    group_count, n_blk = _block_layout(enc, "encoder")
    if _block_layout(dec, "decoder") != (group_count, n_blk):
        raise ValueError("the encoder and decoder have different residual block layouts")
    try:
        enc_in, enc_out = enc["blocks.input.w"], enc["blocks.output.conv.w"]
        dec_in, dec_out = dec["blocks.input.w"], dec["blocks.output.conv.w"]
    except KeyError as e:
        raise ValueError(f"not a dall_e dVAE state dict: missing {e.args[0]!r}") from None
    config = DVAEConfig(
        n_hid=enc_in.shape[0],
        n_blk_per_group=n_blk,
        group_count=group_count,
        vocab_size=enc_out.shape[0],
        n_init=dec_in.shape[0],
        input_channels=enc_in.shape[1],
        output_channels=dec_out.shape[0] // 2,
    )
    variables = {
        "encoder": {"params": _half_params(enc, "encoder")},
        "decoder": {"params": _half_params(dec, "decoder")},
    }
    expected = nn.meta.unbox(jax.eval_shape(lambda rng: init_dvae(config, rng), jax.random.key(0)))
    if jax.tree.structure(expected) != jax.tree.structure(variables):
        raise ValueError(f"converted variables do not match the layout of {config}")
    flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(flat_expected, jax.tree.leaves(variables), strict=True):
        if want.shape != got.shape:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{name}: shape {got.shape} does not fit {config} ({want.shape})")
    return config, jax.tree.map(jnp.asarray, variables)


def _torch_name(module: str) -> str:
    if module in ("input", "output"):
        return "blocks.input" if module == "input" else "blocks.output.conv"
    m = _BLOCK_NAME.fullmatch(module)
    if m is None:
        raise ValueError(f"unexpected module {module!r}")
    return f"blocks.group_{m[1]}.block_{m[2]}"


def _half_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    state = {}
    for module, sub in params.items():
        prefix = _torch_name(module)
        if "kernel" in sub:
            convs = {prefix: sub}
        else:
            # Only the residual convs sit under res_path in the reference.
            convs = {
                f"{prefix}.{n if n == 'id_path' else 'res_path.' + n}": c for n, c in sub.items()
            }
        for name, conv in convs.items():
            state[f"{name}.w"] = np.asarray(conv["kernel"], np.float32).transpose(3, 2, 0, 1)
            state[f"{name}.b"] = np.asarray(conv["bias"], np.float32)
    return state


def dvae_to_torch(variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """Inverse of :func:`dvae_from_torch`: NumPy state dicts for ``dall_e.Encoder`` and
    ``dall_e.Decoder`` (load with ``{k: torch.from_numpy(v) ...}``)."""
    variables = nn.meta.unbox(variables)
    return (
        _half_state_dict(variables["encoder"]["params"]),
        _half_state_dict(variables["decoder"]["params"]),
    )


def load_dvae_pickle(
    encoder_path: str | Path, decoder_path: str | Path, *, trust_pickle: bool = False
) -> tuple[DVAEConfig, dict]:
    """Loads OpenAI's released ``encoder.pkl`` / ``decoder.pkl`` and converts them.

    Those files are pickled ``torch.nn.Module`` objects, and unpickling runs whatever code the file
    names: only load files from a source you trust, and opt in with ``trust_pickle=True``.
    """
    if not trust_pickle:
        raise ValueError(
            f"refusing to unpickle {encoder_path} and {decoder_path}: the dall_e checkpoints are "
            "pickled PyTorch modules, and unpickling a file can run arbitrary code. If you trust "
            "the files (e.g. OpenAI's cdn.openai.com/dall-e/ releases, checked against their "
            "published hashes), pass trust_pickle=True."
        )
    try:
        import torch
    except ImportError as e:
        raise ImportError("loading dall_e pickles needs PyTorch (and the dall_e package)") from e
    warnings.warn(
        f"unpickling {encoder_path} and {decoder_path} with torch.load(weights_only=False): this "
        "runs any code the files contain",
        stacklevel=2,
    )

    def load(path: str | Path) -> Mapping[str, Any]:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        return obj.state_dict() if hasattr(obj, "state_dict") else obj

    return dvae_from_torch(load(encoder_path), load(decoder_path))
