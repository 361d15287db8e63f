"""Cost of an incremental update against a full build: change a fraction of a collection, update, compare.

    .venv/bin/python benchmarks/bench_index_update.py --photos 10000 --changed 0.01
    .venv/bin/python benchmarks/bench_index_update.py --photos 100000 --changed 0.01 --seed-embeddings

The change: half of the fraction modified in place (new pixels, same path), a quarter added, a quarter
deleted. Both the full build and the update are timed end to end (`build()` / `update()`: listing,
hashing, embedding, index, recall check, publication).

--seed-embeddings (for collections too large to embed on a small machine): the full build's vectors are
random unit vectors planted in the builder's checkpoint cache, so that build runs every stage except the
encoder; its time is then reported as that measured time plus photos / the encoder's bare-forward rate
(measured in this run, an upper bound of any embedding rate, so the estimate is a lower bound of the
full build and the ratio an upper bound), and marked as an estimate. The update always embeds for real.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index_build import bare_forward, make_checkpoint, make_photos  # noqa: E402

LOG = logging.getLogger("bench_index_update")


def seed_embeddings(photos: Path, root: Path, ckpt: Path) -> int:
    """Plant random unit vectors for every photo's content hash in the builder's checkpoint cache."""
    from index_builder.build import WORK_DIR
    from index_builder.collection import load_collection
    from index_builder.embed import EmbeddingCache, hash_photos
    from model.pipeline import checkpoint_sha256
    from model.rerank import RerankConfig, unit_parts

    coll = load_collection(photos)
    hashes, _ = hash_photos(coll.records, coll.root, progress=False)
    config = json.loads((ckpt / "config.json").read_text())
    dim = int(config["dim"])
    search_dim = int(config.get("search_dim") or dim)  # rows are [zs | v | r] where the model re-ranks
    rerank = RerankConfig.from_dict(config.get("rerank"))
    cache = EmbeddingCache(root / WORK_DIR / checkpoint_sha256(ckpt)[:16] / "chunks", dim)
    shas = sorted(set(hashes.values()))
    rng = np.random.default_rng(0)
    for start in range(0, len(shas), 50_000):
        part = shas[start : start + 50_000]
        v = rng.standard_normal((len(part), dim)).astype(np.float32)
        for part in unit_parts(v, search_dim, rerank):  # each part a unit vector (views of v)
            part /= np.linalg.norm(part, axis=1, keepdims=True)
        cache.write_chunk(part, v, [])
    return len(shas)


def change_collection(photos: Path, fraction: float, size: tuple[int, int], seed: int = 1) -> dict:
    files = sorted(photos.iterdir())
    n_change = max(1, round(len(files) * fraction))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(files), n_change, replace=False)
    modify, delete = picked[: n_change // 2], picked[n_change // 2 : n_change // 2 + n_change // 4]
    n_add = n_change - len(modify) - len(delete)
    scratch = photos.parent / "_new"
    make_photos(scratch, len(modify) + n_add, size, seed=10_000 + seed)
    new = sorted(scratch.iterdir())
    for i, j in enumerate(modify):
        shutil.move(new[i], files[j])
    for i in range(n_add):
        shutil.move(new[len(modify) + i], photos / f"added_{seed}_{i:06d}.jpg")
    for j in delete:
        files[j].unlink()
    shutil.rmtree(scratch)
    return {"modified": len(modify), "added": n_add, "deleted": len(delete)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=100_000)
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--size", default="160x120", help="photo size WxH (small keeps 100k photos on disk)")
    p.add_argument("--seed-embeddings", action="store_true", help="see the module docstring")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_index_update"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from index_builder.build import BuildOptions, build, update

    size = tuple(int(v) for v in args.size.lower().split("x"))
    work = args.workdir
    ckpt = work / "model" if (work / "model" / "config.json").is_file() else make_checkpoint(work / "model")
    photos = work / f"photos_{args.photos}_{args.size}"
    shutil.rmtree(photos, ignore_errors=True)
    t0 = time.perf_counter()
    make_photos(photos, args.photos, size)
    LOG.info("made %d photos in %.0fs", args.photos, time.perf_counter() - t0)
    root = work / "index"
    shutil.rmtree(root, ignore_errors=True)
    opts = BuildOptions(progress=False)

    seeded = seed_embeddings(photos, root, ckpt) if args.seed_embeddings else 0
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    full = build(photos, root, ckpt, opts)
    full_s = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    change = change_collection(photos, args.changed, size)
    t0 = time.perf_counter()
    upd = update(root, photos, opts)
    update_s = time.perf_counter() - t0
    load.append(os.getloadavg()[0])

    embed_rate = upd.report["embedding"]["photos_per_s"]
    bare = None
    if seeded:
        from model.pipeline import SBIRModel

        bare = bare_forward(SBIRModel.load(ckpt, device="cpu"), sorted(photos.iterdir()), 32, 30.0)
    full_estimated = full_s + (seeded / bare if seeded else 0.0)
    out = {
        "photos": args.photos,
        "size": args.size,
        "change": change,
        "seeded_embeddings": seeded,
        "full_build_s": round(full_s, 1),
        "full_build_s_with_embedding": round(full_estimated, 1),
        "full_build_estimated": bool(seeded),
        "update_s": round(update_s, 1),
        "update_over_full": round(update_s / full_estimated, 4),
        "full_timings": full.report["timings"],
        "update_timings": upd.report["timings"],
        "update_counts": upd.report["counts"],
        "update_embed_rate_per_s": embed_rate,
        "bare_forward_per_s": round(bare, 2) if bare else None,
        "index": upd.report["index"]["factory"],
        "load_average": [round(x, 2) for x in load],
    }
    print(json.dumps(out, indent=2))
    kind = "estimated: measured without encoder + photos / bare-forward rate" if seeded else "measured"
    print(
        f"\n{args.photos} photos, {sum(change.values())} changed ({change}): full build {full_estimated:.0f}s "
        f"[{kind}], update {update_s:.1f}s -> {100 * out['update_over_full']:.2f}% of a full build; "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
