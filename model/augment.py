"""Image-level augmentation for sketches, more drawing styles made from the training images, and edge
maps as a never-trained sketch style.

A class may have a single drawing, so training sees several random renders of it: scale, shift,
rotation, mirror, stroke width and partial strokes (`augment_sketch`). Two more training styles are
made from training images: `freehand_sketch` redraws line art as an unsteady hand would (a smooth
random warp, mostly thinner strokes, more of them dropped), and `silhouette_sketch` turns a colour
image into a filled shape (its inked area in black, inner lines left white). `edge_sketch` turns a
colour image into a line drawing by another "hand" (region outlines); it is used only to check that
a model generalises to a drawing style it was not trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

WHITE = (255, 255, 255)


# stroke width odds: thinner, as drawn, thicker, much thicker
WIDTH_ODDS = (0.2, 0.3, 0.35, 0.15)
FREEHAND_WIDTH_ODDS = (0.5, 0.3, 0.15, 0.05)


def augment_sketch(img: Image.Image, rng: np.random.Generator, width_odds=WIDTH_ODDS, erase: bool = True) -> Image.Image:
    """One random render of a dark-on-white drawing (RGB in, RGB out, same size)."""
    img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    # stroke width first, at the source resolution
    width_choice = rng.choice(4, p=list(width_odds))
    k = max(3, (side // 128) | 1)  # odd filter size relative to the image size
    if width_choice == 0:
        img = img.filter(ImageFilter.MaxFilter(k))
        # a thinning that erases a stroke entirely is worse than none
        if np.asarray(img.convert("L")).min() > 200:
            img = img.filter(ImageFilter.MinFilter(k))
    elif width_choice == 2:
        img = img.filter(ImageFilter.MinFilter(k))
    elif width_choice == 3:
        img = img.filter(ImageFilter.MinFilter(k + 2))

    # partial strokes: erase a few blobs
    if erase and rng.random() < 0.5:
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.05, 0.14) * side
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=WHITE)

    if rng.random() < 0.5:
        img = ImageOps.mirror(img)

    angle = float(rng.uniform(-15, 15))
    scale = float(rng.uniform(0.75, 1.1))
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * side
    img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=WHITE)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = img.resize(new, Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), WHITE)
    canvas.paste(scaled, (int((w - new[0]) / 2 + tx), int((h - new[1]) / 2 + ty)))
    return canvas


def warp(img: Image.Image, rng: np.random.Generator, cells: int = 5, amount: float = 0.025) -> Image.Image:
    """A smooth random warp: the inner points of a `cells` x `cells` grid move by up to `amount` of
    the side (normal, sd amount/2, clipped), the image follows piecewise (PIL's MESH transform)."""
    w, h = img.size
    xs, ys = np.linspace(0, w, cells + 1), np.linspace(0, h, cells + 1)
    gx, gy = np.meshgrid(xs, ys)  # (cells+1, cells+1) target grid
    jitter = np.clip(rng.normal(0, amount / 2, size=(2, cells + 1, cells + 1)), -amount, amount) * max(w, h)
    jitter[:, [0, -1], :] = 0  # the frame stays where it is
    jitter[:, :, [0, -1]] = 0
    sx, sy = gx + jitter[0], gy + jitter[1]  # where each target grid point reads from
    mesh = []
    for i in range(cells):
        for j in range(cells):
            box = (int(gx[i, j]), int(gy[i, j]), int(gx[i + 1, j + 1]), int(gy[i + 1, j + 1]))
            # source quad: upper left, lower left, lower right, upper right
            quad = (sx[i, j], sy[i, j], sx[i + 1, j], sy[i + 1, j], sx[i + 1, j + 1], sy[i + 1, j + 1],
                    sx[i, j + 1], sy[i, j + 1])
            mesh.append((box, quad))
    return img.transform(img.size, Image.MESH, mesh, resample=Image.BILINEAR, fillcolor=WHITE)


def freehand_sketch(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Line art redrawn by an unsteady hand: a smooth warp of 1-4% of the side, strokes mostly
    thinner, then `augment_sketch`'s dropped parts and placement."""
    img = warp(img.convert("RGB"), rng, cells=int(rng.integers(3, 7)), amount=float(rng.uniform(0.01, 0.04)))
    return augment_sketch(img, rng, width_odds=FREEHAND_WIDTH_ODDS)


def _eroded(mask: np.ndarray, k: int) -> np.ndarray:
    """Pixels whose whole k x k neighbourhood is in `mask` (edges replicated): what PIL's MinFilter(k)
    keeps of a white-on-black mask, in O(1) per pixel through an integral image."""
    r = k // 2
    padded = np.pad(mask.astype(np.int32), r, mode="edge")
    c = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), np.int32)
    c[1:, 1:] = padded.cumsum(0).cumsum(1)
    h, w = mask.shape
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) == k * k


def silhouette_sketch(img: Image.Image, rng: np.random.Generator | None = None,
                      inner_lines: bool = True) -> Image.Image:
    """A colour image as a filled shape: every inked pixel black, white stays white; with
    `inner_lines` the dark lines inside the shape (an outlined artist's strokes) are left white, as a
    silhouette's inner detail. With `rng`, then `augment_sketch`'s render."""
    rgb = np.asarray(img.convert("RGB"))
    ink = rgb.min(axis=2) < 235
    out = np.where(ink, 0, 255).astype(np.uint8)
    if inner_lines:
        side = max(img.size)
        k = max(3, (side // 16) | 1)  # keep the outer outline (up to two pen widths) black
        out[_eroded(ink, k) & (rgb.max(axis=2) < 90)] = 255
    sil = Image.fromarray(out).convert("RGB")
    return sil if rng is None else augment_sketch(sil, rng, erase=False)


def edge_sketch(img: Image.Image, threshold: int = 40) -> Image.Image:
    """Outlines of a colour image as dark lines on white (a sketch style no model is trained on)."""
    grey = img.convert("L").filter(ImageFilter.GaussianBlur(1))
    edges = grey.filter(ImageFilter.FIND_EDGES)
    mask = edges.point(lambda v: 255 if v > threshold else 0)
    mask = mask.filter(ImageFilter.MaxFilter(3))  # connect and thicken to a pen-like width
    out = ImageOps.invert(mask)
    # FIND_EDGES marks the image border; clear a thin frame
    ImageDraw.Draw(out).rectangle([0, 0, out.width - 1, out.height - 1], outline=255, width=2)
    return out.convert("RGB")
