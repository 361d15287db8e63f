"""Cache frozen-backbone features of a dataset: batched, decoded in worker processes, resumable.

Every (record, view) pair is one row: view 0 is the image as it is, views 1..K are random sketch
renders (`augment_sketch`, seeded per record and view), `FREEHAND_VIEW` + 1..K are freehand redraws
of a sketch (`freehand_sketch`), `SILHOUETTE_VIEW` + 0..K-1 are filled-shape drawings made from a
colour image (`silhouette_sketch`: as made, then random renders) and `EDGE_VIEW` is an edge map of a
photo (the style-held-out check). Silhouettes and edge maps are drawings made from photo records.
Rows are computed in chunks that are written atomically as they finish, so a killed run continues
where it stopped. Unreadable files are skipped with their reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.numpy import save as save_safetensors
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.augment import augment_sketch, edge_sketch, freehand_sketch, silhouette_sketch
from model.backbones import Backbone
from model.data.dataset import Record, resolve_path
from model.ground.files import write_atomic, write_bytes_atomic, write_text_atomic
from model.images import ImageError, load_image
from model.stroke_norm import VERSION as stroke_norm_version
from model.stroke_norm import normalise_strokes

LOG = logging.getLogger(__name__)

FEATURES_VERSION = 1
EDGE_VIEW = 100
SILHOUETTE_VIEW = 200  # 200: the silhouette as made; 201..: random renders of it
FREEHAND_VIEW = 300  # 301..: freehand redraws of a sketch
# View NORM_VIEW + v is view v of a sketch after stroke normalisation (model.stroke_norm): both
# families sit in one cache, so a model can be trained and evaluated with either.
NORM_VIEW = 1000
CHUNK_ROWS = 512
FEATURES_FILE = "features.safetensors"
META_FILE = "features.json"


@dataclass
class FeatureSet:
    feats: np.ndarray  # (N, D) float32
    record: np.ndarray  # (N,) index into the manifest
    view: np.ndarray  # (N,) 0 = as is, 1..K = augmented, EDGE_VIEW = edge map
    meta: dict = field(default_factory=dict)

    def rows(self, records: np.ndarray | Sequence[int], views: Sequence[int]) -> np.ndarray:
        """Row indices whose record is in `records` and view in `views`."""
        return np.flatnonzero(np.isin(self.record, records) & np.isin(self.view, list(views)))

    def family(self, records: Sequence[Record], stroke_norm: bool) -> np.ndarray:
        """Mask of the rows a model reads: its sketch rows (queries and edge maps included) with or
        without stroke normalisation, and every photo row."""
        is_norm = self.view >= NORM_VIEW
        if stroke_norm and not is_norm.any():
            raise ValueError("these features have no stroke-normalised sketch rows: "
                             "recompute them with `sbir features` (stroke normalisation on)")
        sketch_rec = np.array([r.domain == "sketch" for r in records])
        is_sketch_row = sketch_rec[self.record] | drawn_from_photo(self.view)
        return ~is_sketch_row | (is_norm == stroke_norm)

    def for_sketches(self, records: Sequence[Record], stroke_norm: bool) -> FeatureSet:
        """The `family` rows, views renumbered as without normalisation (NORM_VIEW + v -> v)."""
        keep = self.family(records, stroke_norm)
        return FeatureSet(self.feats[keep], self.record[keep], self.view[keep] % NORM_VIEW, self.meta)

    def save(self, path: str | Path) -> None:
        """Write the set (features, rows, meta) atomically to a directory that `load` reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"feats": np.ascontiguousarray(self.feats, np.float32), "record": self.record.astype(np.int64),
                   "view": self.view.astype(np.int64)}
        write_bytes_atomic(path / FEATURES_FILE, save_safetensors(tensors))
        write_text_atomic(path / META_FILE, json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        t = load_file(str(path / FEATURES_FILE))
        meta = json.loads((path / META_FILE).read_text())
        return cls(t["feats"], t["record"], t["view"], meta)


def is_silhouette(view: np.ndarray) -> np.ndarray:
    v = np.asarray(view) % NORM_VIEW
    return (v >= SILHOUETTE_VIEW) & (v < SILHOUETTE_VIEW + 100)


def drawn_from_photo(view: np.ndarray) -> np.ndarray:
    """Which views are drawings made from a photo record (silhouettes, edge maps), normalised or not."""
    return (np.asarray(view) % NORM_VIEW == EDGE_VIEW) | is_silhouette(view)


def is_freehand(view: np.ndarray) -> np.ndarray:
    v = np.asarray(view) % NORM_VIEW
    return (v > FREEHAND_VIEW) & (v < FREEHAND_VIEW + 100)


def plan_jobs(
    records: Sequence[Record], sketch_views: int, edge_artists: Sequence[str], stroke_norm: bool = True,
    heldout: bool = True, freehand_views: int = 0, silhouette_views: int = 0,
    silhouette_artists: Sequence[str] = (),
) -> list[tuple[int, int]]:
    """(record, view) rows: K augmented renders and `freehand_views` freehand redraws of every sketch
    that may be trained on (held-out ones only as they are; none at all without `heldout`), edge maps
    of `edge_artists`' photos, `silhouette_views` silhouettes of `silhouette_artists`' photos (not
    held-out ones), and with `stroke_norm` every sketch row again after stroke normalisation."""
    jobs: list[tuple[int, int]] = []
    for i, rec in enumerate(records):
        if rec.heldout and not heldout:
            continue
        if rec.domain == "sketch":
            views = [0] if rec.heldout else list(range(sketch_views + 1))
            if not rec.heldout:
                views += [FREEHAND_VIEW + v for v in range(1, freehand_views + 1)]
        else:
            jobs.append((i, 0))
            views = [EDGE_VIEW] if rec.artist in edge_artists else []
            if rec.artist in silhouette_artists and not rec.heldout:
                views += [SILHOUETTE_VIEW + v for v in range(silhouette_views)]
        jobs.extend((i, v) for v in views)
        if stroke_norm:
            jobs.extend((i, NORM_VIEW + v) for v in views)
    return jobs


def render_view(img, record_index: int, view: int, seed: int):
    if view >= NORM_VIEW:
        return normalise_strokes(render_view(img, record_index, view - NORM_VIEW, seed))
    if view == 0:
        return img
    if view == EDGE_VIEW:
        return edge_sketch(img)
    if view == SILHOUETTE_VIEW:
        return silhouette_sketch(img)
    rng = np.random.default_rng([seed, record_index, view])
    if is_silhouette(view):
        return silhouette_sketch(img, rng)
    if is_freehand(view):
        return freehand_sketch(img, rng)
    return augment_sketch(img, rng)


class ViewDataset(Dataset):
    """(record, view) jobs -> (preprocessed uint8 image, "") or (None, why it did not decode); the views are
    rendered by `render_view` with `seed`, so every reader of a feature row sees the same image."""

    def __init__(self, root: Path, records: Sequence[Record], jobs, backbone_preprocess, seed: int):
        self.root, self.records, self.jobs, self.seed = root, records, jobs, seed
        self.preprocess = backbone_preprocess

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        rec_i, view = self.jobs[i]
        try:
            img = load_image(resolve_path(self.root, self.records[rec_i]))
            return self.preprocess(render_view(img, rec_i, view, self.seed)), ""
        except ImageError as exc:
            return None, exc.reason + (f": {exc.detail}" if exc.detail else "")


def collate_views(batch):
    """ViewDataset items -> (stacked images of those that decoded, or None; every item's error or "")."""
    ok = [t for t, _ in batch if t is not None]
    errors = [err for _, err in batch]
    return (torch.stack(ok) if ok else None), errors


# Plan keys that change no row's pixels or features: a cache that differs from the new plan only in
# these (and in which rows it has) lends its rows to the new one.
_ROW_NEUTRAL_KEYS = frozenset({"sketch_views", "edge_artists", "heldout", "freehand_views", "silhouette_views",
                               "silhouette_artists", "n_jobs"})


def _reusable_rows(out_dir: Path, old_plan: dict, plan: dict, wanted: set) -> dict[tuple[int, int], np.ndarray]:
    """(record, view) -> feature of the rows of a complete earlier cache in `out_dir` that `plan` also
    needs, when that cache was made by the same backbone, seed, records and stroke normalisation
    (a row's render depends on those only); else nothing."""
    same = all(old_plan.get(k) == v for k, v in plan.items() if k not in _ROW_NEUTRAL_KEYS)
    if not same or not (out_dir / FEATURES_FILE).is_file():
        return {}
    old = FeatureSet.load(out_dir)
    return {j: old.feats[i] for i, j in enumerate(zip(old.record.tolist(), old.view.tolist(), strict=True))
            if j in wanted}


def _atomic_save_npz(path: Path, **arrays) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


def extract_features(
    root: str | Path,
    records: Sequence[Record],
    backbone: Backbone,
    out_dir: str | Path,
    sketch_views: int = 3,
    edge_artists: Sequence[str] = ("openmoji",),
    stroke_norm: bool = True,
    heldout: bool = True,
    freehand_views: int = 0,
    silhouette_views: int = 0,
    silhouette_artists: Sequence[str] = ("openmoji",),
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
) -> FeatureSet:
    """Compute (or finish computing) the feature cache of `records` under `out_dir`."""
    root, out_dir = Path(root), Path(out_dir)
    jobs = plan_jobs(records, sketch_views, edge_artists, stroke_norm, heldout, freehand_views, silhouette_views,
                     silhouette_artists)
    plan = {
        "version": FEATURES_VERSION,
        "backbone": backbone.describe(),
        "sketch_views": sketch_views,
        "edge_artists": sorted(edge_artists),
        "stroke_norm": stroke_norm_version if stroke_norm else False,
        "seed": seed,
        "records_sha256": hashlib.sha256(
            "\n".join(f"{r.path}|{r.domain}|{r.artist}" for r in records).encode()
        ).hexdigest(),
        "n_jobs": len(jobs),
        "chunk_rows": CHUNK_ROWS,
    }
    # only when set, so that caches made without them keep their plan id
    if not heldout:
        plan["heldout"] = False
    if freehand_views:
        plan["freehand_views"] = freehand_views
    if silhouette_views:
        plan["silhouette_views"] = silhouette_views
        plan["silhouette_artists"] = sorted(silhouette_artists)
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    reused: dict[tuple[int, int], np.ndarray] = {}
    if (out_dir / META_FILE).is_file():
        meta = json.loads((out_dir / META_FILE).read_text())
        if meta.get("plan_id") == plan_id:
            LOG.info("features in %s are complete and current", out_dir)
            return FeatureSet.load(out_dir)
        reused = _reusable_rows(out_dir, meta.get("plan", {}), plan, set(jobs))
    all_jobs, jobs = jobs, [j for j in jobs if j not in reused]
    if reused:
        LOG.info("reusing %d rows of the previous cache in %s (same backbone, seed, records and renders)",
                 len(reused), out_dir)
    work = out_dir / f"chunks-{plan_id}"
    work.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(jobs) + CHUNK_ROWS - 1) // CHUNK_ROWS
    todo = [c for c in range(n_chunks) if not (work / f"{c:05d}.npz").is_file()]
    if len(todo) < n_chunks:
        LOG.info("resuming: %d of %d chunks already done", n_chunks - len(todo), n_chunks)

    todo_jobs = [j for c in todo for j in jobs[c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS]]
    ds = ViewDataset(root, records, todo_jobs, backbone.preprocess, seed)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_views,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo_jobs), unit="img", disable=not progress,
               desc="features")
    forward_s = 0.0
    start = time.perf_counter()
    pos = 0  # position in todo_jobs
    chunk_iter = iter(todo)
    current = next(chunk_iter, None)
    buf_feats, buf_ok, buf_err = [], [], []
    with torch.inference_mode():
        for pixels, errors in loader:
            if pixels is not None:
                t0 = time.perf_counter()
                feats = backbone(pixels).numpy()
                forward_s += time.perf_counter() - t0
            fi = 0
            for err in errors:
                if err:
                    buf_feats.append(np.zeros(backbone.dim, np.float32))
                    buf_ok.append(False)
                    buf_err.append(err)
                else:
                    buf_feats.append(feats[fi])
                    fi += 1
                    buf_ok.append(True)
                    buf_err.append("")
                pos += 1
                size = min(CHUNK_ROWS, len(jobs) - current * CHUNK_ROWS)
                if len(buf_feats) == size:
                    _atomic_save_npz(
                        work / f"{current:05d}.npz",
                        feats=np.stack(buf_feats),
                        ok=np.array(buf_ok),
                        err=np.array(buf_err, dtype=object).astype(str),
                    )
                    buf_feats, buf_ok, buf_err = [], [], []
                    current = next(chunk_iter, None)
            bar.update(len(errors))
    bar.close()
    wall = time.perf_counter() - start

    feats, ok, errs = [], [], []
    for c in range(n_chunks):
        with np.load(work / f"{c:05d}.npz") as z:
            feats.append(z["feats"])
            ok.append(z["ok"])
            errs.append(z["err"])
    feats_a = np.concatenate(feats) if feats else np.zeros((0, backbone.dim), np.float32)
    ok_a = np.concatenate(ok) if ok else np.zeros(0, bool)
    errs_a = np.concatenate(errs) if errs else np.zeros(0, str)
    if reused:  # back in plan order: reused rows and fresh ones interleaved as planned
        fresh = {j: i for i, j in enumerate(jobs)}
        take = [fresh.get(j, -1) for j in all_jobs]
        feats_a = np.stack([feats_a[i] if i >= 0 else reused[j] for i, j in zip(take, all_jobs, strict=True)])
        ok_a = np.array([ok_a[i] if i >= 0 else True for i in take])
        errs_a = np.array([errs_a[i] if i >= 0 else "" for i in take]).astype(str)
    jobs = all_jobs
    job_a = np.array(jobs, dtype=np.int64).reshape(-1, 2)
    skipped = [
        {"path": records[int(job_a[i, 0])].path, "view": int(job_a[i, 1]), "reason": str(errs_a[i])}
        for i in np.flatnonzero(~ok_a)
    ]
    n_done = len(todo_jobs)
    speed = {
        "images": n_done,
        "wall_s": round(wall, 2),
        "forward_s": round(forward_s, 2),
        "images_per_s": round(n_done / wall, 2) if wall > 0 else None,
        "bare_forward_images_per_s": round(n_done / forward_s, 2) if forward_s > 0 else None,
        "ratio_to_bare_forward": round(forward_s / wall, 3) if wall > 0 else None,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "runtime": backbone.runtime(),
    }
    meta = {"plan_id": plan_id, "plan": plan, "skipped": skipped, "speed": speed, "dim": backbone.dim}
    keep = ok_a
    fs = FeatureSet(feats_a[keep], job_a[keep, 0].copy(), job_a[keep, 1].copy(), meta)
    fs.save(out_dir)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    if skipped:
        LOG.warning("%d images skipped (unreadable); listed in %s", len(skipped), out_dir / META_FILE)
    return fs
