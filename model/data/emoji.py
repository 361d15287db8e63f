"""The cross-style emoji benchmark: OpenMoji line art (sketches) against four artists' colour emoji.

Sources are four npm packages, pinned by version and sha512 integrity (`PACKAGES`): OpenMoji gives
the black line art (the sketch domain) and its own colour art; Google Noto, Twitter Twemoji and
Microsoft Fluent (flat) come as Iconify JSON sets. Emoji are joined by codepoint sequence.

Kept: emoji with OpenMoji line art that at least two colour artists drew, without skin-tone
variants, flags, components and OpenMoji's extras; then subgroups with at least three such emoji.
The category of an image is its OpenMoji subgroup (about 90 classes, the zero-shot task); its
instance is the normalised codepoint sequence (the fine-grained task).

Layers, so each can be tested alone:
  fetch_packages(cache)           npm pack + integrity check + safe extraction -> EmojiSources
  select_emoji(sources)           the join and filters, no rendering -> [EmojiEntry], stats
  render_jobs(jobs, workers)      cairosvg in a process pool, resumable, failures reported
  build_emoji_dataset(out, src)   all of the above + manifest, splits, report, attribution
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

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
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# What is fetched, and who drew it


@dataclass(frozen=True)
class NpmPackage:
    key: str
    name: str
    version: str
    integrity: str  # "sha512-<base64>", as in package-lock.json

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        """The file name `npm pack` gives the tarball ("@scope/name" -> "scope-name-1.2.3.tgz")."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


OPENMOJI = NpmPackage(
    "openmoji",
    "openmoji",
    "17.0.0",
    "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
)
ICONIFY_PACKAGES: dict[str, NpmPackage] = {
    "noto": NpmPackage(
        "noto",
        "@iconify-json/noto",
        "1.2.9",
        "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw==",
    ),
    "twemoji": NpmPackage(
        "twemoji",
        "@iconify-json/twemoji",
        "1.2.5",
        "sha512-uKpuIEV0v6K5BW3Mjdyl+XKFVAbbcPxAgifKvEMtZoUZB5+YiY5zaMm2uNNCxyXzAWU9yNLlj41WU6/mvgALsw==",
    ),
    "fluent": NpmPackage(
        "fluent",
        "@iconify-json/fluent-emoji-flat",
        "1.2.6",
        "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
    ),
}


@dataclass(frozen=True)
class StyleSet:
    """More drawing styles beside OpenMoji's line art, each from a pinned Iconify JSON package.

    `join` "name": icons named by the emoji's CLDR short name (lower case, spaces to hyphens) are
    sketches of that emoji, against the benchmark's colour gallery. `join` "pairs": line icons
    against the colour icons of the same name in `colour` (another image domain, no emoji).
    `role` "train": training may use the set (its seen-class icons, as any sketch); "heldout": never
    trained on or chosen by (the manifest marks its records `heldout=1`).
    """

    key: str  # the manifest's artist
    package: NpmPackage
    role: str
    join: str
    title: str
    by: str
    licence: str
    url: str
    what: str
    colour: NpmPackage | None = None


STYLE_SETS: tuple[StyleSet, ...] = (
    StyleSet(
        "tabler",
        NpmPackage("tabler", "@iconify-json/tabler", "1.2.41",
                   "sha512-GHg+H/cnr0anaCoV383JONiOMxZQOdojWYNLgL3x0fRE07YW7c+AHiYmIhXet//oq26T830qitdP7l43ojiCXw=="),
        "train", "name", "Tabler Icons", "Paweł Kuna", "MIT", "https://github.com/tabler/tabler-icons",
        "uniform-stroke outline icons",
    ),
    StyleSet(
        "lucide",
        NpmPackage("lucide", "@iconify-json/lucide", "1.2.137",
                   "sha512-uKz1+tFbv1RFX/mJQNksdnyKJijNfRGSNnxfiyKtr+dLNfA3ERph+IgpXClKGOlV/5GsZwLv2jgJXQ/bjF/JAg=="),
        "heldout", "name", "Lucide", "Lucide Contributors", "ISC", "https://github.com/lucide-icons/lucide",
        "thin-stroke outline icons",
    ),
    StyleSet(
        "emojione",
        NpmPackage("emojione", "@iconify-json/emojione-monotone", "1.2.1",
                   "sha512-cZSNcPsuiAD6HCzCh/2dYKGh3pNI0jJlxBxQWfC33cQsPtqYZqulGBvlkThXYNvDl8VxgVHT9u+izyX/yeEIkA=="),
        "heldout", "name", "EmojiOne (monotone)", "Emoji One", "CC-BY-4.0", "https://github.com/EmojiTwo/emojitwo",
        "filled black silhouettes of emoji",
    ),
    StyleSet(
        "streamline",
        NpmPackage("streamline", "@iconify-json/streamline-ultimate", "1.2.2",
                   "sha512-0Vz9UHgMrmRUYt3JFqm0E6PDdroItVqK4fKf3T72jVwS2MAmc8dcqvCy+f0hzOVzJfo3G34ejFA9Y8l/K44hTQ=="),
        "heldout", "pairs", "Streamline Ultimate", "Streamline (webalys)", "CC-BY-4.0",
        "https://github.com/webalys-hq/streamline-vectors", "line icons against their own colour versions",
        colour=NpmPackage("streamline-color", "@iconify-json/streamline-ultimate-color", "1.2.2",
                          "sha512-NAbD3xLtg3069865B5CLUulp/eowPNCiDfJBxVAmA+LKLPpxU7EIEJ2+mSfWriPd+ahORWyqjRnoPVkTJopEgg=="),
    ),
)  # fmt: skip
STYLE_ARTISTS = {st.key: (st.title, st.by, st.licence, st.url) for st in STYLE_SETS} | {
    st.colour.key: (f"{st.title} (colour)", st.by, st.licence, st.url) for st in STYLE_SETS if st.colour
}
STYLE_KEYS = tuple(STYLE_ARTISTS)
HELDOUT_STYLES = tuple(s.key for s in STYLE_SETS if s.role == "heldout")
PACKAGES: tuple[NpmPackage, ...] = (OPENMOJI, *ICONIFY_PACKAGES.values())
STYLE_PACKAGES: tuple[NpmPackage, ...] = tuple(
    p for st in STYLE_SETS for p in (st.package, st.colour) if p is not None
)

# Colour artists in manifest order; "openmoji" is also the sketch artist.
COLOUR_ARTISTS = ("openmoji", "noto", "twemoji", "fluent")
ARTISTS = {
    "openmoji": (
        "OpenMoji",
        "the OpenMoji project (HfG Schwäbisch Gmünd) and its contributors",
        "CC-BY-SA-4.0",
        "https://openmoji.org",
    ),
    "noto": ("Noto Emoji", "Google Inc.", "Apache-2.0", "https://github.com/googlefonts/noto-emoji"),
    "twemoji": (
        "Twemoji",
        "Twitter, Inc. and other contributors",
        "CC-BY-4.0",
        "https://github.com/twitter/twemoji",
    ),
    "fluent": (
        "Fluent Emoji (flat)",
        "Microsoft Corporation",
        "MIT",
        "https://github.com/microsoft/fluentui-emoji",
    ),
}

DROP_GROUPS = frozenset({"flags", "component", "extras-openmoji", "extras-unicode"})
MIN_COLOUR_ARTISTS = 2
MIN_PER_SUBGROUP = 3
DEFAULT_SIZE = 256
DEFAULT_SEEDS = (0, 1, 2)
FE0F = 0xFE0F


# --------------------------------------------------------------------------------------------------
# Fetching: npm pack, integrity, safe extraction


def integrity_of(path: str | os.PathLike) -> str:
    """The npm-style integrity string ("sha512-<base64>") of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def fetch_tarball(pkg: NpmPackage, cache_dir: str | os.PathLike) -> Path:
    """`cache_dir/<tarball>` for `pkg`, packed by npm unless a copy with the right sha512 is there.

    Raises `UserError` when npm is missing or fails, or when the tarball's sha512 is not the pinned one.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / pkg.tarball_name
    if tarball.is_file() and integrity_of(tarball) == pkg.integrity:
        LOG.info("%s: cached tarball %s verified", pkg.spec, tarball)
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(
            f"npm not found: install Node.js/npm, or put {pkg.tarball_name} ({pkg.spec}) into {cache_dir}"
        )
    LOG.info("npm pack %s", pkg.spec)
    try:
        proc = subprocess.run(
            [npm, "pack", pkg.spec, "--pack-destination", str(cache_dir), "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"npm pack {pkg.spec} did not finish within 10 minutes") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UserError(f"npm pack {pkg.spec} failed (exit {proc.returncode}): " + " | ".join(tail))
    packed = tarball
    try:
        info = json.loads(proc.stdout)
        if isinstance(info, list) and info and info[0].get("filename"):
            packed = cache_dir / Path(info[0]["filename"]).name
    except (json.JSONDecodeError, AttributeError, TypeError):
        pass
    if not packed.is_file():
        raise UserError(f"npm pack {pkg.spec} succeeded but {packed} is not there")
    if packed != tarball:
        os.replace(packed, tarball)
    got = integrity_of(tarball)
    if got != pkg.integrity:
        raise UserError(
            f"integrity mismatch for {pkg.spec} ({tarball}): expected {pkg.integrity}, got {got}. "
            "The registry served different bytes than the pinned release; refusing to use them."
        )
    return tarball


def safe_extract(tarball: str | os.PathLike, dest: str | os.PathLike, keep=None) -> Path:
    """Extract regular files and folders of `tarball` into `dest`, refusing any member whose name is
    absolute or climbs out with "..", and skipping links and device files. `keep(name) -> bool`
    selects members (all by default). Extraction goes to a temporary folder that replaces `dest`.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts or "\\" in member.name:
                    raise UserError(f"{tarball}: unsafe member name {member.name!r}; refusing to extract")
                if not (member.isfile() or member.isdir()):
                    LOG.warning("%s: skipping %s (not a regular file)", tarball, member.name)
                    continue
                if keep is not None and not keep(member.name):
                    continue
                target = tmp.joinpath(*name.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _keep_openmoji_member(name: str) -> bool:
    return name.startswith(("package/black/svg/", "package/color/svg/")) or name in (
        "package/data/openmoji.json",
        "package/LICENSE.txt",
        "package/package.json",
    )


def fetch_package(pkg: NpmPackage, cache_dir: str | os.PathLike) -> Path:
    """The extracted `package/` folder of `pkg` under `cache_dir/extracted`, fetched when needed."""
    cache_dir = Path(cache_dir)
    tarball = fetch_tarball(pkg, cache_dir)
    dest = cache_dir / "extracted" / tarball.name.removesuffix(".tgz")
    stamp = dest / ".integrity"
    if stamp.is_file() and stamp.read_text().strip() == pkg.integrity:
        return dest / "package"
    keep = _keep_openmoji_member if pkg.key == "openmoji" else None
    safe_extract(tarball, dest, keep=keep)
    if not (dest / "package").is_dir():
        raise UserError(f"{tarball}: no package/ folder inside")
    stamp.write_text(pkg.integrity + "\n")
    return dest / "package"


@dataclass
class EmojiSources:
    """Extracted package folders: OpenMoji's `package/`, and each Iconify set's `package/` by artist."""

    openmoji: Path
    iconify: dict[str, Path] = field(default_factory=dict)
    packages: dict[str, dict] = field(default_factory=dict)  # for the report: name, version, integrity
    styles: dict[str, Path] = field(default_factory=dict)  # StyleSet package key -> its package/ folder


def fetch_packages(cache_dir: str | os.PathLike, styles: bool = True) -> EmojiSources:
    """Fetch (or reuse) and extract all pinned packages (with `styles`, the style sets' too)."""
    pkgs = PACKAGES + (STYLE_PACKAGES if styles else ())
    info = {p.key: {"name": p.name, "version": p.version, "integrity": p.integrity} for p in pkgs}
    return EmojiSources(
        openmoji=fetch_package(OPENMOJI, cache_dir),
        iconify={key: fetch_package(pkg, cache_dir) for key, pkg in ICONIFY_PACKAGES.items()},
        packages=info,
        styles={p.key: fetch_package(p, cache_dir) for p in (STYLE_PACKAGES if styles else ())},
    )


# --------------------------------------------------------------------------------------------------
# Codepoints and Iconify sets


def normalize_hexcode(hexcode: str) -> str:
    """ "1F636-200D-1F32B-FE0F" -> "1f636-200d-1f32b": lowercase, FE0F dropped, 4-digit minimum."""
    parts = []
    for p in hexcode.replace("_", "-").split("-"):
        p = p.strip()
        if not p:
            continue
        cp = int(p, 16)
        if cp != FE0F:
            parts.append(f"{cp:04x}")
    if not parts:
        raise ValueError(f"no codepoint in {hexcode!r}")
    return "-".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class IconifySet:
    """An Iconify JSON icon set (icons.json + chars.json of an @iconify-json package)."""

    TRANSFORMS = ("rotate", "hFlip", "vFlip")
    MAX_ALIAS_DEPTH = 16

    def __init__(self, package_dir: str | os.PathLike, need_chars: bool = True):
        package_dir = Path(package_dir)
        try:
            data = json.loads((package_dir / "icons.json").read_text(encoding="utf-8"))
            chars_path = package_dir / "chars.json"
            chars = json.loads(chars_path.read_text(encoding="utf-8")) if need_chars or chars_path.is_file() else {}
        except FileNotFoundError as exc:
            raise UserError(f"{package_dir} is not an Iconify JSON package: {exc.filename} missing") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{package_dir}: malformed JSON: {exc}") from None
        self.prefix = data.get("prefix", package_dir.name)
        self.icons: dict[str, dict] = data.get("icons", {})
        self.aliases: dict[str, dict] = data.get("aliases", {})
        self.defaults = {
            "left": data.get("left", 0),
            "top": data.get("top", 0),
            "width": data.get("width", 16),
            "height": data.get("height", 16),
        }
        self.chars: dict[str, str] = {}
        self.bad_chars: list[str] = []
        for code, name in chars.items():
            try:
                self.chars.setdefault(normalize_hexcode(code), name)
            except ValueError:
                self.bad_chars.append(code)

    def resolve(self, name: str) -> dict:
        """The icon's full data (body, left, top, width, height, rotate, hFlip, vFlip), following
        aliases: an alias overrides its parent's dimensions and adds to its transformations."""
        chain = []
        while name not in self.icons:
            if name not in self.aliases:
                raise KeyError(name)
            if len(chain) >= self.MAX_ALIAS_DEPTH:
                raise KeyError(f"{name}: alias chain too long or circular")
            chain.append(self.aliases[name])
            name = self.aliases[name].get("parent", "")
        icon = {"rotate": 0, "hFlip": False, "vFlip": False, **self.defaults, **self.icons[name]}
        for alias in reversed(chain):  # from the one nearest the icon out to the requested name
            for key, value in alias.items():
                if key == "parent":
                    continue
                if key == "rotate":
                    icon["rotate"] = (icon["rotate"] + int(value)) % 4
                elif key in ("hFlip", "vFlip"):
                    icon[key] = bool(icon[key]) != bool(value)
                else:
                    icon[key] = value
        return icon

    def has(self, name: str) -> bool:
        return name in self.icons or name in self.aliases

    def svg(self, name: str) -> str:
        """A standalone SVG document for icon `name`."""
        icon = self.resolve(name)
        body = icon["body"]
        left, top = float(icon["left"]), float(icon["top"])
        width, height = float(icon["width"]), float(icon["height"])
        flips = []
        if icon["hFlip"]:
            flips.append(f"translate({_num(2 * left + width)} 0) scale(-1 1)")
        if icon["vFlip"]:
            flips.append(f"translate(0 {_num(2 * top + height)}) scale(1 -1)")
        if flips:
            body = f'<g transform="{" ".join(flips)}">{body}</g>'
        quarter = int(icon["rotate"]) % 4
        if quarter:
            cx, cy = left + width / 2, top + height / 2
            body = f'<g transform="rotate({90 * quarter} {_num(cx)} {_num(cy)})">{body}</g>'
            if quarter % 2:
                left, top, width, height = cx - height / 2, cy - width / 2, height, width
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{_num(left)} {_num(top)} {_num(width)} {_num(height)}">{body}</svg>'
        )


# --------------------------------------------------------------------------------------------------
# The join and the filters


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


# --------------------------------------------------------------------------------------------------
# Rendering


class RenderError(Exception):
    pass


def render_svg(svg: bytes | str, size: int) -> bytes:
    """Render SVG to a `size` x `size` RGB PNG (aspect kept, centred, white background).

    External resources are never fetched (cairosvg's safe mode). Raises `RenderError` when the SVG
    does not parse, does not render or renders blank.
    """
    import cairosvg
    from PIL import Image

    from model.images import to_rgb

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
    from PIL import Image

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
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def render_jobs(
    jobs: Iterable[RenderJob], workers: int | None = None, progress: bool = True
) -> dict[str, tuple[str, str]]:
    """Run the jobs in a process pool (in-process for workers=1). Returns dest -> (status, reason)."""
    from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------------
# The whole build


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
