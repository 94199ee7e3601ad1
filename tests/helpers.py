"""Small comparisons and the command runner shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jaxaigc import parallel

ROOT = Path(__file__).resolve().parents[1]


def jaxaigc(*args, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    """The command as a user runs it: one CPU device, as ``make demo``."""
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "jaxaigc", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )  # fmt: skip


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


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


def assert_logical_axes(boxed_params) -> None:
    """Every leaf is an ``nn.Partitioned`` with one known logical name per dimension."""
    known = {logical for logical, _ in parallel.DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


def per_device_fraction(boxed, mesh, rules) -> float:
    """The share of all parameter elements each device holds under the logical rules."""
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    per_device = sum(
        np.prod(s.shard_shape(x.shape))
        for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
    )
    return per_device / sum(x.size for x in leaves)


def assert_one_step_matches_one_device(train_state, mesh_1, mesh_2x2x2) -> None:
    """One jitted train step on the 2x2x2 mesh equals one device (loss and parameters to 1e-5).

    ``train_state(mesh, rules) -> (state, step, batch)`` builds the run on a mesh."""
    rules = parallel.make_rules()
    params, losses = [], []
    for mesh in (mesh_1, mesh_2x2x2):
        state, step, batch = train_state(mesh, rules)
        state, metrics = step(state, batch)
        params.append(jax.device_get(state.params))
        losses.append(float(metrics["train/loss"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert max_relative_difference(params[1], params[0]) < 1e-5


def tiny_gpt2_bpe(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts`` with GPT-2's EOS, as a converted GPT-2 holds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe
