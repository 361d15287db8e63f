"""`sbir index build|update|verify|info`: the index builder's command line (flags = BuildOptions fields).

Heavy imports (torch, faiss) happen inside the command functions so that `sbir --help` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from pathlib import Path

from model.ground.errors import UserError

LOG = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GiB', '512M', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512M)")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def _shard_count(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shard count: {text!r} (a number or auto)") from None


def add_commands(subparsers) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded is not news
    index = subparsers.add_parser("index", help="build, update and check FAISS index snapshots of photos")
    sub = index.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    index.set_defaults(func=lambda args: (index.print_help(), 2)[1])

    b = sub.add_parser("build", help="embed a photo collection and publish a new snapshot")
    b.add_argument("photos", type=Path, help="directory tree of photos, or a CSV/JSONL/parquet manifest")
    b.add_argument("--model", type=Path, required=True, help="model checkpoint directory")
    b.add_argument("--out", type=Path, required=True, help="index root (holds CURRENT and snapshots/)")
    _add_build_options(b)
    b.set_defaults(func=_cmd_build)

    u = sub.add_parser("update", help="embed only new or changed photos, drop deleted ones, publish")
    u.add_argument("root", type=Path, help="index root with a published snapshot")
    u.add_argument("photos", type=Path, help="the collection as it is now (directory or manifest)")
    u.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model checkpoint (default: the one pinned by the current snapshot)",
    )
    u.add_argument(
        "--rebuild", action="store_true", help="re-embed everything (required for a different model)"
    )
    _add_build_options(u)
    u.set_defaults(func=_cmd_update)

    v = sub.add_parser("verify", help="check a snapshot's checksums and internal consistency")
    v.add_argument("root", type=Path)
    v.add_argument("--snapshot", default=None, help="snapshot id (default: CURRENT)")
    v.add_argument("--all", action="store_true", help="verify every snapshot under ROOT")
    v.set_defaults(func=_cmd_verify)

    i = sub.add_parser("info", help="describe the snapshots under ROOT")
    i.add_argument("root", type=Path)
    i.add_argument("--snapshot", default=None, help="snapshot id (default: CURRENT)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=_cmd_info)


def _add_build_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument(
        "--index",
        default="auto",
        metavar="FACTORY",
        help="faiss factory string (Flat, IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ16, HNSW32) or auto",
    )
    g.add_argument(
        "--memory-budget",
        type=parse_size,
        default="4GiB",
        help="memory the index may take, for the automatic choice (default 4GiB)",
    )
    g.add_argument(
        "--exact-max",
        type=int,
        default=None,
        help="largest collection indexed exactly by the automatic choice (default 100000)",
    )
    g.add_argument(
        "--recall-target",
        type=float,
        default=0.95,
        help="recall the search parameters are tuned to reach (default 0.95), at the depth the service "
        "searches: the top 400 candidates of a re-ranking model, else the top 10",
    )
    g.add_argument(
        "--keep", type=int, default=3, help="snapshots to keep, the current one included (default 3)"
    )
    g.add_argument(
        "--shards",
        type=_shard_count,
        default=None,
        metavar="N",
        help="split the index into N shards by id (default auto: the fewest that fit --shard-memory each)",
    )
    g.add_argument(
        "--shard-memory",
        type=parse_size,
        default="8GiB",
        help="most index memory per shard, for the automatic shard count (default 8GiB)",
    )
    r = p.add_argument_group("Ray (pip install 'sbir[ray]'; docs/INDEX.md)")
    r.add_argument(
        "--ray",
        default=None,
        metavar="ADDR",
        help="embed on a Ray cluster: ray://host:10001, host:6379, auto, or local (Ray in this process)",
    )
    r.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="encoder actors (default: one per GPU, else CPUs/actor CPUs)",
    )
    r.add_argument("--ray-actor-cpus", type=float, default=1.0, help="CPUs per CPU encoder actor (default 1)")
    e = p.add_argument_group("embedding")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument(
        "--batch-size", type=int, default=None, help="photos per encoder batch (default 32 CPU, 256 GPU)"
    )
    e.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: cores/4, at least 1)"
    )
    e.add_argument(
        "--threads", type=int, default=None, help="encoder threads on the CPU (default: all cores)"
    )
    e.add_argument("--chunk-size", type=int, default=512, help="photos per checkpoint chunk (default 512)")
    e.add_argument(
        "--cpu-precision", choices=["auto", "fp32", "int8"], default=None,
        help="backbone precision on the CPU (default $SBIR_CPU_PRECISION, else auto: int8 where the CPU has "
        "VNNI; an update keeps its snapshot's); recorded in the snapshot, and the service encodes queries in it",
    )  # fmt: skip
    m = p.add_argument_group("manifest")
    m.add_argument("--path-column", default="path", help="manifest column with the photo path (default path)")
    m.add_argument("--id-column", default="id", help="manifest column with a photo id (default id; optional)")
    m.add_argument(
        "--photo-root",
        type=Path,
        default=None,
        help="root that manifest paths are relative to and must stay inside (default: its folder)",
    )
    p.add_argument("--report", type=Path, default=None, help="also write the build report JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args):
    from index_builder import faiss_index
    from index_builder.build import BuildOptions

    return BuildOptions(
        index=args.index,
        memory_budget=args.memory_budget,
        exact_max=args.exact_max if args.exact_max is not None else faiss_index.EXACT_MAX,
        recall_target=args.recall_target,
        keep=args.keep,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        chunk_size=args.chunk_size,
        cpu_precision=args.cpu_precision,
        path_column=args.path_column,
        id_column=args.id_column,
        photo_root=args.photo_root,
        progress=not args.no_progress,
        shards=args.shards,
        shard_memory=args.shard_memory,
        ray=args.ray,
        ray_actors=args.ray_actors,
        ray_actor_cpus=args.ray_actor_cpus,
    )


# Errors of the file system the job writes to: said in one line, with what is kept, not a traceback.
_DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def _run_job(args, job) -> int:
    from index_builder.build import EmptyCollectionError, write_report

    try:
        result = job()
    except EmptyCollectionError as exc:
        if args.report:
            write_report(args.report, exc.report)
        raise
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        raise UserError(
            f"{_DISK_ERRNOS[exc.errno]} writing {exc.filename or 'the index'}: the published snapshot is "
            "unchanged and finished chunks are kept; free space and run the same command again"
        ) from exc
    if args.report:
        write_report(args.report, result.report)
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    r = result.report
    c = r["counts"]
    if not result.published:
        print(f"up to date: snapshot {result.snapshot_id} ({c['indexed']} photos), nothing published")
        return
    ix = r["index"]
    print(
        f"published snapshot {result.snapshot_id}: {c['indexed']} photos indexed, {c['embedded']} embedded now, "
        f"{c['from_checkpoint']} from checkpoints, {c['from_previous']} reused, {c['skipped']} skipped"
    )
    if "added" in c:
        print(
            f"  changes: +{c['added']} added, {c['changed']} changed, -{c['removed']} removed, "
            f"{c['unchanged']} unchanged"
        )
    rec = ix["recall"]
    shards = ix.get("shards") or {}
    if shards.get("count", 1) > 1:
        print(
            f"  {shards['count']} shards of {min(shards['sizes'])}-{max(shards['sizes'])} photos ({shards['reason']})"
        )
    print(
        f"  index {ix['factory']} ({ix['reason']}), search {ix['search_params'] or 'exact'}, "
        f"recall@{rec['k']} {rec['recall']:.3f} on {rec['queries']} sample queries"
    )
    for reason, n in sorted(r["skipped_by_reason"].items()):
        print(f"  skipped {n} x {reason}")
    print(f"  {r['timings']['total_s']:.1f}s total")


def _cmd_build(args) -> int:
    from index_builder.build import build

    return _run_job(args, lambda: build(args.photos, args.out, args.model, _options(args)))


def _cmd_update(args) -> int:
    from index_builder.build import update

    return _run_job(
        args,
        lambda: update(args.root, args.photos, _options(args), model_dir=args.model, rebuild=args.rebuild),
    )


def _cmd_verify(args) -> int:
    from index_builder.snapshot import Snapshot, SnapshotError, list_snapshots, read_current

    ids = list_snapshots(args.root) if args.all else [args.snapshot or read_current(args.root)]
    if ids == [None]:
        raise SnapshotError(f"{args.root} has no published snapshot (no CURRENT file)")
    if not ids:
        raise SnapshotError(f"{args.root} holds no snapshots")
    failed = 0
    for sid in ids:
        try:
            with Snapshot.open(args.root, sid, verify=True) as snap:
                shards = f" in {snap.shards} shards" if snap.shards > 1 else ""
                print(
                    f"ok {snap.id}: {snap.count} photos, {snap.factory}{shards}, all "
                    f"{len(snap.manifest['files'])} files match their checksums"
                )
        except SnapshotError as exc:
            failed += 1
            print(f"FAILED {sid}: {exc}", file=sys.stderr)
    if failed:
        raise SnapshotError(f"{failed} of {len(ids)} snapshot(s) failed verification")
    return 0


def _cmd_info(args) -> int:
    from index_builder.snapshot import Snapshot, list_snapshots, read_current

    current = read_current(args.root)
    snap = Snapshot.open(args.root, args.snapshot)
    try:
        if args.json:
            print(json.dumps(snap.manifest, indent=2, sort_keys=True))
            return 0
        m = snap.manifest
        ix = m["index"]
        recall = ix.get("recall") or {}
        print(
            f"snapshot {snap.id}{' (CURRENT)' if snap.id == current else ''}, created {m.get('created', '?')}"
        )
        shards = f" in {snap.shards} shards" if snap.shards > 1 else ""
        rr = snap.rerank
        raw = f" + {rr.raw_dim}-d backbone features" if rr is not None and rr.raw_dim else ""
        dims = (f"{snap.search_dim}-d searched + {rr.dim}-d{raw} re-ranking the top {rr.top} ({rr.vector})"
                if rr is not None else f"{snap.dim}-d")
        print(
            f"  {snap.count} photos, {dims}, index {ix['factory']}{shards} {ix.get('search_params') or 'exact'}, "
            f"recall@{recall.get('k', '?')} {recall.get('recall', float('nan')):.3f}, "
            f"{ix.get('bytes_per_vector', '?')} bytes/vector"
        )
        build = m.get("build", {})
        print(
            f"  model {snap.model_sha256[:16]} ({m['model'].get('backbone', '?')}), "
            f"built in {build.get('seconds', float('nan')):.1f}s by sbir {m.get('software', {}).get('sbir', '?')}"
        )
        if snap.precision == "int8":
            cal = snap.int8_calibration
            print("  backbone in int8, " + (f"calibration {cal['file']} sha256 {cal['sha256']}" if cal else
                                           "calibration not recorded (built before sbir recorded it)"))
        print(
            "snapshots: " + ", ".join(f"{s}{'*' if s == current else ''}" for s in list_snapshots(args.root))
        )
        for job in sorted(p for p in (args.root / ".work").glob("*") if p.is_dir()):
            chunks = list(job.glob("chunks/chunk-*.npz"))
            print(
                f"unfinished job for model {job.name}: {len(chunks)} checkpoint chunk(s), a rerun resumes them"
            )
    finally:
        snap.close()
    return 0
