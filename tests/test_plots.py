"""Comparison grid and loss chart (fluxtrain.plots)."""

import math

import numpy as np
import pytest
from PIL import Image

from fluxtrain.plots import (BACKGROUND, COLORS, GAP, PlotError, comparison_grid, loss_chart,
                             nice_ticks, smooth, wrap, font)

RED, BLUE = (200, 30, 30), (30, 30, 200)


def cells(rows=2, size=(64, 48)):
    return [[Image.new("RGB", size, RED), Image.new("RGB", size, BLUE)] for _ in range(rows)]


def ink(region):
    """Pixels that are neither background nor a cell colour: drawn text."""
    a = np.asarray(region).reshape(-1, 3)
    plain = (a == BACKGROUND).all(1) | (a == RED).all(1) | (a == BLUE).all(1)
    return int((~plain).sum())


def locate(grid, color):
    """Bounding boxes (left, top, right, bottom) of a colour's pixels, per row of cells."""
    ys, xs = np.nonzero((np.asarray(grid) == color).all(-1))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_grid_size_and_placement():
    grid = comparison_grid(cells(), ["A", "B"], ["first", "second"], title="seed 1")
    left, top, right, bottom = locate(grid, RED)
    assert right - left == 64  # one column of red cells
    assert bottom - top == 2 * 48 + GAP  # two rows with a gap
    b_left, b_top, b_right, _ = locate(grid, BLUE)
    assert b_left == right + GAP and b_top == top and b_right == grid.width
    assert grid.height == bottom  # the last row ends the image


def test_grid_labels_are_drawn_in_their_strips():
    labels = comparison_grid(cells(), ["Dev2Pro", "dev"], ["a dog", "a cat"], title="seed 7")
    blank = comparison_grid(cells(), ["", ""], ["", ""])
    left, top, _, _ = locate(labels, RED)
    a = np.asarray(labels)
    assert ink(a[:top, left:left + 64]) > 20            # column label A above column A
    assert ink(a[:top, left + 64 + GAP:]) > 20          # column label B above column B
    assert ink(a[top:top + 48, :left]) > 20              # row label 1 left of row 1
    assert ink(a[top + 48 + GAP:, :left]) > 20           # row label 2 left of row 2
    assert ink(a[:top // 3, :]) > 10                     # the title on top
    assert ink(blank) == 0 and locate(blank, RED)[0] == 0  # no labels: no strips on the left


def test_grid_centers_smaller_images_and_checks_shapes():
    rows = [[Image.new("RGB", (64, 64), RED), Image.new("RGB", (32, 32), BLUE)]]
    grid = comparison_grid(rows, ["a", "b"], [""])
    left, top, _, _ = locate(grid, BLUE)
    red_left, red_top, red_right, _ = locate(grid, RED)
    assert (left - red_right - GAP, top - red_top) == (16, 16)
    with pytest.raises(PlotError, match="column labels"):
        comparison_grid(rows, ["only one"], [""])
    with pytest.raises(PlotError, match="row labels"):
        comparison_grid(rows, ["a", "b"], [])
    with pytest.raises(PlotError, match="at least one"):
        comparison_grid([], [], [])


def test_long_labels_wrap_to_the_cell_width():
    f = font(16)
    lines = wrap("a photo of a dog running on the beach at sunset, supercalifragilisticexpialidocious", f, 80)
    assert len(lines) > 3 and all(f.getlength(line) <= 80 for line in lines)
    assert "".join(lines).replace(" ", "") == "aphotoofadogrunningonthebeachatsunset,supercalifragilisticexpialidocious"


def colour_pixels(image, color):
    a = np.asarray(image)
    return np.nonzero((a == color).all(-1))


def test_loss_chart_draws_each_curve_in_its_colour_where_its_values_are():
    low = [0.2 + 0.01 * math.sin(n) for n in range(100)]
    high = [0.8 + 0.01 * math.cos(n) for n in range(60)]
    chart = loss_chart({"dev2pro": low, "dev": high}, title="A vs B")
    assert chart.size == (960, 540) and chart.mode == "RGB"
    ys_a, xs_a = colour_pixels(chart, COLORS[0])
    ys_b, xs_b = colour_pixels(chart, COLORS[1])
    assert len(ys_a) > 500 and len(ys_b) > 300             # bold lines, not just legend swatches
    assert np.median(ys_a) > np.median(ys_b) + 200         # the low loss is drawn lower
    assert xs_a.max() > xs_b.max() + 150 and xs_a.max() > 0.95 * chart.width  # longer run reaches further


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([1.0, 0.0], 0.5)
    assert s == pytest.approx([1.0, 0.5 * 0.5 / 0.75])
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.13, 0.97, count=10) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert nice_ticks(0.13, 0.97, count=5) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert nice_ticks(1, 300, count=10) == pytest.approx([50 * n for n in range(1, 7)])


def test_single_step_and_flat_curves_draw():
    chart = loss_chart({"one": [0.5]})
    assert len(colour_pixels(chart, COLORS[0])[0]) > 20
    flat = loss_chart({"flat": [0.3] * 10})
    ys, _ = colour_pixels(flat, COLORS[0])
    level = np.median(ys)                    # a flat loss: one level line across the middle
    assert (abs(ys - level) <= 2).mean() > 0.9 and abs(level - flat.height / 2) < 40


@pytest.mark.parametrize("curves, message", [
    ({}, "no curves"),
    ({"a": []}, "'a' has no values"),
    ({"a": [0.5, float("nan"), 0.4]}, r"'a' has a non-finite loss \(nan\) at step 2"),
    ({"a": [0.5], "b": [float("inf")]}, "'b'.*step 1"),
])
def test_bad_curves_are_clear_errors(curves, message):
    with pytest.raises(PlotError, match=message):
        loss_chart(curves)


def test_smoothing_out_of_range_is_an_error():
    with pytest.raises(PlotError, match="smoothing"):
        loss_chart({"a": [1.0]}, smoothing=1.0)


def test_small_images_are_enlarged_by_a_whole_factor_for_readable_labels():
    grid = comparison_grid(cells(rows=1, size=(64, 48)), ["Dev2Pro LoRA", "dev LoRA"], ["a dog"],
                           min_cell=256)
    left, top, right, bottom = locate(grid, RED)
    assert (right - left, bottom - top) == (256, 192)   # 4x, aspect kept
