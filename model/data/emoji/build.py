"""Assembling the benchmark: render the selection, then the manifest, splits, build report and
attribution."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from model.data.dataset import (
    HELDOUT_KEY,
    STYLE_SET_KEY,
    Record,
    Split,
    _atomic_write_text,
    make_split,
    split_path,
    write_manifest,
)
from model.data.emoji.fetch import EmojiSources, fetch_packages
from model.data.emoji.render import RenderJob, default_workers, render_jobs
from model.data.emoji.select import (
    DROP_GROUPS,
    MIN_COLOUR_ARTISTS,
    EmojiEntry,
    StyleItem,
    select_emoji,
    select_style_items,
)
from model.data.emoji.sources import ARTISTS, COLOUR_ARTISTS, STYLE_ARTISTS, STYLE_KEYS, STYLE_SETS
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)

MIN_PER_SUBGROUP = 3
DEFAULT_SIZE = 256
DEFAULT_SEEDS = (0, 1, 2)


def _attribution_text(packages: Mapping[str, Mapping], artists: Iterable[str]) -> str:
    lines = [
        "# Attribution",
        "",
        "The images of this dataset are rasterisations (PNG, on a white background) of emoji drawn by",
        "the artists below, rendered unmodified from their SVG sources. Each keeps its licence.",
        "",
        "| artist | by | licence | source | package |",
        "|---|---|---|---|---|",
    ]
    for key in artists:
        title, by, licence, url = ARTISTS.get(key) or STYLE_ARTISTS.get(key, (key, "unknown", "unknown", ""))
        pkg = packages.get(key, {})
        spec = f"{pkg['name']}@{pkg['version']}" if pkg else ""
        lines.append(f"| {title} | {by} | {licence} | {url} | {spec} |")
    lines += [
        "",
        "- OpenMoji line art (`images/sketch/openmoji/`) and colour art (`images/photo/openmoji/`):",
        '  "All emojis designed by OpenMoji - the open-source emoji and icon project.',
        '  License: CC BY-SA 4.0" (https://creativecommons.org/licenses/by-sa/4.0/). The PNGs',
        "  are adaptations and are shared under the same licence.",
        "- Noto Emoji (`images/photo/noto/`): Copyright Google Inc., Apache License 2.0",
        "  (https://www.apache.org/licenses/LICENSE-2.0).",
        "- Twemoji (`images/photo/twemoji/`): Copyright Twitter, Inc. and other contributors,",
        "  CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).",
        "- Fluent Emoji (`images/photo/fluent/`): Copyright Microsoft Corporation, MIT License.",
        "",
        "- Style sets (`images/sketch/<set>/`, `images/photo/streamline-color/`), where present: each",
        "  icon set under its own licence in the table above (ISC, MIT, CC BY 4.0), rendered unmodified.",
        "",
        "Emoji metadata (groups, subgroups, annotations) from OpenMoji's data/openmoji.json, which",
        "follows the Unicode emoji data files.",
        "",
    ]
    return "\n".join(lines)


def _clean_partial_files(images_dir: Path) -> int:
    n = 0
    if images_dir.is_dir():
        for p in images_dir.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    sources: EmojiSources,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    min_colour_artists: int = MIN_COLOUR_ARTISTS,
    min_per_subgroup: int = MIN_PER_SUBGROUP,
    progress: bool = True,
) -> dict:
    """Render the benchmark into `out_dir` and write manifest.csv, splits/, build_report.json and
    ATTRIBUTION.md. Finished renders are reused. Returns the report (also in build_report.json)."""
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {size}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    out_dir = Path(out_dir).resolve()
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    _clean_partial_files(images)

    entries, stats = select_emoji(sources, min_colour_artists=min_colour_artists)
    LOG.info("%d candidate emoji after the join and filters", len(entries))

    def rel(artist: str, domain: str, code: str) -> str:
        return f"images/{domain}/{artist}/{code}.png"

    jobs: list[RenderJob] = []
    origin: dict[str, tuple[str, str, str]] = {}  # dest -> (artist, domain, hexcode)
    for e in entries:
        dest = out_dir / rel("openmoji", "sketch", e.hexcode)
        jobs.append(RenderJob(str(dest), size, svg_path=str(e.sketch_svg)))
        origin[str(dest)] = ("openmoji", "sketch", e.hexcode)
        for artist, src in e.colour.items():
            dest = out_dir / rel(artist, "photo", e.hexcode)
            if isinstance(src, Path):
                jobs.append(RenderJob(str(dest), size, svg_path=str(src)))
            else:
                jobs.append(RenderJob(str(dest), size, svg_text=src))
            origin[str(dest)] = (artist, "photo", e.hexcode)

    style_items, style_stats = select_style_items(sources, entries)

    def style_rel(item: StyleItem) -> str:
        return f"images/{item.domain}/{item.style}/{item.hexcode or item.name}.png"

    for item in style_items:
        jobs.append(RenderJob(str(out_dir / style_rel(item)), size, svg_text=item.svg))

    workers = max(1, workers or default_workers())
    t0 = time.perf_counter()
    results = render_jobs(jobs, workers=workers, progress=progress)
    seconds = time.perf_counter() - t0
    status_counts = Counter(status for status, _ in results.values())
    failures = []
    for item in style_items:
        origin[str(out_dir / style_rel(item))] = (item.style, item.domain, item.hexcode or item.name)
    for dest, (status, reason) in sorted(results.items()):
        if status == "failed":
            artist, domain, code = origin[dest]
            failures.append(
                {
                    "path": rel(artist, domain, code),
                    "artist": artist,
                    "domain": domain,
                    "hexcode": code,
                    "reason": reason,
                }
            )
            LOG.warning("render failed, skipped: %s (%s)", rel(artist, domain, code), reason)

    def ok(artist: str, domain: str, code: str) -> bool:
        return results.get(str(out_dir / rel(artist, domain, code)), ("missing", ""))[0] != "failed"

    # Apply the keep rule again to what actually rendered, then the subgroup size rule.
    after: Counter[str] = Counter()
    rendered: list[tuple[EmojiEntry, list[str]]] = []
    for e in entries:
        if not ok("openmoji", "sketch", e.hexcode):
            after["line_art_failed_to_render"] += 1
            continue
        artists = [a for a in e.colour if ok(a, "photo", e.hexcode)]
        if len(artists) < min_colour_artists:
            after[f"fewer_than_{min_colour_artists}_colour_renders"] += 1
            continue
        rendered.append((e, artists))
    per_subgroup = Counter(e.subgroup for e, _ in rendered)
    small = {s: n for s, n in sorted(per_subgroup.items()) if n < min_per_subgroup}
    final = [(e, a) for e, a in rendered if e.subgroup not in small]

    records: list[Record] = []
    for e, artists in final:
        meta = {"emoji": e.emoji, "group": e.group, "subgroup": e.subgroup, "annotation": e.annotation}
        records.append(
            Record(
                rel("openmoji", "sketch", e.hexcode), "sketch", e.subgroup, e.hexcode, "openmoji", dict(meta)
            )
        )
        for artist in artists:
            records.append(
                Record(rel(artist, "photo", e.hexcode), "photo", e.subgroup, e.hexcode, artist, dict(meta))
            )
    if not records:
        raise UserError("no emoji survived the filters; see build_report.json")
    records += _style_records(style_items, {e.hexcode: e for e, _ in final}, style_rel,
                              lambda item: results.get(str(out_dir / style_rel(item)), ("missing", ""))[0] != "failed")
    write_manifest(out_dir, records)

    subgroups = sorted({e.subgroup for e, _ in final})
    splits: list[Split] = []
    for seed in seeds:
        split = make_split(
            subgroups,
            seed,
            name=f"category_seed{seed}",
            description=(
                "OpenMoji subgroups: 20% unseen, 15% of the seen ones for validation. The instance "
                "task (label = codepoint) uses the same split: emoji of unseen subgroups are unseen."
            ),
        )
        split.write(split_path(out_dir, split.name))
        splits.append(split)

    style_counts = Counter(r.artist for r in records if r.artist in STYLE_KEYS)
    for st in STYLE_SETS:
        if st.key in style_stats:
            style_stats[st.key] |= {"role": st.role, "images": style_counts[st.key]}
    photos_per_artist = Counter(r.artist for r in records if r.domain == "photo" and STYLE_SET_KEY not in r.meta)
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": size,
        "packages": sources.packages,
        "rules": {
            "dropped_groups": sorted(DROP_GROUPS),
            "skin_tone_variants": "dropped",
            "min_colour_artists": min_colour_artists,
            "min_emoji_per_subgroup": min_per_subgroup,
        },
        "selection": stats,
        "render": {
            "jobs": len(jobs),
            "rendered": status_counts["rendered"],
            "reused": status_counts["reused"],
            "failed": status_counts["failed"],
            "workers": workers,
            "seconds": round(seconds, 2),
            "renders_per_second": round(status_counts["rendered"] / seconds, 1)
            if status_counts["rendered"]
            else None,
        },
        "failures": failures,
        "dropped_after_render": dict(after),
        "dropped_subgroups": small,
        "kept": {
            "subgroups": len(subgroups),
            "emoji": len(final),
            "sketches": sum(r.domain == "sketch" and r.artist == "openmoji" for r in records),
            "photos": sum(photos_per_artist.values()),
            "photos_per_artist": {a: photos_per_artist[a] for a in COLOUR_ARTISTS if a in photos_per_artist},
            "emoji_per_colour_artist_count": dict(sorted(Counter(len(a) for _, a in final).items())),
        },
        "splits": [s.name for s in splits],
        "styles": style_stats,
    }
    _atomic_write_text(out_dir / "build_report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    used = ["openmoji", *[a for a in COLOUR_ARTISTS[1:] if photos_per_artist.get(a)]]
    used += sorted(a for a in photos_per_artist if a not in COLOUR_ARTISTS)
    used += [k for k in STYLE_KEYS if style_counts.get(k)]
    _atomic_write_text(out_dir / "ATTRIBUTION.md", _attribution_text(sources.packages, used))
    return report


def _style_records(items, kept: Mapping[str, EmojiEntry], rel, ok) -> list[Record]:
    """Manifest records of the rendered style images. A "name" set's icon is a sketch of its emoji
    (category: the emoji's subgroup, instance: its codepoints), kept if the emoji is; a "pairs"
    set's line and colour icons are kept together, each pair its own instance and category."""
    role = {st.key: st.role for st in STYLE_SETS} | {st.colour.key: st.role for st in STYLE_SETS if st.colour}
    out: list[Record] = []
    pairs: dict[str, list[StyleItem]] = {}
    for item in items:
        if not item.hexcode:
            pairs.setdefault(item.name, []).append(item)
            continue
        e = kept.get(item.hexcode)
        if e is None or not ok(item):
            continue
        meta = {"emoji": e.emoji, "group": e.group, "subgroup": e.subgroup, "annotation": e.annotation,
                "icon": item.name, STYLE_SET_KEY: item.style, HELDOUT_KEY: "1" if role[item.style] == "heldout" else ""}
        out.append(Record(rel(item), "sketch", e.subgroup, e.hexcode, item.style, meta))
    for name, both in pairs.items():
        if len(both) != 2 or not all(ok(i) for i in both):
            continue
        line = next(i for i in both if i.domain == "sketch")
        label = f"{line.style}:{name}"
        for i in both:
            meta = {"icon": name, STYLE_SET_KEY: line.style, HELDOUT_KEY: "1" if role[i.style] == "heldout" else ""}
            out.append(Record(rel(i), i.domain, label, label, i.style, meta))
    return out


def format_build_summary(report: dict) -> str:
    k, r = report["kept"], report["render"]
    per_artist = ", ".join(f"{a} {n}" for a, n in k["photos_per_artist"].items())
    lines = [
        f"{k['emoji']} emoji in {k['subgroups']} subgroups: {k['sketches']} sketches, "
        f"{k['photos']} photos ({per_artist})",
        f"render: {r['rendered']} rendered, {r['reused']} reused, {r['failed']} failed "
        f"in {r['seconds']:.1f} s on {r['workers']} worker(s)",
    ]
    for key, st in report.get("styles", {}).items():
        joined = (f"{st['joined_by_name']} joined to emoji by name" if "joined_by_name" in st
                  else f"{st['pairs_by_name']} line/colour pairs")
        lines.append(f"style set {key} ({st['role']}): {st['images']} images kept, {joined}")
    if report["dropped_subgroups"]:
        small = ", ".join(f"{s} ({n})" for s, n in report["dropped_subgroups"].items())
        lines.append(f"dropped subgroups with too few emoji: {small}")
    if report["failures"]:
        lines.append(f"{len(report['failures'])} render failure(s), listed in build_report.json")
    return "\n".join(lines)


def build_emoji(
    out_dir: str | os.PathLike,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    progress: bool = True,
    styles: bool = True,
) -> dict:
    """Fetch the pinned packages into `out_dir/.cache/npm` (reusing verified tarballs) and build;
    `styles`: with the style sets (`STYLE_SETS`)."""
    out_dir = Path(out_dir)
    sources = fetch_packages(out_dir / ".cache" / "npm", styles=styles)
    return build_emoji_dataset(out_dir, sources, seeds=seeds, size=size, workers=workers, progress=progress)
