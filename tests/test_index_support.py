"""Helpers for the index builder's end-to-end tests: small photo collections, bad files, CLI runs.

Imported by the other test_index_* modules (pytest puts tests/ on sys.path); its own tests check that
the helpers make what the others rely on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct small photo: coloured shapes on a coloured ground."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, 30, 2))
        box = (x0, y0, x0 + int(rng.integers(8, 24)), y0 + int(rng.integers(8, 24)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def make_photos(folder: Path, seeds, prefix: str = "p") -> list[Path]:
    """One file per seed, PNG and JPEG alternately, a few in a sub-folder."""
    paths = []
    for n, seed in enumerate(seeds):
        sub = folder / "sub" if n % 3 == 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{prefix}{seed:03d}.{'png' if n % 2 == 0 else 'jpg'}"
        photo(seed).save(path)
        paths.append(path)
    return paths


def make_bad_files(folder: Path, outside: Path) -> dict[str, str]:
    """Every kind of bad input; returns {file name: the reason the build report must give}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    good = folder / "_tmp_good.png"
    photo(999).save(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (8000, 6000)).save(folder / "bomb.png")  # 48 MP in ~50 kB
    outside.mkdir(parents=True, exist_ok=True)
    photo(998).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "escape.png")
    return {
        "zero.jpg": "empty",
        "notes.png": "not-an-image",
        "truncated.png": "corrupt",
        "bomb.png": "too-large",
        "escape.png": "outside-root",
    }


def sbir(*args) -> int:
    from sbir.cli import main

    return main(["-q", *map(str, args)])


def build_cli(photos: Path, ckpt: Path, root: Path, *extra) -> dict:
    """`sbir index build` through the real CLI; returns its build report."""
    report = root.parent / f"{root.name}-report.json"
    code = sbir(
        "index",
        "build",
        photos,
        "--model",
        ckpt,
        "--out",
        root,
        "--workers",
        0,
        "--no-progress",
        "--report",
        report,
        *extra,
    )
    assert code == 0, f"build failed with exit code {code}"
    return json.loads(report.read_text())


def update_cli(root: Path, photos: Path, *extra) -> dict:
    report = root.parent / f"{root.name}-update-report.json"
    code = sbir("index", "update", root, photos, "--workers", 0, "--no-progress", "--report", report, *extra)
    assert code == 0, f"update failed with exit code {code}"
    return json.loads(report.read_text())


def test_photos_are_distinct_and_bad_files_are_bad(tmp_path):
    from model.images import ImageError, load_image

    paths = make_photos(tmp_path / "p", range(5))
    arrays = [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in paths]
    assert all(np.abs(a - b).mean() > 5 for i, a in enumerate(arrays) for b in arrays[i + 1 :])
    expected = make_bad_files(tmp_path / "bad", tmp_path / "outside")
    for name, reason in expected.items():
        if reason == "outside-root":
            continue
        try:
            load_image(tmp_path / "bad" / name)
        except ImageError as exc:
            assert exc.reason == reason, name
        else:
            raise AssertionError(f"{name} decoded")
