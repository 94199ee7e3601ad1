"""The grid writer: exact pixel placement, captions drawn, mismatched counts rejected."""

import numpy as np
import pytest
from PIL import Image

from jaxaigc.evaluate.grids import write_grid

_BACKGROUND = (64, 64, 64)


def _solid(colour, side=2, dtype=np.uint8):
    return np.broadcast_to(np.asarray(colour, dtype), (side, side, 3))


def test_pixels_land_in_their_cells(tmp_path):
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (9, 9, 9)]]
    rows = [[_solid(c) for c in row] for row in colours]
    scale, pad, side = 2, 4, 4
    grid = np.asarray(Image.open(write_grid(tmp_path / "g.png", rows, scale=scale, pad=pad)))
    assert grid.shape == (pad + 2 * (side + pad), pad + 3 * (side + pad), 3)
    covered = np.zeros(grid.shape[:2], bool)
    for i, row in enumerate(colours):
        for j, colour in enumerate(row):
            y, x = pad + i * (side + pad), pad + j * (side + pad)
            np.testing.assert_array_equal(grid[y : y + side, x : x + side], _solid(colour, side))
            covered[y : y + side, x : x + side] = True
    assert (grid[~covered] == _BACKGROUND).all()


def test_nearest_upscaling_and_image_formats(tmp_path):
    checker = np.array([[0.0, 1.0], [1.0, 0.0]])  # float [0, 1], grey [h, w]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    grid = np.asarray(Image.open(write_grid(tmp_path / "g.png", [[checker, rgba]], scale=3, pad=0)))
    np.testing.assert_array_equal(grid[:3, :3], 0)
    np.testing.assert_array_equal(grid[:3, 3:6], 255)
    np.testing.assert_array_equal(grid[3:6, :3], 255)
    np.testing.assert_array_equal(grid[:, 6:], np.broadcast_to((200, 0, 0), (6, 6, 3)))


def test_rows_of_different_lengths_from_an_array(tmp_path):
    array = np.stack([np.stack([_solid((k, k, k)) for k in (10, 20)])] * 3)  # [3, 2, 2, 2, 3]
    grid = np.asarray(Image.open(write_grid(tmp_path / "a.png", array, pad=1)))
    assert grid.shape == (1 + 3 * 3, 1 + 2 * 3, 3)
    ragged = np.asarray(Image.open(write_grid(tmp_path / "r.png", [[_solid(5)] * 3, [_solid(6)]])))
    assert (ragged[4 + 2 + 4 :, 4 + 2 + 4 :] == _BACKGROUND).all()  # nothing right of row 2's one


def test_captions_are_drawn_above_their_row(tmp_path):
    black = np.zeros((8, 8, 3), np.uint8)
    path = write_grid(tmp_path / "c.png", [[black], [black]], captions=["a red circle", "two"])
    grid = np.asarray(Image.open(path))
    tops = [y for y in range(1, grid.shape[0]) if (grid[y, 4] == 0).all() and grid[y - 1, 4].any()]
    assert len(tops) == 2 and tops[0] > 4
    for top, band in zip(tops, (grid[4 : tops[0]], grid[tops[0] + 8 : tops[1]]), strict=True):
        np.testing.assert_array_equal(grid[top : top + 8, 4:12], black)
        assert (band > 200).all(-1).any(), "no white caption text above the row"


def test_titles_and_cell_captions_are_drawn(tmp_path):
    rows = [[_solid(0, 8)] * 2, [_solid(0, 8)]]
    plain = np.asarray(Image.open(write_grid(tmp_path / "p.png", rows)))
    path = write_grid(
        tmp_path / "c.png",
        rows,
        column_titles=["original", "reconstruction"],
        cell_captions=[["left", "right"], ["alone"]],
    )
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == plain.shape[1] and grid.shape[0] > plain.shape[0]
    assert (grid > 200).all(-1).sum() > 0 == (plain > 200).all(-1).sum()


def test_a_long_word_stays_in_its_column(tmp_path):
    rows = [[_solid(0, 16)] * 2]
    path = write_grid(tmp_path / "t.png", rows, column_titles=["reconstructionreconstruction", ""])
    grid = np.asarray(Image.open(path))
    top = next(y for y in range(4, grid.shape[0]) if (grid[y, 4] == 0).all())
    assert top > 4 + 12  # the word was broken over lines
    assert (grid[:top, 4 + 16 + 4 :] == _BACKGROUND).all()  # nothing drawn over column 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(captions=["one", "two", "three"]), "3 captions for 2 rows"),
        (dict(column_titles=["a"]), "1 column titles for 2 columns"),
        (dict(cell_captions=[["a"], ["b"]]), "[1, 1] differ from images per row [2, 1]"),
        (dict(scale=0), "scale=0"),
    ],
)
def test_mismatches_name_the_numbers(tmp_path, kwargs, message):
    rows = [[_solid(0)] * 2, [_solid(0)]]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_grid(tmp_path / "x.png", rows, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        write_grid(tmp_path / "x.png", [[np.zeros((2, 2, 2))]])
