"""Fetching the pinned packages: `npm pack`, the sha512 integrity check, safe extraction."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from model.data.emoji.sources import ICONIFY_PACKAGES, OPENMOJI, PACKAGES, STYLE_PACKAGES, NpmPackage
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)


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
