"""Embedded data, tokenizers and grain input pipelines."""
