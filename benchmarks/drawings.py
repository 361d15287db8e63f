"""What a person gets: simple drawings sent as strokes to a running service, the top results shown.

Twelve things everybody can draw (and that have emoji in the demo's gallery) are drawn here as
QuickDraw-style strokes, the way the drawing page sends them, and posted to `/search`. The script
writes a grid (the drawing, then the top 5) to `--out` and prints, for each drawing, the rank of
the first right emoji in the top 10. It exits 1 when fewer than `--min-hits` drawings have one.

    sbir demo --no-serve                                   # the demo model and index, once
    python benchmarks/drawings.py --index runs/demo/index  # starts `sbir serve` on a free port
    python benchmarks/drawings.py --url http://127.0.0.1:8000   # or ask a running service
"""

from __future__ import annotations

import argparse
import io
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps


def circle(cx, cy, r, start=0.0, end=360.0, n=32, ry=None):
    """Points of a circle (or an ellipse, or an arc) as one stroke; angles in degrees, y down."""
    ry = r if ry is None else ry
    ts = [math.radians(start + (end - start) * i / n) for i in range(n + 1)]
    return [[cx + r * math.cos(t) for t in ts], [cy + ry * math.sin(t) for t in ts]]


def poly(*points):
    return [[float(x) for x, _ in points], [float(y) for _, y in points]]


def star(cx=128, cy=128, outer=110, inner=44):
    pts = []
    for i in range(11):
        r = outer if i % 2 == 0 else inner
        t = math.radians(-90 + 36 * i)
        pts.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    return [poly(*pts)]


def heart():
    ts = [2 * math.pi * i / 48 for i in range(49)]
    xs = [128 + 6.5 * 16 * math.sin(t) ** 3 for t in ts]
    ys = [120 - 6.5 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
    return [[xs, ys]]


def sun():
    rays = []
    for i in range(8):
        t = math.radians(45 * i)
        rays.append(poly((128 + 62 * math.cos(t), 128 + 62 * math.sin(t)),
                         (128 + 110 * math.cos(t), 128 + 110 * math.sin(t))))
    return [circle(128, 128, 45), *rays]


# name -> (strokes, the emoji that count as right: their CLDR names as in the demo's gallery)
DRAWINGS: dict[str, tuple[list, set[str]]] = {
    "house": ([poly((30, 115), (128, 30), (226, 115)), poly((55, 95), (55, 225), (201, 225), (201, 95)),
               poly((110, 225), (110, 165), (146, 165), (146, 225))],
              {"house", "house with garden", "derelict house"}),
    "star": (star(), {"star", "glowing star", "white medium star"}),
    "tree": ([poly((128, 20), (60, 110), (95, 110), (45, 180), (211, 180), (161, 110), (196, 110), (128, 20)),
              poly((115, 180), (115, 235), (141, 235), (141, 180))],
             {"evergreen tree", "Christmas tree", "deciduous tree"}),
    "fish": ([circle(110, 128, 80, ry=45), poly((185, 128), (235, 88), (235, 168), (185, 128)),
              circle(65, 115, 6, n=8)], {"fish", "tropical fish"}),
    "car": ([poly((20, 170), (20, 130), (60, 122), (90, 85), (170, 85), (200, 122), (236, 132), (236, 170),
                  (210, 170)), poly((160, 170), (100, 170)), poly((45, 170), (20, 170)),
             circle(75, 172, 24), circle(185, 172, 24), poly((128, 85), (128, 122)), poly((70, 122), (210, 122))],
            {"automobile", "oncoming automobile", "racing car", "police car", "taxi", "sport utility vehicle"}),
    "cloud": ([circle(80, 150, 45, 90, 270, 16), circle(125, 105, 55, 180, 330, 16),
               circle(185, 135, 45, 240, 450, 16), poly((185, 180), (80, 195))], {"cloud"}),
    "sun": (sun(), {"sun", "sun with face"}),
    "heart": (heart(), {"red heart", "heart suit", "sparkling heart", "beating heart", "growing heart",
                        "white heart", "black heart", "orange heart", "yellow heart", "green heart",
                        "blue heart", "purple heart", "brown heart", "pink heart", "light blue heart",
                        "grey heart", "heart decoration", "two hearts", "revolving hearts"}),
    "cat": ([circle(128, 145, 80), poly((60, 105), (70, 25), (115, 68)), poly((141, 68), (186, 25), (196, 105)),
             circle(98, 130, 8, n=10), circle(158, 130, 8, n=10), poly((120, 165), (128, 172), (136, 165)),
             poly((30, 160), (100, 170)), poly((30, 185), (100, 178)), poly((156, 170), (226, 160)),
             poly((156, 178), (226, 185))],
            {"cat face", "cat", "black cat", "grinning cat", "grinning cat with smiling eyes", "cat with tears of joy",
             "smiling cat with heart-eyes", "cat with wry smile", "kissing cat", "weary cat", "crying cat",
             "pouting cat"}),
    "apple": ([circle(128, 150, 85, ry=80), poly((128, 72), (138, 25)), circle(160, 45, 22, 180, 360, 12, ry=10)],
              {"red apple", "green apple"}),
    "umbrella": ([circle(128, 120, 105, 180, 360, 24), poly((23, 120), (233, 120)), poly((128, 120), (128, 215)),
                  circle(108, 215, 20, 0, 180, 10)],
                 {"umbrella", "umbrella with rain drops", "closed umbrella", "umbrella on ground"}),
    "bicycle": ([circle(60, 170, 45), circle(196, 170, 45), poly((60, 170), (105, 100), (175, 100), (196, 170)),
                 poly((105, 100), (128, 170), (175, 100)), poly((128, 170), (60, 170)),
                 poly((95, 82), (120, 82)), poly((175, 100), (168, 70), (190, 65))], {"bicycle"}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    sbir = Path(sys.executable).with_name("sbir")
    proc = subprocess.Popen([str(sbir), "serve", str(index), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sbir serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("sbir serve did not become ready within 180 s")


def name_of(result: dict) -> str:
    meta = result.get("metadata") or {}
    return meta.get("name") or meta.get("annotation") or str(result["id"])


def run(url: str, out: Path, top: int = 5) -> list[tuple[str, int | None, list[dict]]]:
    from service.strokes import render_strokes

    rows = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, (strokes, right) in DRAWINGS.items():
            r = client.post("/search", params={"k": 10}, json={"strokes": strokes})
            r.raise_for_status()
            results = r.json()["results"]
            rank = next((i + 1 for i, res in enumerate(results) if name_of(res) in right), None)
            thumbs = []
            for res in results[:top]:
                img = Image.open(io.BytesIO(client.get(f"/photos/{res['id']}").content)).convert("RGB")
                thumbs.append((img, name_of(res), name_of(res) in right))
            rows.append((name, rank, results, render_strokes(strokes), thumbs))
    cell, label = 128, 18
    grid = Image.new("RGB", ((top + 1) * (cell + 8) + 8, len(rows) * (cell + label + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, rank, _results, drawing, thumbs) in enumerate(rows):
        y = 8 + i * (cell + label + 8)
        grid.paste(ImageOps.expand(drawing.resize((cell - 4, cell - 4)), 2, "black"), (8, y))
        draw.text((8, y + cell + 2), f"{name}: {'rank ' + str(rank) if rank else 'not in top 10'}", fill="black")
        for j, (img, title, ok) in enumerate(thumbs):
            x = 8 + (j + 1) * (cell + 8)
            grid.paste(ImageOps.expand(img.resize((cell - 6, cell - 6)), 3, (0, 150, 0) if ok else (200, 0, 0)), (x, y))
            draw.text((x, y + cell + 2), title[:20], fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return [(name, rank, results) for name, rank, results, _d, _t in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    where.add_argument("--index", type=Path, help="an index root: `sbir serve` is started on it (and stopped)")
    ap.add_argument("--out", type=Path, default=Path("docs/img/drawings.png"))
    ap.add_argument("--min-hits", type=int, default=9, help="drawings with a right emoji in the top 10 needed")
    args = ap.parse_args(argv)
    proc = None
    url = args.url
    if args.index:
        proc, url = start_server(args.index)
    try:
        rows = run(url, args.out)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    hits = sum(rank is not None for _n, rank, _r in rows)
    for name, rank, results in rows:
        top3 = ", ".join(name_of(r) for r in results[:3])
        print(f"{name:<10} {'rank ' + str(rank) if rank else 'miss':<8} top 3: {top3}")
    print(f"{hits} of {len(rows)} drawings have a right emoji in the top 10 (need {args.min_hits}); grid: {args.out}")
    return 0 if hits >= args.min_hits else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
