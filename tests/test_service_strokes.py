"""QuickDraw strokes -> a pen drawing: fitted, centred, round-capped, and refused when malformed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.strokes import CANVAS, MARGIN, MAX_POINTS, StrokesError, render_strokes, validate_strokes


def ink(img) -> np.ndarray:
    return np.asarray(img.convert("L")) < 128


def ink_box(img) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(ink(img))
    return xs.min(), xs.max(), ys.min(), ys.max()


def test_renders_black_lines_on_white_canvas():
    img = render_strokes([[[0, 255], [0, 255]]])
    assert img.mode == "RGB" and img.size == (CANVAS, CANVAS)
    arr = np.asarray(img)
    assert arr[0, -1].tolist() == [255, 255, 255]  # a corner away from the diagonal stays white
    assert arr.min() == 0  # the line is black, not grey
    assert 0.005 < ink(img).mean() < 0.05  # a line, not a filled area


def test_drawing_is_fitted_and_centred_with_margin_whatever_its_units():
    # a 2:1 box in unit coordinates, then the same box x1000
    small = render_strokes([[[0.1, 0.3, 0.3, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3, 0.2]]])
    large = render_strokes([[[100, 300, 300, 100, 100], [200, 200, 300, 300, 200]]])
    assert (ink(small) != ink(large)).mean() < 0.002
    x0, x1, y0, y1 = ink_box(large)
    margin = MARGIN * CANVAS
    assert x0 >= margin - 3 and x1 <= CANVAS - margin + 3  # the long side spans the usable canvas
    assert x1 - x0 > CANVAS * (1 - 2 * MARGIN) - 4
    assert abs((x0 + x1) / 2 - CANVAS / 2) < 2 and abs((y0 + y1) / 2 - CANVAS / 2) < 2
    assert abs((y1 - y0) * 2 - (x1 - x0)) < 8  # aspect ratio kept


def test_one_point_stroke_is_a_round_dot_and_caps_are_round():
    img = render_strokes([[[5], [5]]])
    x0, x1, y0, y1 = ink_box(img)
    assert 1 <= x1 - x0 <= 6 and 1 <= y1 - y0 <= 6
    line = render_strokes([[[0, 100], [50, 50]]])
    x0, x1, _, _ = ink_box(line)
    # round caps extend the line by about half the pen width past its end points
    assert x0 < MARGIN * CANVAS and x1 > CANVAS - MARGIN * CANVAS


def test_raw_format_with_times_is_accepted():
    with_times = render_strokes([[[0, 10, 20], [0, 10, 0], [0, 5, 9]]])
    without = render_strokes([[[0, 10, 20], [0, 10, 0]]])
    assert (np.asarray(with_times) == np.asarray(without)).all()


@pytest.mark.parametrize(
    "strokes, words",
    [
        ([], "empty"),
        ("abc", "list of strokes"),
        ([[[1, 2]]], "stroke 0 must be"),
        ([[[1, 2], [3]]], "2 x values but 1 y values"),
        ([[[], []]], "no points"),
        ([[[1, math.nan], [1, 2]]], "finite"),
        ([[[1, math.inf], [1, 2]]], "finite"),
        ([[[1, "2"], [1, 2]]], "finite"),
        ([[[1, True], [1, 2]]], "finite"),
        ([[[1, 2e9], [1, 2]]], "beyond"),
        ([[[0, 1], [0, 1]], "x"], "stroke 1"),
        ([[list(range(MAX_POINTS + 1)), list(range(MAX_POINTS + 1))]], "points in all"),
    ],
)
def test_malformed_strokes_are_refused_with_a_reason(strokes, words):
    with pytest.raises(StrokesError, match=words):
        validate_strokes(strokes)
