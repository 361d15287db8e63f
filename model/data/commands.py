"""`sbir data ...`: build datasets (manifest.csv + splits/) from the emoji packages, the published
benchmarks or a folder of your own. Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse

DATA_HELP = """\
Build a dataset directory that the later stages read: DIR/manifest.csv (one row per image: path,
domain sketch|photo, category, instance, artist, extra columns) and DIR/splits/<name>.json (train,
val and unseen classes). A summary of each split is printed at the end.
"""

EMOJI_HELP = """\
Build the cross-style emoji benchmark: OpenMoji line art as sketches against colour emoji by
OpenMoji, Google Noto, Twemoji and Microsoft Fluent. The four npm packages are fetched with
`npm pack` at pinned versions into DIR/.cache/npm and checked against their sha512 integrity (put the
tarballs there yourself to build offline). Every SVG is rendered to a PNG on white; re-running
reuses finished renders. Categories are OpenMoji subgroups, instances the emoji's codepoints. Writes
manifest.csv, splits/category_seed<N>.json, build_report.json (counts, render failures) and
ATTRIBUTION.md (artists and licences: cite them when you use the data).

Six more pinned packages add drawing styles (--no-styles leaves them out): two which training may
use, each joined to the emoji whose CLDR short name its icons carry: Tabler's outline icons and
Microsoft's high-contrast Fluent Emoji (bold monochrome: filled shapes, thick outlines); and three sets held
out from training and from every choice, for `sbir eval` only (marked heldout=1 in the manifest):
Lucide's thin outline icons (joined the same way), EmojiOne's monochrome silhouettes, and
Streamline's line icons against their own colour versions.
"""

SKETCHY_HELP = """\
Adapter for Sketchy (Extended). ROOT holds sketch/tx_000000000000/<class>/*.png and
photo/tx_000000000000/<class>/*.jpg; with --extended the photos come from extended_photo/<class>/
(or EXTEND_image_sketchy/), plus any originals missing there. Files stay in place (absolute paths).
Writes the published splits sem_pcyc_25 (the one IIAE reports), sake_25 and yelamarthi_21, each with
a seeded 15% of the remaining classes as val.
"""

TUBERLIN_HELP = """\
Adapter for TU-Berlin Extended. ROOT holds png/<class>/*.png (sketches) and
ImageResized/<class>/*.JPEG (photos, whose folder names run words together and carry typos such as
"tromobone": they are mapped). Files stay in place (absolute paths). Writes the published splits
sake_30 and sem_pcyc_30_seed0, each with a seeded 15% of the remaining classes as val.
"""

FOLDER_HELP = """\
Adapter for your own data: ROOT/sketches/<class>/* and ROOT/photos/<class>/*. Files stay in place
(absolute paths). The split comes from --split-file (a split JSON, checked against the classes) or is
drawn from --seed (20% unseen, 15% of the seen classes as val).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _print_summary(out, records, splits) -> None:
    from model.data.dataset import format_dataset_summary

    print(format_dataset_summary(out, records, splits))


def cmd_emoji(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.data.dataset import read_manifest, read_split, split_path
    from model.data.emoji import build_emoji, format_build_summary

    out = Path(args.dir)
    report = build_emoji(out, seeds=args.seeds, size=args.size, workers=args.workers, styles=not args.no_styles)
    print(format_build_summary(report))
    records = read_manifest(out)
    _print_summary(out, records, [read_split(split_path(out, name)) for name in report["splits"]])
    return 0


def cmd_sketchy(args: argparse.Namespace) -> int:
    from model.data.benchmarks import build_sketchy

    records, splits, _report = build_sketchy(args.root, args.out, extended=args.extended, seed=args.seed)
    _print_summary(args.out, records, splits)
    return 0


def cmd_tuberlin(args: argparse.Namespace) -> int:
    from model.data.benchmarks import build_tuberlin

    records, splits, _report = build_tuberlin(args.root, args.out, seed=args.seed)
    _print_summary(args.out, records, splits)
    return 0


def cmd_folder(args: argparse.Namespace) -> int:
    from model.data.folder import build_folder

    records, splits, report = build_folder(args.root, args.out, split_file=args.split_file, seed=args.seed)
    if report["classes_in_no_split_part"]:
        left = report["classes_in_no_split_part"]
        print(f"note: {len(left)} class(es) are in no part of the split: {', '.join(left[:10])}")
    _print_summary(args.out, records, splits)
    return 0


def add_commands(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    data = subparsers.add_parser(
        "data",
        help="build datasets: emoji benchmark, Sketchy, TU-Berlin, own folders",
        description=DATA_HELP,
        formatter_class=fmt,
    )
    sub = data.add_subparsers(dest="data_command", metavar="SOURCE")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser(
        "emoji", help="build the cross-style emoji benchmark", description=EMOJI_HELP, formatter_class=fmt
    )
    p.add_argument("dir", metavar="DIR", help="output dataset directory (created)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="N",
        help="one split per seed: splits/category_seed<N>.json (default: 0 1 2)",
    )
    p.add_argument("--size", type=_positive_int, default=256, help="PNG side in pixels (default: 256)")
    p.add_argument("--no-styles", action="store_true", help="without the five style-set packages")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="render processes (default: the CPUs this process may use)",
    )
    p.set_defaults(func=cmd_emoji)

    p = sub.add_parser(
        "sketchy", help="adapter for Sketchy (Extended)", description=SKETCHY_HELP, formatter_class=fmt
    )
    p.add_argument("root", metavar="ROOT", help="the Sketchy folder (holding sketch/ and photo/)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--extended", action="store_true", help="use the 73,002 extended photos as the gallery")
    p.add_argument("--seed", type=int, default=0, help="seed of the val slice of each split (default: 0)")
    p.set_defaults(func=cmd_sketchy)

    p = sub.add_parser(
        "tuberlin", help="adapter for TU-Berlin Extended", description=TUBERLIN_HELP, formatter_class=fmt
    )
    p.add_argument("root", metavar="ROOT", help="the TU-Berlin folder (holding png/ and ImageResized/)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the val slice of each split (default: 0)")
    p.set_defaults(func=cmd_tuberlin)

    p = sub.add_parser(
        "folder",
        help="adapter for ROOT/sketches/<class>, ROOT/photos/<class>",
        description=FOLDER_HELP,
        formatter_class=fmt,
    )
    p.add_argument("root", metavar="ROOT", help="folder holding sketches/ and photos/")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--split-file", metavar="F", help="use this split JSON (checked against the classes)")
    how.add_argument("--seed", type=int, default=None, help="draw a split with this seed (default: 0)")
    p.set_defaults(func=cmd_folder)
