"""Sampling from the generative models: autoregressive decoding with a KV cache."""
