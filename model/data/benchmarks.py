"""Adapters for the published ZS-SBIR benchmarks (Sketchy Extended, TU-Berlin Extended).

The images stay where they are: the manifest holds absolute paths. Every published unseen-class
split is written as a split file, with val a seeded 15% slice of the remaining (seen) classes for
model selection. Papers train on all seen classes: merge val into train for a final run that must
match them, after choosing settings on val.

Sketchy layout (as commonly distributed)::

    ROOT/sketch/tx_000000000000/<class>/*.png
    ROOT/photo/tx_000000000000/<class>/*.jpg
    ROOT/extended_photo/<class>/*.jpg          (or ROOT/EXTEND_image_sketchy/<class>/*.jpg)

TU-Berlin layout::

    ROOT/png/<class>/*.png                     sketch folders: "bear (animal)", "t-shirt", ...
    ROOT/ImageResized/<class>/*.JPEG           photo folders: "bearanimal", "tshirt", typos...
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from model.data.layout import (
    NamedSplit,
    absolute,
    class_dirs,
    class_records,
    images_in,
    match_folders,
    named_splits,
    require_dir,
    warn_unmatched,
    write_dataset,
)
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)

SKETCHY_LAYOUT = (
    "ROOT/sketch/tx_000000000000/<class>/*.png, ROOT/photo/tx_000000000000/<class>/*.jpg, "
    "and for --extended ROOT/extended_photo/<class>/*.jpg (or ROOT/EXTEND_image_sketchy)"
)
TUBERLIN_LAYOUT = "ROOT/png/<class>/*.png and ROOT/ImageResized/<class>/*.JPEG"
SKETCHY_TX = "tx_000000000000"  # the untransformed sketches and photos (the others are augmentations)
SKETCHY_EXTENDED_DIRS = ("extended_photo", "EXTEND_image_sketchy")

SKETCHY_SPLITS = (
    NamedSplit(
        "sem_pcyc_25",
        (
            "bear", "bell", "cannon", "door", "eyeglasses", "geyser", "guitar", "hamburger",
            "jack_o_lantern", "lobster", "motorcycle", "mushroom", "pear", "racket", "rhinoceros",
            "saw", "saxophone", "spoon", "squirrel", "tank", "teapot", "tiger", "trumpet", "violin",
            "wheelchair",
        ),
        "Sketchy-25 of SEM-PCYC (Dutta & Akata 2019), the split IIAE reports; mAP@all and P@100.",
    ),
    NamedSplit(
        "sake_25",
        (
            "cup", "swan", "harp", "squirrel", "snail", "ray", "pineapple", "volcano", "rifle",
            "scissors", "parrot", "windmill", "teddy_bear", "tree", "wine_bottle", "deer", "chicken",
            "airplane", "wheelchair", "tank", "umbrella", "butterfly", "camel", "horse", "bell",
        ),
        "Sketchy-25 of SAKE (Liu et al. 2019), a different set; mAP@all and P@100.",
    ),
    NamedSplit(
        "yelamarthi_21",
        (
            "bat", "cabin", "cow", "dolphin", "door", "giraffe", "helicopter", "mouse", "pear",
            "raccoon", "rhinoceros", "saw", "scissors", "seagull", "skyscraper", "songbird", "sword",
            "tree", "wheelchair", "windmill", "window",
        ),
        "Sketchy-21 of Yelamarthi et al. 2018 (no ImageNet-1k overlap); mAP@200 and P@200.",
    ),
)  # fmt: skip

TUBERLIN_SPLITS = (
    NamedSplit(
        "sake_30",
        (
            "banana", "bus", "tractor", "suitcase", "streetlight", "telephone", "bottle opener",
            "canoe", "fan", "teacup", "penguin", "laptop", "shoe", "lighter", "hot air balloon",
            "pizza", "brain", "ant", "t-shirt", "trombone", "windmill", "snowboard", "table",
            "rollerblades", "parachute", "space shuttle", "bridge", "frying-pan", "bread", "horse",
        ),
        "TU-Berlin-30 of SAKE (Liu et al. 2019); mAP@all and P@100.",
    ),
    NamedSplit(
        "sem_pcyc_30_seed0",
        (
            "backpack", "bicycle", "bookshelf", "cabinet", "calculator", "castle", "couch", "dolphin",
            "door_handle", "duck", "eyeglasses", "fire_hydrant", "flying_saucer", "foot", "hedgehog",
            "knife", "octopus", "pear", "purse", "rollerblades", "sailboat", "snail", "snake",
            "snowman", "swan", "tablelamp", "traffic_light", "truck", "umbrella", "walkie_talkie",
        ),
        "TU-Berlin-30 of SEM-PCYC, random seed 0 (shares one class with sake_30: name the split "
        "in reports); mAP@all and P@100.",
    ),
)  # fmt: skip

# TU-Berlin photo folders (ImageResized) run the words of the sketch class together and carry typos.
# Folders that differ only in spaces, hyphens and parentheses match by letters alone; these need a map
# (photo folder -> sketch class). Entries are used only when no sketch class matches directly.
TUBERLIN_PHOTO_ALIASES = {
    "bearanimal": "bear (animal)",
    "tromobone": "trombone",
    "chandeler": "chandelier",
    "griaffe": "giraffe",
    "spidar": "spider",
    "spacesshuttle": "space shuttle",
    "wristwatching": "wrist-watch",
    "diamod": "diamond",
    "pipe": "pipe (for smoking)",
    "mouse": "mouse (animal)",
    "cranemachine": "crane (machine)",
    "carsedan": "car (sedan)",
}

_SKETCHY_SKETCH_SUFFIX = re.compile(r"^(?P<photo>.+)-\d+$")


def sketchy_instance(path: Path, domain: str) -> str:
    """Sketchy pairs each sketch with the photo it was drawn from: "n02691156_10151-3.png" was drawn
    from "n02691156_10151.jpg". The photo id is the instance label of both."""
    stem = path.stem
    if domain == "sketch":
        m = _SKETCHY_SKETCH_SUFFIX.match(stem)
        return m.group("photo") if m else stem
    return stem


def build_sketchy(root: str | os.PathLike, out: str | os.PathLike, extended: bool = False, seed: int = 0):
    """Write the Sketchy (Extended with `extended`) dataset to `out`. Returns (records, splits, report)."""
    root, out = absolute(root), absolute(out)
    sketch_root = require_dir(root / "sketch" / SKETCHY_TX, "Sketchy sketches", SKETCHY_LAYOUT)
    basic_root = root / "photo" / SKETCHY_TX
    ext_root = next((root / d for d in SKETCHY_EXTENDED_DIRS if (root / d).is_dir()), None)
    if extended and ext_root is None:
        raise UserError(
            f"--extended: neither {root / SKETCHY_EXTENDED_DIRS[0]} nor {root / SKETCHY_EXTENDED_DIRS[1]} exists"
        )
    if not extended:
        require_dir(basic_root, "Sketchy photos", SKETCHY_LAYOUT)
    sketch_dirs = class_dirs(sketch_root)
    photo_root = ext_root if extended else basic_root
    pairs, sketch_only, photo_only = match_folders(sketch_dirs, class_dirs(photo_root))
    warn_unmatched("sketch folders", sketch_only)
    warn_unmatched("photo folders", photo_only)

    basic_dirs = {}
    if extended and basic_root.is_dir():
        basic_pairs, _, _ = match_folders(sketch_dirs, class_dirs(basic_root))
        basic_dirs = {name: pdir for name, (_s, pdir) in basic_pairs.items()}

    classes: dict[str, tuple[list[Path], list[Path], dict]] = {}
    added_from_basic = 0
    for name, (sdir, pdir) in pairs.items():
        sketches = images_in(sdir)
        photos = images_in(pdir)
        if name in basic_dirs:
            # Extended distributions usually contain the 12,500 originals; add any that are missing.
            have = {p.stem.lower() for p in photos}
            extra = [p for p in images_in(basic_dirs[name]) if p.stem.lower() not in have]
            added_from_basic += len(extra)
            photos = sorted(photos + extra)
        meta = {"sketch": {"folder": sdir.name}, "photo": {"folder": pdir.name}}
        classes[name] = (sketches, photos, meta)
    records, no_sketches, no_photos = class_records(classes, sketchy_instance)
    names = sorted({r.category for r in records})
    splits = named_splits(names, SKETCHY_SPLITS, root, seed=seed)
    report = {
        "source": "sketchy_extended" if extended else "sketchy",
        "root": str(root),
        "photo_folder": str(photo_root),
        "classes": len(names),
        "sketches": sum(r.domain == "sketch" for r in records),
        "photos": sum(r.domain == "photo" for r in records),
        "photos_added_from_basic_set": added_from_basic,
        "unmatched_sketch_folders": sketch_only,
        "unmatched_photo_folders": photo_only,
        "classes_without_sketches": no_sketches,
        "classes_without_photos": no_photos,
    }
    write_dataset(out, records, splits, report)
    return records, splits, report


def build_tuberlin(root: str | os.PathLike, out: str | os.PathLike, seed: int = 0):
    """Write the TU-Berlin Extended dataset to `out`. Returns (records, splits, report)."""
    root, out = absolute(root), absolute(out)
    sketch_root = require_dir(root / "png", "TU-Berlin sketches", TUBERLIN_LAYOUT)
    photo_root = require_dir(root / "ImageResized", "TU-Berlin photos", TUBERLIN_LAYOUT)
    pairs, sketch_only, photo_only = match_folders(
        class_dirs(sketch_root), class_dirs(photo_root), aliases=TUBERLIN_PHOTO_ALIASES
    )
    warn_unmatched("sketch folders", sketch_only)
    warn_unmatched("photo folders", photo_only)
    classes = {
        name: (
            images_in(sdir),
            images_in(pdir),
            {"sketch": {"folder": sdir.name}, "photo": {"folder": pdir.name}},
        )
        for name, (sdir, pdir) in pairs.items()
    }
    records, no_sketches, no_photos = class_records(classes)
    names = sorted({r.category for r in records})
    splits = named_splits(names, TUBERLIN_SPLITS, root, seed=seed)
    report = {
        "source": "tuberlin_extended",
        "root": str(root),
        "classes": len(names),
        "sketches": sum(r.domain == "sketch" for r in records),
        "photos": sum(r.domain == "photo" for r in records),
        "photo_folder_names": {name: pdir.name for name, (_s, pdir) in pairs.items() if pdir.name != name},
        "unmatched_sketch_folders": sketch_only,
        "unmatched_photo_folders": photo_only,
        "classes_without_sketches": no_sketches,
        "classes_without_photos": no_photos,
    }
    write_dataset(out, records, splits, report)
    return records, splits, report
