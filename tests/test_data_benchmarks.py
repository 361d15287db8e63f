"""Sketchy, TU-Berlin and plain-folder adapters on tiny synthetic trees of the real layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from model.data.benchmarks import (
    SKETCHY_SPLITS,
    TUBERLIN_PHOTO_ALIASES,
    TUBERLIN_SPLITS,
    build_sketchy,
    build_tuberlin,
    sketchy_instance,
)
from model.data.dataset import Split, list_splits, make_split, read_manifest, read_split
from model.data.folder import build_folder
from model.data.layout import canonical_name, letters_key, match_folders
from model.ground.errors import UserError
from sbir import cli


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image_bytes("PNG")
JPEG = _image_bytes("JPEG")


def _files(folder: Path, names: list[str], data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(data)


# -- Sketchy ---------------------------------------------------------------------------------------

SKETCHY_CLASSES = sorted(
    {c for s in SKETCHY_SPLITS for c in s.unseen} | {"ant", "car_(sedan)", "hot_air_balloon"}
)
# class -> (sketch folder, photo folder): two classes use the hyphenated names of the original release
SKETCHY_RENAMED = {"jack_o_lantern": ("jack-o-lantern", "jack_o_lantern"), "hot_air_balloon": ("hot-air_balloon", "hot_air_balloon")}  # fmt: skip


def _sketchy_tree(root: Path, extended: bool = False, drop: str = "") -> Path:
    for i, cls in enumerate(SKETCHY_CLASSES):
        if cls == drop:
            continue
        sketch_name, photo_name = SKETCHY_RENAMED.get(cls, (cls, cls))
        pid = f"n{i:08d}_1"
        _files(root / "sketch" / "tx_000000000000" / sketch_name, [f"{pid}-1.png", f"{pid}-2.png"], PNG)
        _files(root / "photo" / "tx_000000000000" / photo_name, [f"{pid}.jpg"], JPEG)
        if extended:
            # the extended set holds the originals plus new photos; one class lacks its original
            names = [f"n{i:08d}_9.jpg"] + ([] if cls == "ant" else [f"{pid}.jpg"])
            _files(root / "EXTEND_image_sketchy" / photo_name, names, JPEG)
    (root / "sketch" / "tx_000100000000").mkdir(parents=True)  # augmented copies: ignored
    return root


def test_canonical_names():
    assert canonical_name("hot-air_balloon") == canonical_name("hot_air_balloon") == "hot_air_balloon"
    assert canonical_name("jack-o-lantern") == "jack_o_lantern"
    assert canonical_name("Bear (animal)") == "bear_(animal)"
    assert letters_key("bear (animal)") == "bearanimal"


def test_sketchy_instance():
    assert sketchy_instance(Path("n02691156_10151-3.png"), "sketch") == "n02691156_10151"
    assert sketchy_instance(Path("n02691156_10151.jpg"), "photo") == "n02691156_10151"


def test_sketchy_adapter(tmp_path):
    root = _sketchy_tree(tmp_path / "Sketchy")
    out = tmp_path / "ds"
    records, splits, report = build_sketchy(root, out)
    n = len(SKETCHY_CLASSES)
    assert report["classes"] == n
    assert report["sketches"] == 2 * n and report["photos"] == n
    back = read_manifest(out)
    assert back == records
    categories = {r.category for r in back}
    assert {"jack_o_lantern", "hot_air_balloon", "car_(sedan)"} <= categories
    for r in back:
        assert Path(r.path).is_absolute() and Path(r.path).is_file()
    sk = next(r for r in back if r.domain == "sketch" and r.category == "jack_o_lantern")
    assert sk.meta["folder"] == "jack-o-lantern" and sk.instance.endswith("_1")
    assert {r.instance for r in back if r.category == "ant"} == {f"n{SKETCHY_CLASSES.index('ant'):08d}_1"}

    files = list_splits(out)
    assert list(files) == ["sake_25", "sem_pcyc_25", "yelamarthi_21"]
    for spec in SKETCHY_SPLITS:
        s = read_split(files[spec.name])
        assert s.unseen == sorted(canonical_name(c) for c in spec.unseen)
        assert s.classes == categories
        seen = n - len(spec.unseen)
        assert len(s.val) == int(0.15 * seen + 0.5)
        assert spec.description and s.description == spec.description
    assert len(read_split(files["sem_pcyc_25"]).unseen) == 25
    assert len(read_split(files["yelamarthi_21"]).unseen) == 21
    # deterministic: a second build writes the same splits
    _, again, _ = build_sketchy(root, tmp_path / "ds2")
    assert again == splits


def test_sketchy_extended(tmp_path):
    root = _sketchy_tree(tmp_path / "Sketchy", extended=True)
    records, _splits, report = build_sketchy(root, tmp_path / "ds", extended=True)
    n = len(SKETCHY_CLASSES)
    # every class: 2 extended photos, except "ant" whose original is added from photo/
    assert report["photos"] == 2 * n
    assert report["photos_added_from_basic_set"] == 1
    ant = sorted(
        Path(r.path).parent.parent.name for r in records if r.category == "ant" and r.domain == "photo"
    )
    assert ant == ["EXTEND_image_sketchy", "tx_000000000000"]


def test_sketchy_missing_split_class_is_named(tmp_path):
    root = _sketchy_tree(tmp_path / "Sketchy", drop="geyser")
    with pytest.raises(UserError, match=r"sem_pcyc_25.*geyser"):
        build_sketchy(root, tmp_path / "ds")


def test_sketchy_layout_errors(tmp_path):
    with pytest.raises(UserError, match="tx_000000000000"):
        build_sketchy(tmp_path, tmp_path / "ds")
    root = _sketchy_tree(tmp_path / "Sketchy")
    with pytest.raises(UserError, match="--extended"):
        build_sketchy(root, tmp_path / "ds", extended=True)


# -- TU-Berlin -------------------------------------------------------------------------------------

# Sketch folders as in png/: SAKE names are the real ones; SEM-PCYC's use underscores for spaces.
TUB_SKETCH = sorted(
    {c for c in TUBERLIN_SPLITS[0].unseen}
    | {c.replace("_", " ") for c in TUBERLIN_SPLITS[1].unseen}
    | {"bear (animal)", "chandelier", "giraffe", "spider", "mouse (animal)", "computer-mouse",
       "wrist-watch", "pipe (for smoking)", "diamond", "car (sedan)", "crane (machine)"}
)  # fmt: skip
TUB_TYPOS = {
    "trombone": "tromobone",
    "space shuttle": "spacesshuttle",
    "chandelier": "chandeler",
    "giraffe": "griaffe",
    "spider": "spidar",
    "mouse (animal)": "mouse",
    "wrist-watch": "wristwatching",
    "pipe (for smoking)": "pipe",
    "diamond": "diamod",
}


def _tuberlin_tree(root: Path, drop_photo: str = "") -> Path:
    for i, cls in enumerate(TUB_SKETCH):
        _files(root / "png" / cls, [f"{i * 80 + k}.png" for k in range(1, 3)], PNG)
        photo = TUB_TYPOS.get(cls, letters_key(cls))
        if photo != drop_photo:
            _files(root / "ImageResized" / photo, [f"n{i:08d}_{k}.JPEG" for k in range(3)], JPEG)
    _files(root / "ImageResized" / "unicorn", ["x.JPEG"], JPEG)  # no sketches: reported, left out
    (root / "png" / "filelist.txt").write_text("ignored\n")
    return root


def test_tuberlin_alias_map_covers_known_typos():
    for typo in ("bearanimal", "tromobone", "chandeler", "griaffe", "spidar", "spacesshuttle"):
        assert typo in TUBERLIN_PHOTO_ALIASES


def test_tuberlin_adapter(tmp_path):
    root = _tuberlin_tree(tmp_path / "TUBerlin")
    out = tmp_path / "ds"
    records, splits, report = build_tuberlin(root, out)
    n = len(TUB_SKETCH)
    assert report["classes"] == n  # every sketch folder found its photos, typos included
    assert report["sketches"] == 2 * n and report["photos"] == 3 * n
    assert report["unmatched_photo_folders"] == ["unicorn"]
    categories = {r.category for r in records}
    assert {
        "bear_(animal)",
        "t_shirt",
        "trombone",
        "space_shuttle",
        "mouse_(animal)",
        "pipe_(for_smoking)",
    } <= categories
    trombone = [r for r in records if r.category == "trombone" and r.domain == "photo"]
    assert len(trombone) == 3 and all(Path(r.path).parent.name == "tromobone" for r in trombone)
    assert all(Path(r.path).suffix == ".JPEG" for r in records if r.domain == "photo")
    assert all(r.instance == "" for r in records)
    assert read_manifest(out) == records

    files = list_splits(out)
    assert list(files) == ["sake_30", "sem_pcyc_30_seed0"]
    sake = read_split(files["sake_30"])
    assert len(sake.unseen) == 30
    assert {"bottle_opener", "hot_air_balloon", "t_shirt", "frying_pan", "space_shuttle", "trombone"} <= set(
        sake.unseen
    )
    sem = read_split(files["sem_pcyc_30_seed0"])
    assert len(sem.unseen) == 30 and {"tablelamp", "door_handle", "walkie_talkie"} <= set(sem.unseen)
    assert set(sake.unseen) & set(sem.unseen) == {"rollerblades"}  # the one class the two lists share
    for s in (sake, sem):
        assert s.classes == categories
        assert set(s.train).isdisjoint(s.unseen) and set(s.val).isdisjoint(s.unseen)
        assert len(s.val) == int(0.15 * (n - 30) + 0.5)


def test_tuberlin_missing_photos_of_a_split_class(tmp_path):
    root = _tuberlin_tree(tmp_path / "TUBerlin", drop_photo="tromobone")
    with pytest.raises(UserError, match=r"sake_30.*trombone"):
        build_tuberlin(root, tmp_path / "ds")


def test_match_folders_prefers_direct_names_over_aliases():
    sketch = {"mouse": Path("s/mouse"), "mouse (animal)": Path("s/mouse (animal)")}
    pairs, s_only, p_only = match_folders(sketch, {"mouse": Path("p/mouse")}, aliases=TUBERLIN_PHOTO_ALIASES)
    assert list(pairs) == ["mouse"] and s_only == ["mouse (animal)"] and p_only == []


# -- plain folders ---------------------------------------------------------------------------------


def _folder_tree(root: Path) -> Path:
    for cls in ["apple", "boat", "cat", "dog", "egg", "fish"]:
        _files(root / "sketches" / cls, ["1.png", "2.png"], PNG)
        _files(root / "photos" / cls, ["1.jpg", "2.jpg", "3.jpg"], JPEG)
    _files(root / "photos" / "ghost", ["1.jpg"], JPEG)  # photos only: left out
    _files(root / "sketches" / "cat" / "more", ["3.png", "notes.txt"], PNG)  # nested, non-image skipped
    return root


def test_folder_with_seed(tmp_path):
    root = _folder_tree(tmp_path / "mine")
    records, splits, report = build_folder(root, tmp_path / "ds", seed=4)
    names = ["apple", "boat", "cat", "dog", "egg", "fish"]
    assert report["classes"] == 6 and report["unmatched_photo_folders"] == ["ghost"]
    assert sum(r.domain == "sketch" and r.category == "cat" for r in records) == 3
    assert splits[0] == make_split(names, 4, name="category_seed4")
    assert read_split(list_splits(tmp_path / "ds")["category_seed4"]) == splits[0]


def test_folder_with_split_file(tmp_path):
    root = _folder_tree(tmp_path / "mine")
    f = tmp_path / "my_split.json"
    Split("mine", None, ["cat", "dog"], ["boat"], ["apple", "egg"]).write(f)
    _records, splits, report = build_folder(root, tmp_path / "ds", split_file=f)
    assert splits[0].unseen == ["apple", "egg"]
    assert report["classes_in_no_split_part"] == ["fish"]
    assert list(list_splits(tmp_path / "ds")) == ["mine"]

    f.write_text(json.dumps({"name": "bad", "train": ["cat"], "val": [], "unseen": ["zebra"]}))
    with pytest.raises(UserError, match="zebra"):
        build_folder(root, tmp_path / "ds2", split_file=f)


def test_cli_folder_prints_summary(tmp_path, capsys):
    root = _folder_tree(tmp_path / "mine")
    rc = cli.main(["-q", "data", "folder", str(root), "--out", str(tmp_path / "ds"), "--seed", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "split category_seed1" in text and "unseen" in text and "sketches" in text


def test_cli_reports_user_errors(tmp_path, capsys):
    rc = cli.main(["-q", "data", "sketchy", str(tmp_path), "--out", str(tmp_path / "ds")])
    assert rc == 2
    assert "tx_000000000000" in capsys.readouterr().err
