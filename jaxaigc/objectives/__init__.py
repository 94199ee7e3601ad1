"""Objectives: pure ``loss(params, batch, rng) -> (loss, metrics)`` functions and their terms."""
