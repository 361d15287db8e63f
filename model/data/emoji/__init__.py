"""The cross-style emoji benchmark: OpenMoji line art (sketches) against four artists' colour emoji.

Sources are four npm packages, pinned by version and sha512 integrity (`PACKAGES`): OpenMoji gives
the black line art (the sketch domain) and its own colour art; Google Noto, Twitter Twemoji and
Microsoft Fluent (flat) come as Iconify JSON sets. Emoji are joined by codepoint sequence.

Kept: emoji with OpenMoji line art that at least two colour artists drew, without skin-tone
variants, flags, components and OpenMoji's extras; then subgroups with at least three such emoji.
The category of an image is its OpenMoji subgroup (about 90 classes, the zero-shot task); its
instance is the normalised codepoint sequence (the fine-grained task).

One module per layer, so each can be tested alone; this package re-exports their public names:
  sources   the pinned packages, the style sets and who drew what (attribution)
  fetch     fetch_packages(cache): npm pack + integrity check + safe extraction -> EmojiSources
  parse     codepoint sequences, Iconify JSON sets as standalone SVG
  select    select_emoji(sources): the join and filters, no rendering -> [EmojiEntry], stats
  render    render_jobs(jobs, workers): cairosvg in a process pool, resumable, failures reported
  build     build_emoji_dataset(out, sources): all of the above + manifest, splits, report, attribution
"""


from model.data.emoji.build import (
    DEFAULT_SEEDS,
    DEFAULT_SIZE,
    MIN_PER_SUBGROUP,
    build_emoji,
    build_emoji_dataset,
    format_build_summary,
)
from model.data.emoji.fetch import (
    EmojiSources,
    fetch_package,
    fetch_packages,
    fetch_tarball,
    integrity_of,
    safe_extract,
)
from model.data.emoji.parse import (
    FE0F,
    IconifySet,
    normalize_hexcode,
)
from model.data.emoji.render import (
    RenderError,
    RenderJob,
    default_workers,
    render_jobs,
    render_svg,
    run_job,
)
from model.data.emoji.select import (
    DROP_GROUPS,
    MIN_COLOUR_ARTISTS,
    EmojiEntry,
    StyleItem,
    cldr_icon_name,
    select_emoji,
    select_style_items,
)
from model.data.emoji.sources import (
    ARTISTS,
    COLOUR_ARTISTS,
    HELDOUT_STYLES,
    ICONIFY_PACKAGES,
    OPENMOJI,
    PACKAGES,
    STYLE_ARTISTS,
    STYLE_KEYS,
    STYLE_PACKAGES,
    STYLE_SETS,
    NpmPackage,
    StyleSet,
)

__all__ = [
    "ARTISTS",
    "COLOUR_ARTISTS",
    "DEFAULT_SEEDS",
    "DEFAULT_SIZE",
    "DROP_GROUPS",
    "EmojiEntry",
    "EmojiSources",
    "FE0F",
    "HELDOUT_STYLES",
    "ICONIFY_PACKAGES",
    "IconifySet",
    "MIN_COLOUR_ARTISTS",
    "MIN_PER_SUBGROUP",
    "NpmPackage",
    "OPENMOJI",
    "PACKAGES",
    "RenderError",
    "RenderJob",
    "STYLE_ARTISTS",
    "STYLE_KEYS",
    "STYLE_PACKAGES",
    "STYLE_SETS",
    "StyleItem",
    "StyleSet",
    "build_emoji",
    "build_emoji_dataset",
    "cldr_icon_name",
    "default_workers",
    "fetch_package",
    "fetch_packages",
    "fetch_tarball",
    "format_build_summary",
    "integrity_of",
    "normalize_hexcode",
    "render_jobs",
    "render_svg",
    "run_job",
    "safe_extract",
    "select_emoji",
    "select_style_items",
]
