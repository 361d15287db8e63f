"""Decoding images of any mode, orientation and size into the RGB square a backbone expects.

Everything that reads pixels (datasets, the index builder, the service) goes through `load_image`,
so a corrupt file fails the same way everywhere: with `ImageError` and a reason a person can read.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

LOG = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# A decompression bomb is refused before its pixels are decoded. 40 megapixels covers any camera
# photo; PIL's own limit (about 179 MP) would let a 50 kB PNG allocate 700 MB.
MAX_IMAGE_PIXELS = 40_000_000
# Images smaller than this are mostly noise to a 260 px backbone; they are upscaled, not refused.
MIN_SIDE = 8
# Larger sides are reduced on load: the backbones see at most a few hundred pixels, and a thin strip
# within MAX_IMAGE_PIXELS (1 x 39,000,000: a 40 kB PNG) would otherwise be padded to a square of
# 10^15 pixels by preprocessing (it exhausted 22 GB before this bound; docs/RELIABILITY.md).
MAX_SIDE = 4096


class ImageError(ValueError):
    """An input that is not a decodable image; `reason` is short and stable (for reports)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("empty", "zero bytes")
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError("missing", str(path))
        if path.stat().st_size == 0:
            raise ImageError("empty", "zero bytes")
        fp = path.open("rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError("too-large", f"{w}x{h} pixels exceeds {MAX_IMAGE_PIXELS}")
            img.seek(0)  # first frame of an animation
            img.load()
        return img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too-large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("not-an-image", "unrecognised format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated and corrupt data as OSError/SyntaxError depending on the codec.
        raise ImageError("corrupt", str(exc)) from None
    finally:
        if not isinstance(source, bytes | bytearray | memoryview):
            fp.close()


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB with transparency composited on `background` (white: sketches are dark on white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("LA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def load_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Decode a path or bytes into an RGB image (EXIF-rotated, alpha on white, first frame), each
    side within MIN_SIDE..MAX_SIDE (aspect kept unless a side would leave that range).

    Raises `ImageError` with reason one of: missing, empty, not-an-image, corrupt, too-large.
    """
    img = to_rgb(_open(source))
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        scale = MIN_SIDE / min(w, h)
        size = [min(MAX_SIDE, max(MIN_SIDE, round(side * scale))) for side in (w, h)]
        img = img.resize(tuple(size), Image.NEAREST)
    return img


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Centre the image on a square canvas so no part of a drawing is cropped away."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, sorted, not following symlinks that leave the root."""
    root = Path(root).resolve()
    out: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.is_symlink():
                target = p.resolve()
                if root not in target.parents:
                    LOG.warning("skipping %s: symlink leaves %s", p, root)
                    continue
            out.append(p)
    return sorted(out)
