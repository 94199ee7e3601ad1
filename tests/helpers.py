"""Small comparisons shared by the tests."""

import jax
import numpy as np


def max_relative_difference(a, b) -> float:
    """Largest per-leaf ||a - b|| / ||b|| over two trees of arrays."""
    diffs = jax.tree.map(
        lambda x, y: float(
            np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
            / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30)
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs))


def assert_trees_equal(a, b) -> None:
    """Bit-identical leaves and the same structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
