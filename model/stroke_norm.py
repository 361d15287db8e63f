"""Stroke normalisation: any dark-on-white drawing redrawn as one-width lines, framed the same way.

Drawings of the same thing differ in pen width (a 3 px pen, OpenMoji's 7 px line art, icon sets
drawn at a twelfth of their size), in filled areas (silhouettes, filled eyes) and in framing. This
maps all of them to one style before the backbone sees them: the ink is cropped to its bounding
box and fitted into the canvas with a margin; thin ink is reduced to its centre line
(skeletonisation) and filled areas to their outlines; then every line is redrawn with one pen
width. Applied to every sketch in training and at query time alike (the checkpoint records it).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

# scikit-image and scipy (about half a second to import) are imported by the functions that use them:
# the service and the index builder load this module with every model, and one trained with the default
# stroke_norm=False never normalises a query.

VERSION = 1  # bump on any change of output: feature caches record it
CANVAS = 256  # the normalised drawing's side, before the backbone's own resize
MARGIN = 0.08  # of the canvas on each side (as the service's stroke renderer)
INK_LEVEL = 170  # grey levels below this are ink
FILL_FACTOR = 1.5  # ink this many times wider than the drawing's typical line is a filled area
MIN_FILL_RADIUS = 6  # at CANVAS px: ink narrower than about 2 x this is always a line
MAX_FILL_RADIUS = 20  # at CANVAS px: ink wider than about 2 x this is always a filled area
PEN_RADIUS = 2  # at CANVAS px: the redrawn line is about 2 x this + 1 wide
BLUR_MARGIN = 6  # px of paper kept round the drawn lines for the blur (its 0.6 px kernel reaches 2)


def normalise_strokes(img: Image.Image, canvas: int = CANVAS) -> Image.Image:
    """The drawing in `img` (dark on white, any size) redrawn on a `canvas` square, RGB.

    A blank image (no ink) is returned as a white canvas.
    """
    from skimage.morphology import skeletonize

    grey = img.convert("L")
    scale = canvas / max(grey.size)
    w, h = max(1, round(grey.width * scale)), max(1, round(grey.height * scale))
    square = Image.new("L", (canvas, canvas), 255)
    # resize the grey levels (not a mask) so that thin lines survive downscaling as grey
    square.paste(grey.resize((w, h), Image.BILINEAR), ((canvas - w) // 2, (canvas - h) // 2))
    centre = centre_lines(np.asarray(square) < INK_LEVEL)
    if not centre.any():
        return Image.new("RGB", (canvas, canvas), (255, 255, 255))
    # Frame by the centre lines (a wide pen must not change the framing), then thin again: the
    # resize can blur a line into two pixels' width.
    ys, xs = np.nonzero(centre)
    crop = centre[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    usable = canvas * (1 - 2 * MARGIN)
    fit = usable / max(crop.shape)
    cw, ch = max(1, round(crop.shape[1] * fit)), max(1, round(crop.shape[0] * fit))
    lines = np.asarray(Image.fromarray(crop * 255).convert("L").resize((cw, ch), Image.BILINEAR)) > 40
    framed = np.zeros((canvas, canvas), bool)
    oy, ox = (canvas - ch) // 2, (canvas - cw) // 2
    framed[oy : oy + ch, ox : ox + cw] = skeletonize(lines)
    return draw_lines(framed)


def centre_lines(ink: np.ndarray) -> np.ndarray:
    """One-pixel lines of a boolean ink mask: the skeleton of its lines, the outline of its fills.

    Computed on the ink's bounding box with a margin, not the whole canvas (a service drawing keeps a
    margin of paper round it): every step's result inside that box is the whole canvas's, and outside
    it there is nothing (the test checks it against the whole-canvas computation)."""
    from scipy import ndimage
    from skimage.morphology import disk, skeletonize

    if not ink.any():
        return ink
    out = np.zeros_like(ink)
    # With one pixel of paper round the ink, each ink pixel's nearest paper pixel lies in the box, and
    # the skeleton's 3 x 3 neighbourhoods see what they see on the canvas.
    box = _ink_box(ink, 1)
    crop = ink[box]
    skeleton = skeletonize(crop)
    # A filled area needs ink at least MIN_FILL_RADIUS from the paper. Most drawings have none: paper
    # within that distance of every ink pixel (a dilation, much cheaper than the distance transform)
    # settles it, and the lines are the skeleton whatever the drawing's line width.
    if not (crop & ~dilate_disk(~crop, math.ceil(MIN_FILL_RADIUS**2) - 1)).any():
        out[box] = skeleton
        return out
    # The drawing's own line width: twice the median distance to the paper along the centre lines.
    depth = ndimage.distance_transform_edt(crop)
    half_width = float(np.median(depth[skeleton]))
    radius = min(MAX_FILL_RADIUS, max(MIN_FILL_RADIUS, FILL_FACTOR * half_width + 1))
    # Filled areas: the opening of the ink by a disk of `radius` (the union of every such disk that
    # fits in the ink), computed with distance transforms instead of a large structuring element.
    centres = depth >= radius
    if not centres.any():  # deep ink, but no filled area at this drawing's own line width: the skeleton
        out[box] = skeleton
        return out
    # The opening reaches `radius` beyond its centres, and its outline and the dilation below one
    # pixel each further: a box that much larger holds all of it.
    # The depth outside the first box is 0 (paper), so the centres there are none: no second transform.
    canvas_centres = np.zeros_like(ink)
    canvas_centres[box] = centres
    box = _ink_box(ink, int(np.ceil(radius)) + 3)
    crop, centres = ink[box], canvas_centres[box]
    filled = ndimage.distance_transform_edt(~centres) <= radius
    outline = filled & ~ndimage.binary_erosion(filled, structure=disk(1))
    lines = skeletonize(crop & ~ndimage.binary_dilation(filled, structure=disk(1)))
    out[box] = lines | outline
    return out


def _ink_box(ink: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of `ink` grown by `pad` pixels on each side, clipped to the array."""
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return (slice(max(0, rows[0] - pad), rows[-1] + pad + 1), slice(max(0, cols[0] - pad), cols[-1] + pad + 1))


def draw_lines(centre: np.ndarray) -> Image.Image:
    """Centre lines drawn with the one pen (PEN_RADIUS), softened a little as a real pen line is.

    Drawn on the lines' bounding box with a margin of paper (BLUR_MARGIN) and pasted on a white
    canvas: the pen and the blur reach less far than the margin, so the pixels are the whole canvas's
    (the test checks it against `ndimage.binary_dilation` with `disk(PEN_RADIUS)` on the canvas)."""
    out = Image.new("L", (centre.shape[1], centre.shape[0]), 255)
    if centre.any():
        box = _ink_box(centre, PEN_RADIUS + BLUR_MARGIN)
        drawn = Image.fromarray(np.where(dilate_disk(centre[box], PEN_RADIUS**2), 0, 255).astype(np.uint8))
        out.paste(drawn.filter(ImageFilter.GaussianBlur(0.6)), (box[1].start, box[0].start))
    return out.convert("RGB")


def dilate_disk(mask: np.ndarray, radius_sq: int) -> np.ndarray:
    """Binary dilation of `mask` by the offsets with dy^2 + dx^2 <= `radius_sq` (skimage's `disk(r)` for
    radius_sq = r^2), with nothing outside the array.

    The disk is a stack of horizontal runs, one per row dy, of half-width isqrt(radius_sq - dy^2): each
    run's dilation is made once from shifted copies and ORed in at its rows. About 15x faster than scipy's
    `binary_dilation` with the same structuring element at PEN_RADIUS on this project's canvases."""
    h, w, r = mask.shape[0], mask.shape[1], math.isqrt(radius_sq)
    padded = np.zeros((h + 2 * r, w + 2 * r), bool)
    padded[r : r + h, r : r + w] = mask
    out = np.zeros((h, w), bool)
    runs: dict[int, np.ndarray] = {}
    for dy in range(-r, r + 1):
        half = math.isqrt(radius_sq - dy * dy)
        if half not in runs:
            run = np.zeros((h + 2 * r, w), bool)
            for dx in range(-half, half + 1):
                run |= padded[:, r + dx : r + dx + w]
            runs[half] = run
        out |= runs[half][r + dy : r + dy + h]
    return out
