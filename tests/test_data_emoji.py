"""The emoji benchmark builder on a tiny fake package tree (no network, no npm)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from model.data import emoji as em
from model.data.dataset import format_dataset_summary, list_splits, read_manifest, read_split
from model.ground.errors import UserError

LINE = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="24" fill="none" stroke="#000" stroke-width="4"/></svg>'
BLANK = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><g id="line"/></svg>'
COLOUR = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="24" fill="#fc0"/></svg>'
RED_LEFT = '<rect x="0" y="0" width="8" height="16" fill="#f00"/>'  # left half of a 16x16 icon
GREEN = '<circle cx="8" cy="8" r="6" fill="#0a0"/>'
BROKEN = '<path d="M0 0 L10 10"'  # unclosed tag: not XML

# hexcode, group, subgroup, annotation, skintone, has black, has colour
OPENMOJI = [
    ("1F600", "smileys-emotion", "face-smiling", "grinning face", "", LINE, COLOUR),
    ("1F601", "smileys-emotion", "face-smiling", "beaming face", "", LINE, COLOUR),
    ("263A-FE0F", "smileys-emotion", "face-smiling", "smiling face", "", LINE, COLOUR),
    ("1F449", "people-body", "hand-single-finger", "pointing right", "", LINE, None),
    ("1F446", "people-body", "hand-single-finger", "pointing up", "", LINE, COLOUR),
    ("1F447", "people-body", "hand-single-finger", "pointing down", "", LINE, COLOUR),
    ("1F431", "animals-nature", "animal-mammal", "cat face", "", LINE, COLOUR),
    ("1F436", "animals-nature", "animal-mammal", "dog face", "", LINE, COLOUR),
    ("1F42D", "animals-nature", "animal-mammal", "mouse face", "", LINE, COLOUR),
    ("1F430", "animals-nature", "animal-mammal", "rabbit face", "", BLANK, COLOUR),  # line art blank
    ("1F34E", "food-drink", "food-fruit", "red apple", "", LINE, COLOUR),
    ("1F350", "food-drink", "food-fruit", "pear", "", LINE, COLOUR),
    ("1F44B-1F3FB", "people-body", "hand-fingers-open", "waving hand: light", 1, LINE, COLOUR),
    ("1F1E9-1F1EA", "flags", "country-flag", "flag: Germany", "", LINE, COLOUR),
    ("1F680", "travel-places", "transport-air", "rocket", "", None, COLOUR),
    ("1F697", "travel-places", "transport-ground", "automobile", "", LINE, None),
]
# which Iconify sets draw what: hexcode (as in chars.json) -> icon name
NOTO = {
    "1f600": "grin",
    "1f601": "beam",
    "263a": "smile",
    "1f446": "up",
    "1f447": "down",
    "1f431": "cat",
    "1f436": "dog",
    "1f42d": "mouse",
    "1f430": "rabbit",
    "1f34e": "apple",
    "1f350": "pear",
    "1f697": "car",
    "1f449": "right",
}
TWEMOJI = {"1f600": "grin", "1f431": "cat", "1f42d": "mouse", "1f436": "dog"}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _iconify(root: Path, prefix: str, chars: dict, icons: dict, aliases: dict | None = None, **dims) -> Path:
    root.mkdir(parents=True)
    _write(
        root / "icons.json", json.dumps({"prefix": prefix, "icons": icons, "aliases": aliases or {}, **dims})
    )
    _write(root / "chars.json", json.dumps(chars))
    return root


@pytest.fixture
def sources(tmp_path) -> em.EmojiSources:
    om = tmp_path / "openmoji"
    entries = []
    for hexcode, group, subgroup, annotation, skintone, black, colour in OPENMOJI:
        if black is not None:
            _write(om / "black" / "svg" / f"{hexcode}.svg", black)
        if colour is not None:
            _write(om / "color" / "svg" / f"{hexcode}.svg", colour)
        entries.append(
            {
                "emoji": "".join(chr(int(h, 16)) for h in hexcode.split("-")),
                "hexcode": hexcode,
                "group": group,
                "subgroups": subgroup,
                "annotation": annotation,
                "skintone": skintone,
            }
        )
    _write(om / "data" / "openmoji.json", json.dumps(entries))
    noto_icons = {name: {"body": GREEN} for name in NOTO.values()}
    noto_icons["mouse"] = {"body": BROKEN}
    noto = _iconify(tmp_path / "noto", "noto", NOTO, noto_icons, width=16, height=16)
    twemoji = _iconify(
        tmp_path / "twemoji", "twemoji", TWEMOJI, {n: {"body": GREEN} for n in TWEMOJI.values()}, width=16
    )
    fluent = _iconify(
        tmp_path / "fluent",
        "fluent",
        {"1f600": "grin", "1f449": "point-right"},
        {"grin": {"body": GREEN, "width": 32, "height": 16}, "point-left": {"body": RED_LEFT}},
        aliases={"point-right": {"parent": "point-left", "hFlip": True}},
        width=16,
        height=16,
    )
    return em.EmojiSources(openmoji=om, iconify={"noto": noto, "twemoji": twemoji, "fluent": fluent})


def test_normalize_hexcode():
    assert em.normalize_hexcode("1F636-200D-1F32B-FE0F") == "1f636-200d-1f32b"
    assert em.normalize_hexcode("263A-FE0F") == "263a"
    assert em.normalize_hexcode("0023-FE0F-20E3") == em.normalize_hexcode("23-20e3") == "0023-20e3"
    with pytest.raises(ValueError):
        em.normalize_hexcode("FE0F")


def test_select_emoji_join_and_filters(sources):
    entries, stats = em.select_emoji(sources)
    codes = [e.hexcode for e in entries]
    assert codes == [
        "1f600", "1f601", "263a", "1f449", "1f446", "1f447",
        "1f431", "1f436", "1f42d", "1f430", "1f34e", "1f350",
    ]  # fmt: skip
    assert stats["dropped"] == {
        "skin_tone_variant": 1,
        "group:flags": 1,
        "no_line_art": 1,
        "fewer_than_2_colour_artists": 1,
    }
    by_code = {e.hexcode: e for e in entries}
    assert set(by_code["1f600"].colour) == {"openmoji", "noto", "twemoji", "fluent"}
    assert set(by_code["263a"].colour) == {"openmoji", "noto"}  # FE0F on one side only
    assert set(by_code["1f449"].colour) == {"noto", "fluent"}  # no OpenMoji colour, two others
    assert by_code["263a"].emoji == "\u263a\ufe0f" and by_code["263a"].subgroup == "face-smiling"
    assert isinstance(by_code["1f600"].colour["openmoji"], Path)
    assert by_code["1f600"].colour["noto"].startswith('<svg xmlns="http://www.w3.org/2000/svg"')


def test_iconify_svg_dimensions_and_aliases(sources):
    fluent = em.IconifySet(sources.iconify["fluent"])
    assert 'viewBox="0 0 32 16"' in fluent.svg("grin")  # per-icon width wins over the set's
    flipped = fluent.svg("point-right")
    assert 'transform="translate(16 0) scale(-1 1)"' in flipped
    twemoji = em.IconifySet(sources.iconify["twemoji"])
    assert 'viewBox="0 0 16 16"' in twemoji.svg("cat")  # no height in the set: 16
    with pytest.raises(KeyError):
        fluent.svg("nope")


def test_iconify_rotation_swaps_the_view_box(tmp_path):
    root = _iconify(
        tmp_path / "set",
        "x",
        {},
        {"wide": {"body": GREEN, "width": 20, "height": 10}},
        aliases={"turned": {"parent": "wide", "rotate": 1}, "twice": {"parent": "turned", "rotate": 1}},
    )
    s = em.IconifySet(root)
    assert s.resolve("twice")["rotate"] == 2
    svg = s.svg("turned")
    assert 'viewBox="5 -5 10 20"' in svg and "rotate(90 10 5)" in svg


def _png(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def test_build_renders_filters_and_reports(sources, tmp_path):
    out = tmp_path / "emoji"
    report = em.build_emoji_dataset(out, sources, seeds=(0, 1), size=48, workers=2, progress=False)

    # broken noto SVG and blank OpenMoji line art: skipped and reported, the build went on
    failures = {f["path"]: f["reason"] for f in report["failures"]}
    assert set(failures) == {"images/photo/noto/1f42d.png", "images/sketch/openmoji/1f430.png"}
    assert "blank" in failures["images/sketch/openmoji/1f430.png"]
    assert report["render"]["failed"] == 2
    assert report["dropped_after_render"] == {"line_art_failed_to_render": 1}
    # food-fruit has 2 emoji: dropped; the others have 3
    assert report["dropped_subgroups"] == {"food-fruit": 2}
    on_disk = json.loads((out / "build_report.json").read_text())
    assert on_disk["failures"] == report["failures"]

    records = read_manifest(out)
    sketches = {r.instance for r in records if r.domain == "sketch"}
    assert sketches == {"1f600", "1f601", "263a", "1f449", "1f446", "1f447", "1f431", "1f436", "1f42d"}
    assert {r.category for r in records} == {"face-smiling", "hand-single-finger", "animal-mammal"}
    mouse = sorted(r.artist for r in records if r.instance == "1f42d" and r.domain == "photo")
    assert mouse == ["openmoji", "twemoji"]  # noto's broken SVG left out, still 2 artists
    assert all(r.artist == "openmoji" for r in records if r.domain == "sketch")
    assert report["kept"]["photos_per_artist"] == {"openmoji": 8, "noto": 8, "twemoji": 4, "fluent": 2}
    rec = next(r for r in records if r.instance == "263a" and r.domain == "sketch")
    assert rec.path == "images/sketch/openmoji/263a.png"
    assert rec.meta == {"emoji": "\u263a\ufe0f", "group": "smileys-emotion", "subgroup": "face-smiling",
                        "annotation": "smiling face"}  # fmt: skip

    # images: RGB PNGs of the requested size on white
    for r in records:
        img = _png(out / r.path)
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (48, 48)
        assert img.getpixel((0, 0)) == (255, 255, 255) or r.artist == "fluent"
    # the hFlip alias really flips: red on the right half, white on the left
    right = _png(out / "images/photo/fluent/1f449.png")
    assert right.getpixel((40, 24))[0] > 200 and right.getpixel((40, 24))[1] < 60
    assert right.getpixel((6, 24)) == (255, 255, 255)
    # a 32x16 icon is letterboxed, not stretched
    wide = _png(out / "images/photo/fluent/1f600.png")
    assert wide.getpixel((24, 2)) == (255, 255, 255)

    # splits: one per seed over the kept subgroups
    splits = list_splits(out)
    assert list(splits) == ["category_seed0", "category_seed1"]
    s0 = read_split(splits["category_seed0"])
    assert s0.classes == {"face-smiling", "hand-single-finger", "animal-mammal"}
    assert len(s0.unseen) == 1

    attribution = (out / "ATTRIBUTION.md").read_text()
    for licence in ("CC-BY-SA-4.0", "Apache-2.0", "CC-BY-4.0", "MIT"):
        assert licence in attribution

    # a second run reuses every finished render and rewrites the same manifest
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    manifest = (out / "manifest.csv").read_text()
    again = em.build_emoji_dataset(out, sources, seeds=(0, 1), size=48, workers=1, progress=False)
    assert again["render"]["rendered"] == 0
    assert again["render"]["reused"] == report["render"]["rendered"]
    assert again["render"]["failed"] == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert (out / "manifest.csv").read_text() == manifest
    assert not list((out / "images").rglob("*.tmp"))

    # a different size re-renders
    third = em.build_emoji_dataset(out, sources, seeds=(0,), size=32, workers=1, progress=False)
    assert third["render"]["reused"] == 0
    assert _png(out / "images/sketch/openmoji/1f600.png").size == (32, 32)


def test_render_svg_rejects_garbage():
    with pytest.raises(em.RenderError):
        em.render_svg(b"<svg", 32)
    with pytest.raises(em.RenderError, match="blank"):
        em.render_svg(BLANK, 32)
    png = em.render_svg(COLOUR, 32)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_manifest_columns(sources, tmp_path):
    em.build_emoji_dataset(tmp_path / "e", sources, seeds=(0,), size=24, workers=1, progress=False)
    with (tmp_path / "e" / "manifest.csv").open(encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == [
        "path",
        "domain",
        "category",
        "instance",
        "artist",
        "emoji",
        "group",
        "subgroup",
        "annotation",
    ]


# -- fetching ------------------------------------------------------------------------------------


def _tarball(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_pinned_packages():
    assert [p.spec for p in em.PACKAGES] == [
        "openmoji@17.0.0",
        "@iconify-json/noto@1.2.9",
        "@iconify-json/twemoji@1.2.5",
        "@iconify-json/fluent-emoji-flat@1.2.6",
    ]
    assert em.ICONIFY_PACKAGES["noto"].tarball_name == "iconify-json-noto-1.2.9.tgz"
    assert all(p.integrity.startswith("sha512-") for p in em.PACKAGES)


def test_fetch_uses_a_verified_cached_tarball_without_npm(tmp_path, monkeypatch):
    tgz = _tarball(tmp_path / "x-1.0.0.tgz", {"package/icons.json": b"{}"})
    pkg = em.NpmPackage("x", "x", "1.0.0", _integrity(tgz.read_bytes()))
    assert em.integrity_of(tgz) == pkg.integrity

    def no_npm(*a, **k):
        raise AssertionError("npm must not run when the cached tarball verifies")

    monkeypatch.setattr(subprocess, "run", no_npm)
    assert em.fetch_tarball(pkg, tmp_path) == tgz
    package_dir = em.fetch_package(pkg, tmp_path)
    assert (package_dir / "icons.json").read_text() == "{}"
    assert em.fetch_package(pkg, tmp_path) == package_dir  # extracted copy reused


def _fake_npm(monkeypatch, payload: bytes, calls: list):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/npm")

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / "x-1.0.0.tgz").write_bytes(payload)
        return subprocess.CompletedProcess(
            cmd, 0, stdout=json.dumps([{"filename": "x-1.0.0.tgz"}]), stderr=""
        )

    monkeypatch.setattr(subprocess, "run", run)


def test_fetch_packs_with_npm_and_checks_integrity(tmp_path, monkeypatch):
    good = _tarball(tmp_path / "good.tgz", {"package/a.txt": b"a"}).read_bytes()
    pkg = em.NpmPackage("x", "x", "1.0.0", _integrity(good))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "x-1.0.0.tgz").write_bytes(b"stale or tampered")
    calls: list = []
    _fake_npm(monkeypatch, good, calls)
    assert em.fetch_tarball(pkg, cache).read_bytes() == good
    assert calls and calls[0][1:3] == ["pack", "x@1.0.0"]


def test_fetch_refuses_an_integrity_mismatch(tmp_path, monkeypatch):
    pkg = em.NpmPackage("x", "x", "1.0.0", _integrity(b"the pinned bytes"))
    _fake_npm(monkeypatch, b"other bytes", [])
    with pytest.raises(UserError, match="integrity mismatch for x@1.0.0"):
        em.fetch_tarball(pkg, tmp_path)


def test_fetch_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="npm not found"):
        em.fetch_tarball(em.OPENMOJI, tmp_path)


def test_safe_extract_refuses_path_traversal(tmp_path):
    tgz = _tarball(tmp_path / "evil.tgz", {"package/ok.txt": b"ok", "../../evil.txt": b"x"})
    with pytest.raises(UserError, match="unsafe member"):
        em.safe_extract(tgz, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()
    tgz = _tarball(tmp_path / "abs.tgz", {"/etc/evil": b"x"})
    with pytest.raises(UserError, match="unsafe member"):
        em.safe_extract(tgz, tmp_path / "out")


def test_safe_extract_skips_links(tmp_path):
    tgz = _tarball(tmp_path / "l.tgz", {"package/ok.txt": b"ok"}, links={"package/link": "/etc/passwd"})
    out = em.safe_extract(tgz, tmp_path / "out")
    assert (out / "package" / "ok.txt").read_bytes() == b"ok"
    assert not (out / "package" / "link").exists()


LINE_ICON = '<path fill="none" stroke="currentColor" stroke-width="2" d="M4 4h16v16H4z"/>'


def test_style_sets_join_by_name_and_mark_held_out_records(sources, tmp_path):
    """A training style joined by CLDR name, a held-out one, and a line/colour pair set."""
    sources.styles = {
        "tabler": _iconify(tmp_path / "tabler", "tabler", {}, {"cat-face": {"body": LINE_ICON},
                                                               "grinning-face": {"body": LINE_ICON}}, width=24),
        "lucide": _iconify(tmp_path / "lucide", "lucide", {}, {"dog-face": {"body": LINE_ICON}},
                           aliases={"grinning-face": {"parent": "dog-face"}}, width=24),
        "emojione": _iconify(tmp_path / "emojione", "emojione", {}, {}, width=64),
        "streamline": _iconify(tmp_path / "sl", "sl", {}, {"rocket": {"body": LINE_ICON},
                                                           "only-line": {"body": LINE_ICON}}, width=24),
        "streamline-color": _iconify(tmp_path / "slc", "slc", {}, {"rocket": {"body": GREEN}}, width=16),
    }
    out = tmp_path / "emoji"
    report = em.build_emoji_dataset(out, sources, seeds=(0,), size=48, workers=1, progress=False)
    records = read_manifest(out)
    by = {(r.artist, r.instance): r for r in records}
    tabler = by[("tabler", "1f431")]
    assert tabler.domain == "sketch" and tabler.category == "animal-mammal" and not tabler.heldout
    assert tabler.style_set == "tabler" and tabler.meta["icon"] == "cat-face"
    assert by[("lucide", "1f436")].heldout and by[("lucide", "1f600")].heldout  # an alias counts
    line, colour = by[("streamline", "streamline:rocket")], by[("streamline-color", "streamline:rocket")]
    assert (line.domain, colour.domain) == ("sketch", "photo") and line.heldout and colour.heldout
    assert colour.style_set == "streamline" and line.category == colour.category
    assert not any(r.meta.get("icon") == "only-line" for r in records)  # no colour version: no pair
    assert report["styles"]["lucide"] == {"joined_by_name": 2, "icons_in_set": 1, "role": "heldout", "images": 2}
    assert report["styles"]["streamline"]["pairs_by_name"] == 1
    # the core benchmark is unchanged by them
    assert report["kept"]["photos_per_artist"] == {"openmoji": 8, "noto": 8, "twemoji": 4, "fluent": 2}
    assert all(not r.style_set for r in records if r.artist in em.COLOUR_ARTISTS)
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Tabler Icons" in attribution and "Lucide" in attribution and "Streamline Ultimate (colour)" in attribution
    assert "held out from training" in format_dataset_summary(out, records, [])


def test_style_packages_are_pinned():
    specs = {p.spec for p in em.STYLE_PACKAGES}
    assert specs == {
        "@iconify-json/tabler@1.2.41",
        "@iconify-json/fluent-emoji-high-contrast@1.2.6",
        "@iconify-json/lucide@1.2.137",
        "@iconify-json/emojione-monotone@1.2.1",
        "@iconify-json/streamline-ultimate@1.2.2",
        "@iconify-json/streamline-ultimate-color@1.2.2",
    }
    assert all(p.integrity.startswith("sha512-") for p in em.STYLE_PACKAGES)
    assert set(em.HELDOUT_STYLES) == {"lucide", "emojione", "streamline"}
    assert em.cldr_icon_name("Hot Dog") == "hot-dog"
