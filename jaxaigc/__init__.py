"""jaxaigc: CLIP, DALL-E, DALL-E 2 and InstructGPT in JAX/Flax."""

__version__ = "0.1.0"
