"""Sampling from the generative models: autoregressive decoding with a KV cache (``decode``) and
the diffusion samplers (``diffusion``)."""
