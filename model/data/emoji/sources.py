"""What the emoji benchmark is made of: the pinned npm packages, the style sets and who drew each
image (the attribution's source)."""

from __future__ import annotations

from dataclasses import dataclass


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
        "fluent-hc",
        NpmPackage("fluent-hc", "@iconify-json/fluent-emoji-high-contrast", "1.2.6",
                   "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w=="),
        "train", "name", "Fluent Emoji (high contrast)", "Microsoft Corporation", "MIT",
        "https://github.com/microsoft/fluentui-emoji", "bold monochrome emoji: filled shapes and thick outlines",
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
