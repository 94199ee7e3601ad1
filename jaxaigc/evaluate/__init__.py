"""Evaluation outputs a person reads: image grids and run reports."""
