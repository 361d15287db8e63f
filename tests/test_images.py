"""Decoding: every mode and orientation becomes RGB; every kind of bad file is a clear ImageError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.images import ImageError, list_images, load_image, pad_to_square


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 0, 255))
    out = load_image(_png_bytes(img))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "1", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.new("RGB", (16, 16), (10, 200, 30)).convert(mode)
    assert load_image(_png_bytes(img)).mode == "RGB"


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_first_gif_frame_and_tiny_images():
    frames = [Image.new("P", (4, 4), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and min(out.size) >= 8


def test_pad_to_square_keeps_the_whole_drawing():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (30, 30)
    arr = np.asarray(sq)
    assert (arr[:10] == 255).all() and (arr[10:20] == 0).all()


def _bomb_png(w, h):
    """A valid PNG header announcing a huge image, with a tiny compressed body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * (w // 8 + 1) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not-an-image"),
        (_bomb_png(30000, 30000), "too-large"),
    ],
)
def test_bad_inputs_raise_image_error(data, reason):
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert info.value.reason == reason


def test_truncated_image_is_corrupt(tmp_path):
    data = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.reason == "corrupt"
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "missing.png")
    assert info.value.reason == "missing"


def test_list_images_does_not_follow_symlinks_out_of_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "link.png").symlink_to(outside)
    (root / "notes.txt").write_text("hi")
    assert [p.name for p in list_images(root)] == ["x.png"]
