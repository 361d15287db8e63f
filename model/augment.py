"""Image-level augmentation for sketches, and edge maps as a second, never-trained sketch style.

A class may have a single drawing, so training sees several random renders of it: scale, shift,
rotation, mirror, stroke width and partial strokes. `edge_sketch` turns a colour image into a line
drawing by another "hand" (region outlines); it is used only to check that a model generalises to
a drawing style it was not trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

WHITE = (255, 255, 255)


def augment_sketch(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random render of a dark-on-white drawing (RGB in, RGB out, same size)."""
    img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    # stroke width first, at the source resolution: thinner, as drawn, thicker, much thicker
    width_choice = rng.choice(4, p=[0.2, 0.3, 0.35, 0.15])
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
    if rng.random() < 0.5:
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
