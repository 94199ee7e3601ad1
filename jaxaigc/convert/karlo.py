"""Kakao Brain's Karlo unCLIP weights in diffusers' ``UnCLIPPipeline`` layout ->
:mod:`jaxaigc.models.prior` and :mod:`jaxaigc.models.decoder` variables.

Components: ``prior`` (``PriorTransformer``) -> :class:`~jaxaigc.models.prior.Prior` with Karlo's
options (masked caption padding, no learned null caption, ``clip_mean`` / ``clip_std``);
``decoder`` (``UNet2DConditionModel``) and ``text_proj`` (``UnCLIPTextProjModel``) together ->
:class:`~jaxaigc.models.decoder.Decoder` reading CLIP's caption features (``clip_text_width``).
``super_res_first`` and ``super_res_last`` (``UNet2DModel``, Karlo's 64 -> 256 px upsampler for
all but the last step and for the last) -> :class:`~jaxaigc.models.upsampler.Upsampler`.

Layouts: Linear weights [out, in] -> kernels [in, out]; convolutions OIHW -> HWIO; attention
projections -> query / key / value kernels [d, heads, head_dim] and out kernels [heads,
head_dim, d]. The prior's key biases are dropped (they add the same number to every score of a
query, which softmax ignores; :mod:`jaxaigc.nn.attention` has none). ``text_proj``'s four extra
context tokens come out of its projection channel-major (``reshape(b, d, 4)``), the decoder's
token-major (``reshape(b, 4, d)``): the columns are permuted. The CLIP caption length (77 for
Karlo's CLIP ViT-L/14) is in neither config; it is an argument.

Each component's ``config.json`` is checked against the architecture the models implement; a
value they do not is named with its file before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxaigc.convert.clip import _to_numpy
from jaxaigc.convert.gpt2 import _contiguous
from jaxaigc.models.decoder import DecoderConfig
from jaxaigc.models.prior import EXTRA_TOKENS, PriorConfig
from jaxaigc.models.upsampler import UpsamplerConfig

CLIP_TEXT_LEN = 77  # CLIP's context: Karlo's tokenizer pads captions to it
# Karlo's pipeline runs both upsamplers at 256 px on its 64 px decoder's images (4x);
# super_res_last's config.json has no sample_size.
SUPER_RES_SIZE, SUPER_RES_FACTOR = 256, 4
SUPER_RES_STAGES = ("super_res_first", "super_res_last")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# config.json fields whose value must be this one (diffusers' default when absent).
_PRIOR_FIXED = {
    "additional_embeddings": EXTRA_TOKENS,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}
_UNET_FIXED = {
    "class_embed_type": "identity",
    "resnet_time_scale_shift": "scale_shift",
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "addition_embed_type": None,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "class_embeddings_concat": False,
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}
_SUPER_RES_FIXED = {
    "add_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "center_input_sample": False,
}
_DOWN, _ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
_UP, _ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"


def _check(config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if config.get(key, value) != value:
            raise ValueError(f"{where}: {key}={config[key]!r}; only {value!r} converts")


class _StateDict:
    """A state dict read key by key, each key at most once; :meth:`done` names any left over."""

    def __init__(self, state_dict: Mapping[str, Any], what: str):
        self.sd = {k: v for k, v in state_dict.items()}
        self.what = what

    def pop(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"the {self.what} state dict has no {key!r}")
        return _to_numpy(self.sd.pop(key))

    def linear(self, prefix: str) -> dict:
        return {"kernel": self.pop(f"{prefix}.weight").T, "bias": self.pop(f"{prefix}.bias")}

    def norm(self, prefix: str) -> dict:
        return {"scale": self.pop(f"{prefix}.weight"), "bias": self.pop(f"{prefix}.bias")}

    def conv(self, prefix: str) -> dict:
        return {
            "kernel": self.pop(f"{prefix}.weight").transpose(2, 3, 1, 0),
            "bias": self.pop(f"{prefix}.bias"),
        }

    def heads_in(self, prefix: str, head_dim: int, *, bias: bool = True) -> dict:
        weight = self.pop(f"{prefix}.weight")  # [heads * head_dim, d]
        shape = (weight.shape[0] // head_dim, head_dim)
        out = {"kernel": weight.T.reshape(weight.shape[1], *shape)}
        b = self.pop(f"{prefix}.bias")
        if bias:
            out["bias"] = b.reshape(shape)
        return out

    def heads_out(self, prefix: str, head_dim: int) -> dict:
        weight = self.pop(f"{prefix}.weight")  # [d, heads * head_dim]
        kernel = weight.T.reshape(weight.shape[1] // head_dim, head_dim, weight.shape[0])
        return {"kernel": kernel, "bias": self.pop(f"{prefix}.bias")}

    def done(self) -> None:
        if self.sd:
            unexpected = sorted(self.sd)[:8]
            raise ValueError(f"unexpected keys in the {self.what} state dict: {unexpected}")


def prior_from_diffusers(
    state_dict: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[PriorConfig, dict]:
    """A ``PriorTransformer`` state dict (NumPy arrays or torch tensors) and its ``config.json``
    -> ``(PriorConfig, {"params": ...})`` for ``Prior``, float32, unscanned."""
    _check(config, _PRIOR_FIXED, "prior config.json")
    heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 64)
    width, embed_dim = heads * head_dim, config.get("embedding_dim", 768)
    for key in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
        expected = width if key == "time_embed_dim" else embed_dim
        if config.get(key) not in (None, expected):
            raise ValueError(f"prior config.json: {key}={config[key]}; only {expected} converts")
    prior = PriorConfig.from_name("karlo-prior").replace(
        embed_dim=embed_dim,
        text_len=config.get("num_embeddings", 77),
        text_width=embed_dim,
        width=width,
        layers=config.get("num_layers", 20),
        heads=heads,
        dropout_rate=config.get("dropout", 0.0),
        dtype="float32",
        scan_layers=False,
        remat_policy="none",
    )
    sd = _StateDict(state_dict, "prior")
    sd.sd.pop("causal_attention_mask", None)  # a buffer older diffusers saved, not a weight
    params = {
        "time_fc": sd.linear("time_embedding.linear_1"),
        "time_proj": sd.linear("time_embedding.linear_2"),
        "x_proj": sd.linear("proj_in"),
        "text_embedding_proj": sd.linear("embedding_proj"),
        "text_proj": sd.linear("encoder_hidden_states_proj"),
        "positional_embedding": sd.pop("positional_embedding")[0],
        "final_query": sd.pop("prd_embedding")[0, 0],
        "ln_final": sd.norm("norm_out"),
        "out_proj": sd.linear("proj_to_clip_embeddings"),
        "clip_mean": sd.pop("clip_mean")[0],
        "clip_std": sd.pop("clip_std")[0],
    }
    if params["positional_embedding"].shape != (prior.length, width):
        raise ValueError(
            f"prior positional_embedding has shape {params['positional_embedding'].shape}, the "
            f"config's {prior.text_len} tokens + {EXTRA_TOKENS} need {(prior.length, width)}"
        )
    blocks = {}
    for i in range(prior.layers):
        p = f"transformer_blocks.{i}"
        blocks[f"resblocks_{i}"] = {
            "ln_1": sd.norm(f"{p}.norm1"),
            "attn": {
                "query": sd.heads_in(f"{p}.attn1.to_q", head_dim),
                "key": sd.heads_in(f"{p}.attn1.to_k", head_dim, bias=False),
                "value": sd.heads_in(f"{p}.attn1.to_v", head_dim),
                "out": sd.heads_out(f"{p}.attn1.to_out.0", head_dim),
            },
            "ln_2": sd.norm(f"{p}.norm3"),
            "mlp": {"c_fc": sd.linear(f"{p}.ff.net.0.proj"), "c_proj": sd.linear(f"{p}.ff.net.2")},
        }
    params["transformer"] = blocks
    sd.done()
    return prior, {"params": _contiguous(params)}


def _unet_levels(
    config: Mapping[str, Any], where: str, *, attention: bool = True
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(channel_mult, attention levels)`` of a ``UNet2DConditionModel`` (``UNet2DModel``
    without ``attention``) config."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    known = {_DOWN: _UP, _ATTN_DOWN: _ATTN_UP} if attention else {_DOWN: _UP}
    for block in down:
        if block not in known:
            raise ValueError(f"{where}: down block {block!r}; only {list(known)} convert")
    if up != [known[block] for block in reversed(down)]:
        raise ValueError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    channels = list(config["block_out_channels"])
    if len(channels) != len(down) or any(c % channels[0] for c in channels):
        raise ValueError(f"{where}: block_out_channels {channels} are not multiples of the first")
    attention = tuple(level for level, block in enumerate(down) if block == _ATTN_DOWN)
    return tuple(c // channels[0] for c in channels), attention


def decoder_from_diffusers(
    unet_state_dict: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    text_proj_state_dict: Mapping[str, Any],
    text_proj_config: Mapping[str, Any],
    *,
    text_len: int = CLIP_TEXT_LEN,
) -> tuple[DecoderConfig, dict]:
    """A ``UNet2DConditionModel`` and an ``UnCLIPTextProjModel`` (state dicts and ``config.json``
    contents) -> ``(DecoderConfig, {"params": ...})`` for ``Decoder``, float32.

    ``text_len``: the CLIP caption's tokens (no weight depends on it)."""
    _check(unet_config, _UNET_FIXED, "decoder config.json")
    channel_mult, attention_levels = _unet_levels(unet_config, "decoder config.json")
    layers, head_dim = unet_config["layers_per_block"], unet_config["attention_head_dim"]
    for key, value in (("layers_per_block", layers), ("attention_head_dim", head_dim)):
        if not isinstance(value, int):
            raise ValueError(f"decoder config.json: {key}={value!r}; only one int converts")
    model_channels, size = unet_config["block_out_channels"][0], unet_config["sample_size"]
    in_channels, out_channels = unet_config["in_channels"], unet_config["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"decoder config.json: out_channels {out_channels} is neither in_channels "
            f"{in_channels} (fixed variances) nor twice it (learned)"
        )
    context_width = unet_config["cross_attention_dim"]
    time_dim = 4 * model_channels
    expected = {"time_embed_dim": time_dim, "cross_attention_dim": context_width}
    _check(text_proj_config, expected, "text_proj config.json")
    clip_dim = text_proj_config.get("clip_embeddings_dim", 768)
    decoder = DecoderConfig.from_name("karlo-decoder").replace(
        image_size=size,
        in_channels=in_channels,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=layers,
        attention_resolutions=tuple(size // 2**level for level in attention_levels),
        head_channels=head_dim,
        groups=unet_config.get("norm_num_groups", 32),
        dropout_rate=unet_config.get("dropout", 0.0),
        clip_dim=clip_dim,
        clip_tokens=text_proj_config.get("clip_extra_context_tokens", 4),
        context_width=context_width,
        text_len=text_len,
        clip_text_width=clip_dim,
        variance="learned_range" if out_channels == 2 * in_channels else "fixed_small",
        dtype="float32",
        scan_layers=False,
        remat_policy="none",
        unet_remat_policy="none",
    )

    proj = _StateDict(text_proj_state_dict, "text_proj")
    tokens = proj.linear("clip_extra_context_tokens_proj")  # columns (channel, token)
    n = decoder.clip_tokens

    def token_major(a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:-1], context_width, n).swapaxes(-1, -2).reshape(a.shape)

    params = {
        "null_image_embedding": proj.pop("learned_classifier_free_guidance_embeddings"),
        "clip_to_time": proj.linear("clip_image_embeddings_project_to_time_embeddings"),
        "clip_to_tokens": {k: token_major(v) for k, v in tokens.items()},
        "text_to_time": proj.linear("embedding_proj"),
        "text_proj": proj.linear("encoder_hidden_states_proj"),
        "text_norm": proj.norm("text_encoder_hidden_states_norm"),
    }
    proj.done()

    sd = _StateDict(unet_state_dict, "decoder")
    params["time_fc"] = sd.linear("time_embedding.linear_1")
    params["time_proj"] = sd.linear("time_embedding.linear_2")
    params["unet"] = _unet_params(sd, channel_mult, layers, attention_levels, head_dim)
    sd.done()
    return decoder, {"params": _contiguous(params)}


def super_res_from_diffusers(
    state_dict: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[UpsamplerConfig, dict]:
    """A Karlo upsampler's ``UNet2DModel`` state dict and ``config.json`` -> ``(UpsamplerConfig,
    {"params": ...})`` for ``Upsampler``, float32, upsampling 4x as Karlo's pipeline does."""
    where = "super-res config.json"
    _check(config, _SUPER_RES_FIXED, where)
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"{where}: resnet_time_scale_shift={shift!r}; 'default' or 'scale_shift'")
    channel_mult, _ = _unet_levels(config, where, attention=False)
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    image_channels = in_channels // 2  # the noised image and the resized low-res one
    if in_channels % 2 or out_channels not in (image_channels, 2 * image_channels):
        raise ValueError(
            f"{where}: in_channels {in_channels}, out_channels {out_channels}: an upsampler "
            "reads the noised and the low-res image (2c channels) and predicts c or 2c"
        )
    layers, model_channels = config["layers_per_block"], config["block_out_channels"][0]
    image_size = config.get("sample_size") or SUPER_RES_SIZE
    upsampler = UpsamplerConfig(
        image_size=image_size,
        low_res_size=image_size // SUPER_RES_FACTOR,
        in_channels=image_channels,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=layers,
        groups=config.get("norm_num_groups", 32),
        scale_shift=shift == "scale_shift",
        middle_attention=False,
        dropout_rate=config.get("dropout", 0.0),
        variance="learned_range" if out_channels == in_channels else "fixed_small",
    )
    sd = _StateDict(state_dict, "super-res")
    params = {
        "time_fc": sd.linear("time_embedding.linear_1"),
        "time_proj": sd.linear("time_embedding.linear_2"),
        "unet": _unet_params(sd, channel_mult, layers, (), head_dim=None),
    }
    sd.done()
    return upsampler, {"params": _contiguous(params)}


def _unet_params(
    sd: _StateDict,
    channel_mult: tuple[int, ...],
    layers: int,
    attention_levels: tuple[int, ...],
    head_dim: int | None,
) -> dict:
    """The UNet trunk's parameters (:class:`jaxaigc.nn.unet.UNet`) from diffusers' down / mid /
    up blocks; a middle attention block when ``head_dim`` is given."""

    def resnet(prefix: str) -> dict:
        out = {
            "in_norm": sd.norm(f"{prefix}.norm1"),
            "in_conv": sd.conv(f"{prefix}.conv1"),
            "emb_proj": sd.linear(f"{prefix}.time_emb_proj"),
            "out_norm": sd.norm(f"{prefix}.norm2"),
            "out_conv": sd.conv(f"{prefix}.conv2"),
        }
        if f"{prefix}.conv_shortcut.weight" in sd.sd:
            out["skip"] = sd.conv(f"{prefix}.conv_shortcut")
        return out

    def attention(prefix: str) -> dict:
        return {
            "norm": sd.norm(f"{prefix}.group_norm"),
            "query": sd.heads_in(f"{prefix}.to_q", head_dim),
            "key": sd.heads_in(f"{prefix}.to_k", head_dim),
            "value": sd.heads_in(f"{prefix}.to_v", head_dim),
            "context_key": sd.heads_in(f"{prefix}.add_k_proj", head_dim),
            "context_value": sd.heads_in(f"{prefix}.add_v_proj", head_dim),
            "out": sd.heads_out(f"{prefix}.to_out.0", head_dim),
        }

    unet = {"in_conv": sd.conv("conv_in")}
    levels = len(channel_mult)
    for level in range(levels):
        p = f"down_blocks.{level}"
        for i in range(layers):
            unet[f"down_{level}_{i}"] = resnet(f"{p}.resnets.{i}")
            if level in attention_levels:
                unet[f"down_{level}_{i}_attn"] = attention(f"{p}.attentions.{i}")
        if level < levels - 1:
            unet[f"down_{level}_resample"] = resnet(f"{p}.downsamplers.0")
    unet["middle_0"] = resnet("mid_block.resnets.0")
    if head_dim is not None:
        unet["middle_attn"] = attention("mid_block.attentions.0")
    unet["middle_1"] = resnet("mid_block.resnets.1")
    for level in range(levels):
        p = f"up_blocks.{levels - 1 - level}"
        for i in range(layers + 1):
            unet[f"up_{level}_{i}"] = resnet(f"{p}.resnets.{i}")
            if level in attention_levels:
                unet[f"up_{level}_{i}_attn"] = attention(f"{p}.attentions.{i}")
        if level > 0:
            unet[f"up_{level}_resample"] = resnet(f"{p}.upsamplers.0")
    unet["out_norm"] = sd.norm("conv_norm_out")
    unet["out_conv"] = sd.conv("conv_out")
    return unet


def read_component(folder: Path) -> tuple[dict, Mapping[str, Any]]:
    """``(config.json, state dict)`` of a diffusers component folder."""
    from jaxaigc.convert.checkpoints import _read_state_dict  # it imports this module

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it a diffusers component folder?")
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")
    return json.loads(config_file.read_text()), _read_state_dict(weights[0])


def component_class(folder: Path) -> str | None:
    """The ``_class_name`` of a folder's ``config.json`` (None without one)."""
    config_file = folder / "config.json"
    return json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None


def load_karlo(src: str | Path) -> dict[str, tuple[Any, dict]]:
    """``{stage: (config, variables)}`` from ``src``: an ``UnCLIPPipeline`` folder (stages
    ``prior``, ``decoder`` from ``decoder/`` with ``text_proj/``, and ``super_res_first``,
    ``super_res_last`` when present), or one component folder: ``prior/``, ``decoder/`` (with
    ``text_proj/`` beside it) or an upsampler's (the stage named after the folder)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder: give an UnCLIPPipeline folder")
    if (src / "prior").is_dir() or (src / "decoder").is_dir():
        parts = {"prior": src / "prior", "decoder": src / "decoder"}
        missing = [str(p) for p in parts.values() if not p.is_dir()]
        if missing:
            raise FileNotFoundError(f"{src} is not a whole UnCLIPPipeline folder: no {missing}")
        parts.update({stage: src / stage for stage in SUPER_RES_STAGES if (src / stage).is_dir()})
    else:
        kinds = {"PriorTransformer": "prior", "UNet2DConditionModel": "decoder"}
        name = component_class(src)
        if name == "UNet2DModel":
            parts = {src.name if src.name in SUPER_RES_STAGES else "super_res": src}
        elif name in kinds:
            parts = {kinds[name]: src}
        else:
            raise ValueError(
                f"{src / 'config.json'} names class {name!r}; convert an UnCLIPPipeline folder, a "
                "PriorTransformer's, a UNet2DConditionModel's (with text_proj/ beside it) or a "
                "UNet2DModel's"
            )
    out = {}
    for stage, folder in parts.items():
        if stage == "decoder":
            text_proj = folder.parent / "text_proj"
            if not text_proj.is_dir():
                raise FileNotFoundError(
                    f"the decoder needs its UnCLIPTextProjModel: no {text_proj} beside {folder}"
                )
            unet_config, unet_sd = read_component(folder)
            proj_config, proj_sd = read_component(text_proj)
            out[stage] = decoder_from_diffusers(unet_sd, unet_config, proj_sd, proj_config)
        else:
            config, state_dict = read_component(folder)
            convert = prior_from_diffusers if stage == "prior" else super_res_from_diffusers
            out[stage] = convert(state_dict, config)
    return out
