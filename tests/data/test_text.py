import numpy as np
import pytest

from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.data.text import TokenWindows, arithmetic_lines, encode_bytes, is_held_out, pack


def operands(lines):
    pairs = [line.split("=")[0].split("+") for line in lines]
    return np.array(pairs, int).T


def test_held_out_sums_never_appear_in_training_lines():
    train = arithmetic_lines(5000, seed=0)
    held_out = arithmetic_lines(300, seed=1, split="held_out")
    assert not is_held_out(*operands(train)).any()
    assert is_held_out(*operands(held_out)).all()
    assert all(
        int(a) + int(b) == int(c)
        for a, b, c in (line.replace("=", "+").split("+") for line in train)
    )
    assert arithmetic_lines(50, seed=3) == arithmetic_lines(50, seed=3)
    with pytest.raises(ValueError, match="unknown split"):
        arithmetic_lines(5, seed=0, split="test")


def test_batch_iterator_resumes_with_the_exact_next_batch():
    windows = TokenWindows(encode_bytes("\n".join(arithmetic_lines(300, seed=0))), 16, name="t")
    first = BatchIterator(windows, global_batch_size=8, seed=4)
    for _ in range(5):
        next(first)
    state = first.get_state()
    expected = [next(first)["tokens"] for _ in range(3)]
    resumed = BatchIterator(windows, global_batch_size=8, seed=4)
    resumed.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], batch)
    other_seed = BatchIterator(windows, global_batch_size=8, seed=5)
    assert not np.array_equal(
        next(other_seed)["tokens"],
        next(BatchIterator(windows, global_batch_size=8, seed=4))["tokens"],
    )


def test_pack_places_every_sequence_once_in_order():
    lengths = np.array([3, 5, 2, 4, 6, 1])
    tokens = np.zeros((6, 6), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = 10 * (i + 1) + np.arange(n)
    packed = pack({"tokens": tokens, "mask": tokens > 0}, lengths, length=8)
    assert packed["tokens"].shape[1] == 8 and len(packed["tokens"]) < len(lengths)
    found = []
    for row, segments in zip(packed["tokens"], packed["segments"], strict=True):
        for s in range(1, segments.max() + 1):
            found.append(row[segments == s].tolist())
        assert (row[segments == 0] == 0).all()  # only pads after the last sequence
        assert (np.diff(segments[segments > 0]) >= 0).all()
    assert sorted(found) == sorted(t[:n].tolist() for t, n in zip(tokens, lengths, strict=True))
    assert packed["mask"].sum() == lengths.sum()
    with pytest.raises(ValueError, match="must be in \\[1, 4\\]"):
        pack({"tokens": tokens}, lengths, length=4)
