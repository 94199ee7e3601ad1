"""Converters between reference PyTorch checkpoints and jaxaigc variables."""

from jaxaigc.convert.clip import clip_from_torch, clip_to_torch, load_clip

__all__ = ["clip_from_torch", "clip_to_torch", "load_clip"]
