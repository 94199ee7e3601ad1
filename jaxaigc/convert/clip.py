"""Conversion between OpenAI CLIP checkpoints (``clip/model.py`` state dicts) and
:mod:`jaxaigc.models.clip` variables, both ways.

Layouts: convolutions OIHW <-> HWIO; Linear weights [out, in] <-> kernels [in, out]; an attention's
``in_proj_weight`` [3D, D] (or the attention pool's q/k/v_proj) <-> query/key/value kernels
[D, heads, 64] and ``out_proj`` / ``c_proj`` <-> the out kernel [heads, 64, out]; BatchNorm
running statistics <-> the ``batch_stats`` collection. The key bias is dropped: it adds the same
number to every score of a query, which softmax ignores, so the model has none; the way back
writes zeros there (and 0 for BatchNorm's ``num_batches_tracked``), so a round trip reproduces
every other tensor exactly and the outputs to rounding.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxaigc.models.clip import CLIPConfig

# Scalars stored beside the weights in OpenAI's TorchScript archives.
_METADATA = ("input_resolution", "context_length", "vocab_size")
_QKV = ("q_proj", "k_proj", "v_proj")
_Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One torch tensor and its Flax leaf (``path`` None: dropped, written back as ``default``)."""

    torch_key: str
    path: tuple[str, ...] | None
    to_flax: _Transform = lambda a: a
    to_torch: _Transform = lambda a: a
    default: np.ndarray | None = None


def _conv(torch_key: str, path: tuple[str, ...]) -> _Entry:
    """OIHW <-> HWIO."""
    return _Entry(
        torch_key, path, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)
    )


def _linear(prefix: str, path: tuple[str, ...]) -> list[_Entry]:
    return [
        _Entry(f"{prefix}.weight", (*path, "kernel"), np.transpose, np.transpose),
        _Entry(f"{prefix}.bias", (*path, "bias")),
    ]


def _norm(prefix: str, path: tuple[str, ...]) -> list[_Entry]:
    """LayerNorm or BatchNorm affine parameters."""
    return [_Entry(f"{prefix}.weight", (*path, "scale")), _Entry(f"{prefix}.bias", (*path, "bias"))]


def _batch_norm(prefix: str, path: tuple[str, ...]) -> list[_Entry]:
    """``path`` below ``params``/``batch_stats``."""
    return [
        *_norm(prefix, ("params", *path)),
        _Entry(f"{prefix}.running_mean", ("batch_stats", *path, "mean")),
        _Entry(f"{prefix}.running_var", ("batch_stats", *path, "var")),
        _Entry(f"{prefix}.num_batches_tracked", None, default=np.zeros((), np.int64)),
    ]


def _attention(prefix: str, out: str, path: tuple[str, ...], heads: int, width: int) -> list:
    """``{prefix}.{q,k,v}_proj`` and ``{prefix}.{out}`` <-> MultiHeadAttention at ``path``."""

    def to_heads_in(w):  # [heads * 64, in] -> [in, heads, 64]
        return w.T.reshape(w.shape[1], heads, -1)

    def from_heads_in(k):
        return k.reshape(k.shape[0], -1).T

    def to_heads_out(w):  # [out, heads * 64] -> [heads, 64, out]
        return w.T.reshape(heads, -1, w.shape[0])

    def from_heads_out(k):
        return k.reshape(-1, k.shape[-1]).T

    def bias_to_heads(b):
        return b.reshape(heads, -1)

    entries = [
        _Entry(f"{prefix}.{proj}.weight", (*path, name, "kernel"), to_heads_in, from_heads_in)
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
    ]
    return entries + [
        _Entry(f"{prefix}.q_proj.bias", (*path, "query", "bias"), bias_to_heads, np.ravel),
        _Entry(f"{prefix}.k_proj.bias", None, default=np.zeros(width, np.float32)),
        _Entry(f"{prefix}.v_proj.bias", (*path, "value", "bias"), bias_to_heads, np.ravel),
        _Entry(f"{prefix}.{out}.weight", (*path, "out", "kernel"), to_heads_out, from_heads_out),
        _Entry(f"{prefix}.{out}.bias", (*path, "out", "bias")),
    ]


def _transformer(prefix: str, path: tuple[str, ...], layers: int, heads: int, width: int) -> list:
    entries = []
    for i in range(layers):
        t, f = f"{prefix}.resblocks.{i}", (*path, f"resblocks_{i}")
        entries += _norm(f"{t}.ln_1", (*f, "ln_1"))
        entries += _attention(f"{t}.attn", "out_proj", (*f, "attn"), heads, width)
        entries += _norm(f"{t}.ln_2", (*f, "ln_2"))
        entries += _linear(f"{t}.mlp.c_fc", (*f, "mlp", "c_fc"))
        entries += _linear(f"{t}.mlp.c_proj", (*f, "mlp", "c_proj"))
    return entries


def _entries(cfg: CLIPConfig) -> list[_Entry]:
    """Every tensor of OpenAI's state dict for ``cfg`` (attention in_proj split into q/k/v_proj)."""
    v = ("params", "visual")
    if cfg.is_resnet:
        entries = []
        for i in (1, 2, 3):
            entries += [_conv(f"visual.conv{i}.weight", (*v, f"conv{i}", "kernel"))]
            entries += _batch_norm(f"visual.bn{i}", ("visual", f"bn{i}"))
        for stage, depth in enumerate(cfg.vision_layers, 1):
            for i in range(depth):
                t, f = f"visual.layer{stage}.{i}", ("visual", f"layer{stage}_{i}")
                for j in (1, 2, 3):
                    entries += [_conv(f"{t}.conv{j}.weight", ("params", *f, f"conv{j}", "kernel"))]
                    entries += _batch_norm(f"{t}.bn{j}", (*f, f"bn{j}"))
                if i == 0:  # the first block of every stage changes the channel count
                    path = ("params", *f, "downsample_conv", "kernel")
                    entries += [_conv(f"{t}.downsample.0.weight", path)]
                    entries += _batch_norm(f"{t}.downsample.1", (*f, "downsample_bn"))
        pool = (*v, "attnpool")
        entries += [_Entry("visual.attnpool.positional_embedding", (*pool, "positional_embedding"))]
        entries += _attention(
            "visual.attnpool", "c_proj", (*pool, "attn"), cfg.vision_heads, 32 * cfg.vision_width
        )
    else:
        entries = [
            _conv("visual.conv1.weight", (*v, "conv1", "kernel")),
            *(_Entry(f"visual.{n}", (*v, n)) for n in ("class_embedding", "positional_embedding")),
            *_norm("visual.ln_pre", (*v, "ln_pre")),
            *_transformer(
                "visual.transformer",
                (*v, "transformer"),
                cfg.vision_layers,
                cfg.vision_heads,
                cfg.vision_width,
            ),
            *_norm("visual.ln_post", (*v, "ln_post")),
            _Entry("visual.proj", (*v, "proj")),
        ]
    entries += [
        _Entry("token_embedding.weight", ("params", "token_embedding")),
        *(
            _Entry(n, ("params", n))
            for n in ("positional_embedding", "text_projection", "logit_scale")
        ),
        *_transformer(
            "transformer",
            ("params", "transformer"),
            cfg.transformer_layers,
            cfg.transformer_heads,
            cfg.transformer_width,
        ),
        *_norm("ln_final", ("params", "ln_final")),
    ]
    return entries


def _to_numpy(value: Any) -> np.ndarray:
    """float32 (or integer) NumPy array from a NumPy array or a torch tensor of any float type."""
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported: never import it
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _infer_fields(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The architecture from tensor shapes, as OpenAI's ``build_model`` (heads = width / 64)."""

    def depth(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    def grid(key: str) -> int:
        tokens = sd[key].shape[0] - 1
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"{key} has {tokens} + 1 positions, not a square grid + 1")
        return math.isqrt(tokens)

    try:
        if "visual.proj" in sd:
            patch = sd["visual.conv1.weight"]
            vision = dict(
                vision_layers=depth("visual.transformer.resblocks."),
                vision_width=patch.shape[0],
                vision_patch_size=patch.shape[-1],
                image_resolution=patch.shape[-1] * grid("visual.positional_embedding"),
            )
        else:
            vision = dict(
                vision_layers=tuple(depth(f"visual.layer{stage}.") for stage in (1, 2, 3, 4)),
                vision_width=sd["visual.layer1.0.conv1.weight"].shape[0],
                image_resolution=32 * grid("visual.attnpool.positional_embedding"),
            )
        width = sd["ln_final.weight"].shape[0]
        return dict(
            embed_dim=sd["text_projection"].shape[1],
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=width // 64,
            transformer_layers=depth("transformer.resblocks."),
            **vision,
        )
    except KeyError as e:
        raise ValueError(f"not an OpenAI CLIP state dict: it has no {e.args[0]!r}") from None


def _split_in_proj(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``attn.in_proj_{weight,bias}`` -> ``attn.{q,k,v}_proj.{weight,bias}``."""
    out = {}
    for key, value in sd.items():
        prefix, _, name = key.rpartition(".")
        if name in ("in_proj_weight", "in_proj_bias"):
            kind = name.removeprefix("in_proj_")
            for proj, part in zip(_QKV, np.split(value, 3), strict=True):
                out[f"{prefix}.{proj}.{kind}"] = part
        else:
            out[key] = value
    return out


def _merge_in_proj(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`_split_in_proj` (the attention pool keeps its separate q/k/v)."""
    out = {}
    for key, value in sd.items():
        block, attn, tail = key.rpartition(".attn.")
        proj, _, kind = tail.partition(".")
        if not attn or proj not in _QKV:
            out[key] = value
        elif proj == "q_proj":
            parts = [sd[f"{block}.attn.{p}.{kind}"] for p in _QKV]
            out[f"{block}.attn.in_proj_{kind}"] = np.concatenate(parts)
    return out


def _scanned_groups(cfg: CLIPConfig) -> list[tuple[tuple[str, ...], list[str], str]]:
    """(parent path, block names, scanned name) of the blocks ``scan_layers`` stacks."""
    groups = [(("params", "transformer"), cfg.transformer_layers)]
    if not cfg.is_resnet:
        groups.append((("params", "visual", "transformer"), cfg.vision_layers))
    stacks = [(path, [f"resblocks_{i}" for i in range(n)], "resblocks") for path, n in groups]
    if cfg.is_resnet:
        stacks += [
            ((collection, "visual"), [f"layer{s}_{i}" for i in range(1, depth)], f"layer{s}_rest")
            for s, depth in enumerate(cfg.vision_layers, 1)
            if depth > 1
            for collection in ("params", "batch_stats")
        ]
    return stacks


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def openai_constructor_args(config: CLIPConfig) -> tuple:
    """The positional arguments of OpenAI's ``clip.model.CLIP`` for the same architecture."""
    return (
        config.embed_dim,
        config.image_resolution,
        config.vision_layers,
        config.vision_width,
        config.vision_patch_size,
        config.context_length,
        config.vocab_size,
        config.transformer_width,
        config.transformer_heads,
        config.transformer_layers,
    )


def clip_from_torch(state_dict: Mapping[str, Any], **changes: Any) -> tuple[CLIPConfig, dict]:
    """Converts an OpenAI CLIP state dict (NumPy arrays or torch tensors, any float type).

    Args:
      state_dict: tensor name -> array, as ``model.state_dict()`` of OpenAI's ``CLIP``.
      **changes: ``CLIPConfig`` fields not stored in the weights (``dtype``, ``scan_layers``,
        ``remat_policy``); with ``scan_layers=True`` the blocks come stacked.
    Returns:
      ``(config, variables)``: float32 NumPy ``{"params": ...}`` plus ``"batch_stats"`` for a
      ResNet, ready for ``CLIP(config).apply``.
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items() if k not in _METADATA}
    config = CLIPConfig(**{**_infer_fields(sd), **changes})
    sd = _split_in_proj(sd)
    variables: dict = {}
    for entry in _entries(config):
        if entry.path is None:  # dropped; some exports leave it out
            sd.pop(entry.torch_key, None)
        elif entry.torch_key not in sd:
            raise ValueError(f"the state dict has no {entry.torch_key!r}")
        else:
            value = np.asarray(entry.to_flax(sd.pop(entry.torch_key)), order="C")
            _set(variables, entry.path, value)
    if sd:
        raise ValueError(f"unexpected tensors in the state dict: {sorted(sd)}")
    if config.scan_layers:
        for path, names, scanned in _scanned_groups(config):
            parent = _get(variables, path)
            blocks = [parent.pop(name) for name in names]
            parent[scanned] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return config, variables


def clip_to_torch(config: CLIPConfig, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`clip_from_torch`: a state dict OpenAI's ``CLIP`` loads strictly.

    Key biases are written as zeros and ``num_batches_tracked`` as 0 (see the module docstring).
    """
    # tree.map copies the containers, so unstacking below leaves the caller's tree alone.
    variables = jax.tree.map(np.asarray, nn.meta.unbox(dict(variables)))
    if config.scan_layers:
        for path, names, scanned in _scanned_groups(config):
            parent = _get(variables, path)
            stacked = parent.pop(scanned)
            for i, name in enumerate(names):
                parent[name] = jax.tree.map(lambda x, i=i: x[i], stacked)
    sd = {}
    for entry in _entries(config):
        if entry.path is None:
            sd[entry.torch_key] = entry.default
        else:
            sd[entry.torch_key] = np.asarray(entry.to_torch(_get(variables, entry.path)), order="C")
    return _merge_in_proj(sd)


def load_clip(path: str | Path, **changes: Any) -> tuple[CLIPConfig, dict]:
    """Reads an OpenAI checkpoint and converts it with :func:`clip_from_torch`.

    ``.pt`` / ``.pth``: a TorchScript archive (OpenAI's downloads) or a plain state dict, read with
    ``weights_only=True`` (needs torch; no pickled code runs); ``.safetensors``: read with NumPy.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            state_dict = load_file(path)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    elif path.suffix in (".pt", ".pth"):
        state_dict = _load_torch(path)
    else:
        raise ValueError(
            f"unknown checkpoint suffix {path.suffix!r}: use .pt, .pth or .safetensors"
        )
    return clip_from_torch(state_dict, **changes)


def _load_torch(path: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
    try:
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: try a plain state dict
        pass
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError)
        raise ValueError(f"{path} is neither a TorchScript archive nor a state dict: {e}") from e
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict
