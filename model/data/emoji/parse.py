"""Reading the sources: codepoint sequences, and Iconify JSON icon sets as standalone SVG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.ground.errors import UserError

FE0F = 0xFE0F


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
