"""Converters between reference PyTorch checkpoints and jaxaigc variables."""
