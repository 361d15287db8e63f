"""Vector sketches in QuickDraw's simplified format, rendered like a pen drawing on white.

A drawing is a list of strokes, each `[[x0, x1, ...], [y0, y1, ...]]` (a third list of times, as in
QuickDraw's raw format, is accepted and ignored). y grows downwards, as in image coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

CANVAS = 256
MARGIN = 0.08  # of the canvas on each side, so strokes never touch the border
PEN_WIDTH = 0.012  # of the canvas: 3 px at 256, about a QuickDraw / Sketchy pen
SUPERSAMPLE = 4  # draw large, then box-reduce: anti-aliased edges as a scanned pen line has
MAX_STROKES = 1_000
MAX_POINTS = 20_000
MAX_ABS_COORD = 1e6


class StrokesError(ValueError):
    """A stroke list that is not a drawing; the message says which stroke and why."""


def validate_strokes(strokes: object) -> list[list[tuple[float, float]]]:
    """Check shape, counts and numbers; return each stroke as a list of (x, y) points."""
    if not isinstance(strokes, Sequence) or isinstance(strokes, str | bytes):
        raise StrokesError("strokes must be a list of strokes, each [[x...], [y...]]")
    if not strokes:
        raise StrokesError("strokes is empty: draw something")
    if len(strokes) > MAX_STROKES:
        raise StrokesError(f"{len(strokes)} strokes; at most {MAX_STROKES} are accepted")
    out: list[list[tuple[float, float]]] = []
    total = 0
    for i, stroke in enumerate(strokes):
        if not isinstance(stroke, Sequence) or isinstance(stroke, str | bytes) or len(stroke) not in (2, 3):
            raise StrokesError(f"stroke {i} must be [[x...], [y...]] (optionally a third list of times)")
        xs, ys = stroke[0], stroke[1]
        if not all(isinstance(v, Sequence) and not isinstance(v, str | bytes) for v in (xs, ys)):
            raise StrokesError(f"stroke {i}: x and y must be lists of numbers")
        if len(xs) != len(ys):
            raise StrokesError(f"stroke {i} has {len(xs)} x values but {len(ys)} y values")
        if not xs:
            raise StrokesError(f"stroke {i} has no points")
        total += len(xs)
        if total > MAX_POINTS:
            raise StrokesError(f"more than {MAX_POINTS} points in all")
        points = []
        for x, y in zip(xs, ys, strict=True):
            if not _is_number(x) or not _is_number(y):
                raise StrokesError(f"stroke {i}: coordinates must be finite numbers, got {x!r}, {y!r}")
            if abs(x) > MAX_ABS_COORD or abs(y) > MAX_ABS_COORD:
                raise StrokesError(f"stroke {i}: coordinate beyond +-{MAX_ABS_COORD:g}")
            points.append((float(x), float(y)))
        out.append(points)
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def render_strokes(strokes: object, canvas: int = CANVAS) -> Image.Image:
    """Draw strokes as black round-capped lines on white, fitted and centred with a margin.

    The aspect ratio is kept; the pen width is relative to the canvas, not to the drawing's units,
    so a drawing sent in 0-255 or in 0-1 coordinates renders the same.
    """
    paths = validate_strokes(strokes)
    xs = [x for path in paths for x, _ in path]
    ys = [y for path in paths for _, y in path]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span = max(x1 - x0, y1 - y0)
    big = canvas * SUPERSAMPLE
    usable = big * (1 - 2 * MARGIN)
    scale = usable / span if span > 0 else 1.0
    # Centre the drawing's bounding box on the canvas.
    ox = big / 2 - (x0 + x1) / 2 * scale
    oy = big / 2 - (y0 + y1) / 2 * scale
    width = max(1, round(canvas * PEN_WIDTH * SUPERSAMPLE))
    radius = width / 2

    img = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(img)
    for path in paths:
        pts = [(x * scale + ox, y * scale + oy) for x, y in path]
        if len(pts) > 1:
            draw.line(pts, fill=0, width=width, joint="curve")
        for px, py in (pts[0], pts[-1]):  # round caps (and a dot for a one-point stroke)
            draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=0)
    return img.reduce(SUPERSAMPLE).convert("RGB")
