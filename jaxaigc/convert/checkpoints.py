"""Reference PyTorch checkpoint files -> run directories every jaxaigc command loads.

A converted run is laid out as a trained one: ``recipe.json`` (the kind and the model's fields)
and ``checkpoints/0`` holding the parameters and the config, so :mod:`jaxaigc.pipelines` and the
recipes' ``config.stages`` read it as they read a run of their own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from jaxaigc.configs import fields, saved
from jaxaigc.convert.clip import load_clip
from jaxaigc.convert.dvae import load_dvae_pickle
from jaxaigc.convert.gpt2 import gpt2_from_torch
from jaxaigc.convert.karlo import load_karlo
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.train.checkpoint import Checkpointer
from jaxaigc.train.loop import default_train_config

KINDS = ("clip", "dvae", "gpt2", "karlo")


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _gpt2_heads(config_file: Path) -> int | None:
    """The head count of a Hugging Face ``config.json`` (None without one: GPT-2's 64-wide heads),
    after checking the rest of the architecture is the one :mod:`jaxaigc.convert.gpt2` maps."""
    if not config_file.is_file():
        return None
    hf = json.loads(config_file.read_text())
    expected = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    for key, value in expected.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{config_file}: {key}={hf[key]!r}; only {value!r} converts")
    return hf.get("n_head")


def write_run(dest: str | Path, kind: str, model: Any, variables: dict, *, source: str) -> Path:
    """Writes ``variables`` of ``model`` (a model config dataclass) as a run directory."""
    dest = Path(dest)
    config = default_train_config()
    config.train.ema_decay = 0.0  # the checkpoint holds the parameters themselves
    config.model = fields.section(model)
    config_json = config.to_dict()
    params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    state = {"params": jax.tree.map(jax.numpy.asarray, params)}
    if model_state:
        state["model_state"] = jax.tree.map(jax.numpy.asarray, model_state)
    checkpointer = Checkpointer(dest / "checkpoints", save_every=1, max_to_keep=1, async_save=False)
    try:
        checkpointer.save(0, state, data_state={}, config=config_json, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    saved.save_run(dest, kind, config_json, converted_from=source)
    return dest


def convert(kind: str, src: str | Path, dest: str | Path, *, trust_pickle: bool = False) -> Path:
    """Converts ``src`` into the run directory ``dest``.

    Args:
      kind: ``"clip"`` (an OpenAI ``.pt`` or ``.safetensors``), ``"dvae"`` (OpenAI's
        ``encoder.pkl``, with ``decoder.pkl`` beside it; pickles run code, hence
        ``trust_pickle``) or ``"gpt2"`` (a Hugging Face ``pytorch_model.bin`` or
        ``model.safetensors``, with the tokenizer's ``tokenizer.json`` or ``vocab.json`` and
        ``merges.txt`` beside it, saved into ``dest`` as ``tokenizer.json``) or ``"karlo"`` (a
        diffusers ``UnCLIPPipeline`` folder, or one component's: written as the runs
        ``dest/prior`` and ``dest/decoder`` (kinds ``karlo-prior``, ``karlo-decoder``, which
        :func:`jaxaigc.pipelines.unclip.load_stage` reads) and ``dest/super_res_first``,
        ``dest/super_res_last`` (kind ``karlo-super-res``, an ``UpsamplerConfig``)).
    """
    src = Path(src)
    if kind == "karlo":
        for stage, (model, variables) in load_karlo(src).items():
            kind = "karlo-super-res" if stage.startswith("super_res") else f"karlo-{stage}"
            write_run(Path(dest) / stage, kind, model, variables, source=str(src))
        return Path(dest)
    if kind == "clip":
        model, variables = load_clip(src)
    elif kind == "dvae":
        model, halves = load_dvae_pickle(
            src, src.with_name("decoder.pkl"), trust_pickle=trust_pickle
        )
        # A dVAE run holds the training layout, params = {"encoder", "decoder"} (pipelines.dvae).
        variables = {"params": {half: v["params"] for half, v in halves.items()}}
    elif kind == "gpt2":
        tokenizer = Gpt2Tokenizer.from_folder(src.parent)  # before writing anything
        model, variables = gpt2_from_torch(
            _read_state_dict(src), num_heads=_gpt2_heads(src.parent / "config.json")
        )
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    write_run(dest, kind, model, variables, source=str(src))
    if kind == "gpt2":
        tokenizer.save(dest)
    return Path(dest)
