"""Which emoji and style icons the benchmark keeps: the join by codepoint or name, and the filters
(no rendering)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.data.emoji.fetch import EmojiSources
from model.data.emoji.parse import IconifySet, normalize_hexcode
from model.data.emoji.sources import STYLE_SETS
from model.ground.errors import UserError

DROP_GROUPS = frozenset({"flags", "component", "extras-openmoji", "extras-unicode"})
MIN_COLOUR_ARTISTS = 2


@dataclass
class EmojiEntry:
    """One kept emoji with where each of its images comes from (a file, or SVG text)."""

    hexcode: str  # normalised
    emoji: str
    group: str
    subgroup: str
    annotation: str
    sketch_svg: Path  # OpenMoji black line art
    colour: dict[str, Path | str] = field(default_factory=dict)  # artist -> SVG file or SVG text


def _index_svgs(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.svg")):
        try:
            out.setdefault(normalize_hexcode(p.stem), p)
        except ValueError:
            continue
    return out


def select_emoji(
    sources: EmojiSources,
    min_colour_artists: int = MIN_COLOUR_ARTISTS,
) -> tuple[list[EmojiEntry], dict]:
    """Join OpenMoji with the Iconify sets by codepoint and apply the filters (not the subgroup size
    filter, which follows rendering). Returns the entries in OpenMoji order and the drop counts."""
    om_dir = Path(sources.openmoji)
    meta_path = om_dir / "data" / "openmoji.json"
    try:
        entries = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{om_dir} is not the OpenMoji package: data/openmoji.json missing") from None
    black = _index_svgs(om_dir / "black" / "svg")
    color = _index_svgs(om_dir / "color" / "svg")
    if not black:
        raise UserError(f"{om_dir}/black/svg holds no SVG files")
    sets = {artist: IconifySet(path) for artist, path in sources.iconify.items()}

    dropped: Counter[str] = Counter()
    unresolved: list[dict] = []
    seen: set[str] = set()
    kept: list[EmojiEntry] = []
    for e in entries:
        if str(e.get("skintone", "")).strip():
            dropped["skin_tone_variant"] += 1
            continue
        group = e.get("group", "")
        if group in DROP_GROUPS:
            dropped[f"group:{group}"] += 1
            continue
        try:
            code = normalize_hexcode(e["hexcode"])
        except (KeyError, ValueError):
            dropped["bad_hexcode"] += 1
            continue
        if code in seen:
            dropped["duplicate_codepoints"] += 1
            continue
        seen.add(code)
        if code not in black:
            dropped["no_line_art"] += 1
            continue
        colour: dict[str, Path | str] = {}
        if code in color:
            colour["openmoji"] = color[code]
        for artist, iconset in sets.items():
            name = iconset.chars.get(code)
            if name is None:
                continue
            try:
                colour[artist] = iconset.svg(name)
            except KeyError as exc:
                unresolved.append({"artist": artist, "hexcode": code, "icon": name, "reason": str(exc)})
        if len(colour) < min_colour_artists:
            dropped[f"fewer_than_{min_colour_artists}_colour_artists"] += 1
            continue
        kept.append(
            EmojiEntry(
                hexcode=code,
                emoji=e.get("emoji", ""),
                group=group,
                subgroup=e.get("subgroups", "") or "unknown",
                annotation=e.get("annotation", ""),
                sketch_svg=black[code],
                colour=colour,
            )
        )
    stats = {
        "openmoji_entries": len(entries),
        "dropped": dict(sorted(dropped.items())),
        "unresolved_icons": unresolved,
        "candidates": len(kept),
        "candidates_per_artist": dict(Counter(a for k in kept for a in k.colour)),
    }
    return kept, stats


def cldr_icon_name(annotation: str) -> str:
    """The icon name an emoji's CLDR short name gives: lower case, spaces to hyphens ("hot dog" ->
    "hot-dog"), the join rule of the style sets."""
    return annotation.strip().lower().replace(" ", "-")


@dataclass
class StyleItem:
    """One image of a style set: a sketch of an emoji, or one side of a line/colour icon pair."""

    style: str
    domain: str
    name: str  # the icon's name in its set
    svg: str
    hexcode: str = ""  # the emoji it shows ("pairs" sets: none)


def select_style_items(sources: EmojiSources, entries: Sequence[EmojiEntry]) -> tuple[list[StyleItem], dict]:
    """The style sets' icons joined to the kept emoji by name, and the line/colour pairs."""
    items: list[StyleItem] = []
    stats: dict[str, dict] = {}
    for st in STYLE_SETS:
        if st.package.key not in sources.styles:
            continue
        icons = IconifySet(sources.styles[st.package.key], need_chars=False)
        if st.join == "name":
            n = 0
            for e in entries:
                name = cldr_icon_name(e.annotation)
                if name and icons.has(name):
                    items.append(StyleItem(st.key, "sketch", name, icons.svg(name), e.hexcode))
                    n += 1
            stats[st.key] = {"joined_by_name": n, "icons_in_set": len(icons.icons)}
        else:
            assert st.colour is not None, st.key
            colour = IconifySet(sources.styles[st.colour.key], need_chars=False)
            names = sorted(set(icons.icons) & set(colour.icons))
            for name in names:
                items.append(StyleItem(st.key, "sketch", name, icons.svg(name)))
                items.append(StyleItem(st.colour.key, "photo", name, colour.svg(name)))
            stats[st.key] = {"pairs_by_name": len(names), "icons_in_set": len(icons.icons),
                             "colour_icons_in_set": len(colour.icons)}
    return items, stats
