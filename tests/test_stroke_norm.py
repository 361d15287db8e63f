"""Stroke normalisation: pen width, fills and framing no longer tell two drawings apart."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from model.stroke_norm import CANVAS, normalise_strokes


def _ink(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L")) < 128


def _house(width: int, box=(40, 40, 216, 216), size=256) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    mid, inset = (x0 + x1) / 2, (x1 - x0) * 0.085
    roof = y0 + (y1 - y0) * 0.4
    # lines centred on their path (a rectangle's outline would grow inwards with the width)
    d.line([(x0, roof), (mid, y0), (x1, roof)], fill="black", width=width, joint="curve")
    d.line([(x0 + inset, roof), (x1 - inset, roof), (x1 - inset, y1), (x0 + inset, y1), (x0 + inset, roof)],
           fill="black",
           width=width, joint="curve")
    return img


def _overlap(a: np.ndarray, b: np.ndarray, slack: int = 3) -> float:
    """Share of a's ink within `slack` px of b's ink (a tolerant, one-sided IoU)."""
    from scipy import ndimage

    near_b = ndimage.binary_dilation(b, iterations=slack)
    return float((a & near_b).sum() / max(1, a.sum()))


def test_pen_width_is_normalised_away():
    thin, thick = normalise_strokes(_house(2)), normalise_strokes(_house(18))
    a, b = _ink(thin), _ink(thick)
    assert a.shape == (CANVAS, CANVAS)
    assert _overlap(a, b, 6) > 0.9 and _overlap(b, a, 6) > 0.9
    # both end up with the same line width: ink area within 25% of each other
    assert 0.75 < a.sum() / b.sum() < 1.33
    # while the inputs differed several-fold in ink
    assert _ink(_house(18)).sum() > 4 * _ink(_house(2)).sum()


def test_framing_is_normalised_away():
    small_corner = normalise_strokes(_house(3, box=(10, 10, 90, 90)))
    large = normalise_strokes(_house(6, box=(30, 30, 230, 230)))
    assert _overlap(_ink(small_corner), _ink(large), 6) > 0.9
    assert _overlap(_ink(large), _ink(small_corner), 6) > 0.9


def test_a_filled_shape_becomes_its_outline():
    img = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(img).ellipse([28, 28, 228, 228], fill="black")
    out = _ink(normalise_strokes(img))
    assert not out[120:136, 120:136].any()  # the inside is paper again
    ring = out[:, CANVAS // 2]
    assert ring[:40].any() and ring[-40:].any()  # the contour is drawn
    assert out.mean() < 0.1


def test_blank_and_colour_input():
    assert not _ink(normalise_strokes(Image.new("RGB", (50, 80), "white"))).any()
    grey = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(grey).line([(5, 5), (60, 60)], fill=0, width=2)
    out = normalise_strokes(grey)
    assert out.mode == "RGB" and out.size == (CANVAS, CANVAS) and _ink(out).any()


@pytest.mark.parametrize("stroke_norm", [False, True])
def test_the_model_applies_what_its_training_applied(stroke_norm):
    """SBIRModel.preprocess_sketch normalises exactly when the checkpoint says training did."""
    import torch

    from model.pipeline import SBIRModel

    class Backbone:
        def to(self, device):
            return self

        def preprocess(self, img):
            return torch.from_numpy(np.asarray(img.convert("L").resize((32, 32))).copy())

    model = SBIRModel.__new__(SBIRModel)
    model.backbone = Backbone()
    model.config = {"sketch_preprocessing": {"stroke_norm": stroke_norm}}
    img = _house(14, box=(5, 5, 120, 120))
    got = model.preprocess_sketch(img)
    want = Backbone().preprocess(normalise_strokes(img) if stroke_norm else img)
    assert torch.equal(got, want)
    assert model.stroke_norm is stroke_norm


def _centre_lines_whole_canvas(ink: np.ndarray) -> tuple[np.ndarray, bool]:
    """centre_lines as first written, on the whole canvas (the reference its bounding-box form must
    equal), and whether the drawing had a filled area."""
    from scipy import ndimage
    from skimage.morphology import disk, skeletonize

    from model.stroke_norm import FILL_FACTOR, MAX_FILL_RADIUS, MIN_FILL_RADIUS

    if not ink.any():
        return ink, False
    depth = ndimage.distance_transform_edt(ink)
    skeleton = skeletonize(ink)
    radius = min(MAX_FILL_RADIUS, max(MIN_FILL_RADIUS, FILL_FACTOR * float(np.median(depth[skeleton])) + 1))
    centres = depth >= radius
    if not centres.any():
        return skeleton, False
    filled = ndimage.distance_transform_edt(~centres) <= radius
    outline = filled & ~ndimage.binary_erosion(filled, structure=disk(1))
    return skeletonize(ink & ~ndimage.binary_dilation(filled, structure=disk(1))) | outline, True


def _random_drawing(rng: np.random.Generator) -> np.ndarray:
    """Lines of random widths, some filled shapes, sometimes touching the canvas' edge."""
    img = Image.new("L", (CANVAS, CANVAS), 255)
    d = ImageDraw.Draw(img)
    lo, hi = (0, CANVAS) if rng.random() < 0.3 else (60, 200)
    for _ in range(int(rng.integers(1, 6))):
        pts = [tuple(int(v) for v in rng.integers(lo, hi, 2)) for _ in range(int(rng.integers(2, 5)))]
        d.line(pts, fill=0, width=int(rng.integers(1, 30)))
    for _ in range(int(rng.integers(0, 3))):
        x, y = (int(v) for v in rng.integers(lo, hi - 20, 2))
        r = int(rng.integers(5, 60))
        d.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return np.asarray(img) < 128


def _square_on_lines(side: int) -> np.ndarray:
    """Thin lines and one filled square: its centre lies (side + 1) // 2 from the paper, so sides 9 to
    13 put the deepest ink on either side of MIN_FILL_RADIUS (the shortcut that skips the distance
    transform must agree with it to the pixel)."""
    img = Image.new("L", (CANVAS, CANVAS), 255)
    d = ImageDraw.Draw(img)
    d.line([(30, 40), (220, 60), (120, 220)], fill=0, width=2)
    d.rectangle([100, 100, 100 + side - 1, 100 + side - 1], fill=0)
    return np.asarray(img) < 128


def test_centre_lines_on_the_ink_box_equal_the_whole_canvas():
    from model.stroke_norm import centre_lines

    rng = np.random.default_rng(0)
    drawings = [_random_drawing(rng) for _ in range(60)] + [_ink(_house(w)) for w in (1, 3, 9, 25)]
    drawings += [_square_on_lines(side) for side in range(9, 14)]
    fills = 0
    for ink in drawings:
        want, had_fill = _centre_lines_whole_canvas(ink)
        assert np.array_equal(centre_lines(ink), want)
        fills += had_fill
    # both paths (with and without filled areas) and ink on the canvas' edge are covered
    assert 5 <= fills <= len(drawings) - 5
    assert sum(bool(ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()) for ink in drawings) >= 5


def test_lines_drawn_on_their_box_equal_the_whole_canvas():
    """draw_lines (a fast disk dilation on the lines' bounding box, then the blur there) gives the
    pixels of scipy's binary dilation with skimage's disk and the blur on the whole canvas."""
    from PIL import ImageFilter
    from scipy import ndimage
    from skimage.morphology import disk

    from model.stroke_norm import PEN_RADIUS, centre_lines, dilate_disk, draw_lines

    rng = np.random.default_rng(1)
    lines = [centre_lines(_random_drawing(rng)) for _ in range(40)]
    corner = np.zeros((CANVAS, CANVAS), bool)
    corner[0, :], corner[:, -1], corner[5, 2] = True, True, True
    lines += [corner, np.zeros((CANVAS, CANVAS), bool)]
    for centre in lines:
        want = Image.fromarray(np.where(ndimage.binary_dilation(centre, structure=disk(PEN_RADIUS)), 0, 255)
                               .astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)).convert("RGB")
        assert np.array_equal(np.asarray(draw_lines(centre)), np.asarray(want))
    for radius in (1, 2, 3, 5):
        for centre in lines[:10] + [corner]:
            assert np.array_equal(dilate_disk(centre, radius**2), ndimage.binary_dilation(centre, structure=disk(radius)))
    assert sum(bool(c[0].any() or c[-1].any() or c[:, 0].any() or c[:, -1].any()) for c in lines) >= 2
