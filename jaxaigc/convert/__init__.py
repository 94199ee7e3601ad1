"""Converters between reference PyTorch checkpoints and jaxaigc variables."""

from jaxaigc.convert.clip import clip_from_torch, clip_to_torch, load_clip
from jaxaigc.convert.dvae import dvae_from_torch, dvae_to_torch, load_dvae_pickle
from jaxaigc.convert.gpt2 import gpt2_from_torch

__all__ = [
    "clip_from_torch",
    "clip_to_torch",
    "dvae_from_torch",
    "dvae_to_torch",
    "gpt2_from_torch",
    "load_clip",
    "load_dvae_pickle",
]
