"""Pictures for people: a labelled comparison grid and a loss chart (Pillow only).

    comparison_grid([[a1, b1], [a2, b2]], ["LoRA on Dev2Pro", "LoRA on dev"],
                    ["prompt 1", "prompt 2"], title="seed 42, strength 1.0")
    loss_chart({"dev2pro": losses_a, "dev": losses_b}, smoothing=0.9)
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)
GAP = 4  # pixels between grid cells
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


class PlotError(ValueError):
    """Inputs that cannot be drawn. The message says what to do."""


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (a fixed small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(f) -> int:
    left, top, right, bottom = f.getbbox("Ag|")
    return bottom + max(2, bottom // 4)


def wrap(text: str, f, width: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels (words longer than that are cut)."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if f.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and f.getlength(word) > width:
                cut = 1
                while cut < len(word) and f.getlength(word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _draw_lines(draw, lines, f, box, align="center"):
    """Lines inside box (left, top, right, bottom), top-aligned; lines that do not fit
    are dropped and the last shown line ends with an ellipsis."""
    left, top, right, bottom = box
    step = _line_height(f)
    fit = max(1, (bottom - top) // step)
    if len(lines) > fit:
        lines = lines[:fit - 1] + [lines[fit - 1].rstrip() + " …"]
    for n, line in enumerate(lines):
        x = left if align == "left" else left + (right - left - f.getlength(line)) / 2
        draw.text((x, top + n * step), line, fill=INK, font=f)


# --------------------------------------------------------------------------- grid

def comparison_grid(rows: list[list[Image.Image]], column_labels: list[str], row_labels: list[str],
                    title: str = "", min_cell: int = 0) -> Image.Image:
    """A grid of images with a label above each column and left of each row. Every cell
    is as large as the largest image (smaller ones are centered), with a GAP-pixel
    white gap between cells. Cells narrower than `min_cell` are enlarged by a whole
    factor (nearest neighbour, so pixels stay exact) to leave room for the labels."""
    if not rows or not all(rows):
        raise PlotError("comparison_grid needs at least one row of at least one image")
    columns = len(column_labels)
    if any(len(r) != columns for r in rows):
        raise PlotError(f"rows hold {[len(r) for r in rows]} images but there are {columns} column "
                        "labels; give one label per column and one image per column in every row")
    if len(row_labels) != len(rows):
        raise PlotError(f"{len(rows)} rows but {len(row_labels)} row labels; give one label per row")

    cell_w = max(im.width for r in rows for im in r)
    if cell_w < min_cell:
        factor = -(-min_cell // cell_w)
        rows = [[im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in r]
                for r in rows]
        cell_w *= factor
    cell_h = max(im.height for r in rows for im in r)
    f = font(max(14, min(32, cell_w // 20)))
    line = _line_height(f)
    pad = max(4, line // 3)
    label_w = 0
    if any(label.strip() for label in row_labels):
        natural = max(f.getlength(w) for label in row_labels for w in (label.split() or [""]))
        label_w = int(min(max(natural, cell_w * 0.4), cell_w * 0.75)) + 2 * pad

    col_lines = [wrap(label, f, cell_w - 2 * pad) for label in column_labels]
    head_h = max(len(lines) for lines in col_lines) * line + 2 * pad
    width = label_w + columns * (cell_w + GAP) - GAP
    title_lines = wrap(title, f, width - 2 * pad) if title.strip() else []
    title_h = len(title_lines) * line + 2 * pad if title_lines else 0

    grid = Image.new("RGB", (width, title_h + head_h + len(rows) * (cell_h + GAP) - GAP), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_lines:
        _draw_lines(draw, title_lines, f, (pad, pad, width - pad, title_h))
    for c, lines in enumerate(col_lines):
        left = label_w + c * (cell_w + GAP)
        _draw_lines(draw, lines, f, (left + pad, title_h + pad, left + cell_w - pad, title_h + head_h))
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = title_h + head_h + r * (cell_h + GAP)
        if label_w:
            _draw_lines(draw, wrap(label, f, label_w - 2 * pad), f,
                        (pad, top + pad, label_w - pad, top + cell_h - pad), align="left")
        for c, image in enumerate(row):
            x = label_w + c * (cell_w + GAP) + (cell_w - image.width) // 2
            grid.paste(image.convert("RGB"), (x, top + (cell_h - image.height) // 2))
    return grid


# --------------------------------------------------------------------------- loss chart

def smooth(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing):
    the first values are not pulled toward zero."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing ** n))
    return out


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values inside [low, high], about `count` of them, 1, 2 or 5 x 10^k apart."""
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + n * step, 12) for n in range(int((high - first) / step + 1e-9) + 1)]


def _check_curves(curves: dict[str, list[float]], smoothing: float) -> None:
    if not curves:
        raise PlotError("loss_chart got no curves; give {run name: [loss per step]}")
    if not 0 <= smoothing < 1:
        raise PlotError(f"smoothing must be in [0, 1) (0 = none, 0.9 = usual), got {smoothing}")
    for name, values in curves.items():
        if len(values) == 0:
            raise PlotError(f"curve {name!r} has no values; did its training run any step?")
        bad = next((n for n, v in enumerate(values) if not math.isfinite(float(v))), None)
        if bad is not None:
            raise PlotError(f"curve {name!r} has a non-finite loss ({values[bad]}) at step {bad + 1}; "
                            "the run diverged there: plot the steps before it, or lower the "
                            "learning rate and train again")


def loss_chart(curves: dict[str, list[float]], smoothing: float = 0.9, title: str = "",
               size: tuple[int, int] = (960, 540)) -> Image.Image:
    """Each curve's raw loss (faint) and its smoothed loss (bold) against the step,
    on shared axes with ticks and a legend."""
    _check_curves(curves, smoothing)
    width, height = size
    f, small = font(max(12, height // 30)), font(max(11, height // 40))
    line = _line_height(f)
    all_values = [float(v) for values in curves.values() for v in values]
    low, high = min(all_values), max(all_values)
    margin = (high - low) * 0.05 or max(abs(high) * 0.1, 1e-3)
    low, high = low - margin, high + margin
    steps = max(len(v) for v in curves.values())
    y_ticks = nice_ticks(low, high, count=10)
    x_ticks = [t for t in nice_ticks(1, max(2, steps), count=10) if t == int(t)]

    tick_labels = [_format(t) for t in y_ticks]
    left = int(max(small.getlength(t) for t in tick_labels)) + line + 16
    top = (line * 2 if title.strip() else line) + 8
    right, bottom = width - 20, height - 2 * line - 12
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)

    def x_of(step):
        return left + (step - 1) / max(1, steps - 1) * (right - left)

    def y_of(value):
        return bottom - (value - low) / (high - low) * (bottom - top)

    for t, text in zip(y_ticks, tick_labels):
        y = y_of(t)
        if top <= y <= bottom:
            draw.line([(left, y), (right, y)], fill=GRID)
            draw.text((left - 6 - small.getlength(text), y - line / 2), text, fill=INK, font=small)
    for t in x_ticks:
        x = x_of(t)
        if left <= x <= right:
            draw.line([(x, top), (x, bottom)], fill=GRID)
            text = _format(t)
            draw.text((x - small.getlength(text) / 2, bottom + 6), text, fill=INK, font=small)
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    draw.text(((left + right) / 2 - f.getlength("step") / 2, height - line - 4), "step", fill=INK, font=f)
    draw.text((4, top - line - 4), "loss", fill=INK, font=f)
    if title.strip():
        draw.text(((width - f.getlength(title)) / 2, 6), title, fill=INK, font=f)

    smoothed = {name: smooth(values, smoothing) for name, values in curves.items()}
    for n, (name, values) in enumerate(curves.items()):
        color = COLORS[n % len(COLORS)]
        faint = tuple(int(c + (255 - c) * 0.65) for c in color)
        for series, stroke, col in ((values, 1, faint), (smoothed[name], 3, color)):
            points = [(x_of(s + 1), y_of(float(v))) for s, v in enumerate(series)]
            if len(points) == 1:
                x, y = points[0]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
            else:
                draw.line(points, fill=col, width=stroke, joint="curve")

    labels = [f"{name} (last {_format(series[-1])})" for name, series in smoothed.items()]
    x = right - 16 - 32 - max(f.getlength(label) for label in labels)
    draw.rectangle([x - 8, top + 6, right - 8, top + 14 + len(labels) * (line + 4)],
                   fill=BACKGROUND, outline=GRID)
    for n, label in enumerate(labels):
        y = top + 10 + n * (line + 4)
        draw.line([(x, y + line / 2), (x + 24, y + line / 2)], fill=COLORS[n % len(COLORS)], width=3)
        draw.text((x + 32, y), label, fill=INK, font=f)
    return image


def _format(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4g}"
