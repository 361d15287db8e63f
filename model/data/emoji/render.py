"""Rendering SVG to PNG: one image (cairosvg, safe mode), and many in a process pool, resumable."""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from model.ground.files import usable_cores
from model.images import to_rgb


class RenderError(Exception):
    pass


def render_svg(svg: bytes | str, size: int) -> bytes:
    """Render SVG to a `size` x `size` RGB PNG (aspect kept, centred, white background).

    External resources are never fetched (cairosvg's safe mode). Raises `RenderError` when the SVG
    does not parse, does not render or renders blank.
    """
    # imported here: cairosvg loads the system's cairo library, which only rendering needs
    import cairosvg

    if isinstance(svg, str):
        svg = svg.encode("utf-8")
    try:
        png = cairosvg.svg2png(
            bytestring=svg,
            output_width=size,
            output_height=size,
            background_color="white",
            unsafe=False,
        )
        img = Image.open(io.BytesIO(png))
        img.load()
    except Exception as exc:  # cairosvg raises anything from ParseError to ZeroDivisionError
        raise RenderError(f"{type(exc).__name__}: {exc}".strip()[:300]) from None
    img = to_rgb(img)
    if img.size != (size, size):
        raise RenderError(f"rendered {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    if all(lo == 255 for lo, _hi in img.getextrema()):
        raise RenderError("renders blank (all white)")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class RenderJob:
    dest: str  # absolute path of the PNG
    size: int
    svg_path: str = ""  # either a file...
    svg_text: str = ""  # ...or the SVG itself


def _is_finished(dest: Path, size: int) -> bool:
    try:
        with Image.open(dest) as im:
            return im.size == (size, size) and im.mode == "RGB" and im.format == "PNG"
    except (OSError, ValueError, SyntaxError):
        return False


def run_job(job: RenderJob) -> tuple[str, str, str]:
    """Render one job unless its PNG is already finished. Returns (dest, status, reason) with status
    "rendered", "reused" or "failed"; never raises for a bad SVG."""
    dest = Path(job.dest)
    if dest.is_file() and _is_finished(dest, job.size):
        return job.dest, "reused", ""
    try:
        svg = Path(job.svg_path).read_bytes() if job.svg_path else job.svg_text
        png = render_svg(svg, job.size)
    except RenderError as exc:
        return job.dest, "failed", str(exc)
    except OSError as exc:
        return job.dest, "failed", f"cannot read {job.svg_path}: {exc.strerror or exc}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(png)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return job.dest, "failed", f"cannot write: {exc}"
    return job.dest, "rendered", ""


def default_workers() -> int:
    """Render processes: the cores this process may use (model.ground.files.usable_cores)."""
    return usable_cores()


def render_jobs(
    jobs: Iterable[RenderJob], workers: int | None = None, progress: bool = True
) -> dict[str, tuple[str, str]]:
    """Run the jobs in a process pool (in-process for workers=1). Returns dest -> (status, reason)."""
    jobs = list(jobs)
    workers = max(1, workers or default_workers())
    results: dict[str, tuple[str, str]] = {}
    bar = tqdm(total=len(jobs), desc="render", unit="img", disable=None if progress else True)
    try:
        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                dest, status, reason = run_job(job)
                results[dest] = (status, reason)
                bar.update()
        else:
            chunk = max(1, min(32, len(jobs) // (workers * 8) or 1))
            with multiprocessing.get_context().Pool(workers) as pool:
                for dest, status, reason in pool.imap_unordered(run_job, jobs, chunksize=chunk):
                    results[dest] = (status, reason)
                    bar.update()
    finally:
        bar.close()
    return results
