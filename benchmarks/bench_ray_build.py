"""Ray's overhead: photos/s of a build on a local Ray cluster against the single-process build, same
machine, same collection, same cores, in one run.

Three builds per round, alternated so load that comes and goes on a shared machine hits them alike:
- single: `sbir index build` as it runs without Ray (decode worker processes + the encoder's threads);
- ray x1: one encoder actor holding every CPU of the cluster (its threads = its CPUs);
- ray x2: one actor per CPU, one thread each.
The cluster is started once in this process (`ray.init(num_cpus=cores)`), as `--ray local` would;
its start-up is reported apart. Rates are the embedding stage's (photos / seconds of that stage; for
Ray this includes starting the actors and loading one model in each) and end to end (the whole job).

    .venv/bin/python benchmarks/bench_ray_build.py --photos 200 --size 320x240 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index_build import make_checkpoint, make_photos  # noqa: E402

LOG = logging.getLogger("bench_ray_build")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--size", default="320x240", help="photo size WxH")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="CPUs for every build")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=32, help="photos per checkpoint chunk / Ray block")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)

    import ray

    from index_builder.build import BuildOptions, build

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ray_build_"))
    ckpt = work / "model" if (work / "model" / "config.json").is_file() else make_checkpoint(work / "model")
    photos = work / f"photos_{args.photos}_{args.size}"
    if not photos.is_dir() or len(list(photos.iterdir())) != args.photos:
        shutil.rmtree(photos, ignore_errors=True)
        make_photos(photos, args.photos, tuple(int(v) for v in args.size.lower().split("x")))

    t0 = time.perf_counter()
    ray.init(
        num_cpus=args.cores,
        object_store_memory=200_000_000,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    startup = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    common = {"batch_size": args.batch_size, "chunk_size": args.chunk_size, "progress": False}
    configs = {
        "single": BuildOptions(threads=args.cores, **common),
        "ray x1": BuildOptions(ray="local", ray_actors=1, ray_actor_cpus=args.cores, **common),
        "ray x2": BuildOptions(ray="local", ray_actors=args.cores, ray_actor_cpus=1, **common),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, opt in configs.items():
            root = work / f"index-{name.replace(' ', '')}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            load = os.getloadavg()[0]
            result = build(photos, root, ckpt, opt)
            rep = result.report
            runs[name].append(
                {
                    "embed_photos_per_s": args.photos / rep["timings"]["embed_s"],
                    "end_to_end_photos_per_s": args.photos / rep["timings"]["total_s"],
                    "embed_s": rep["timings"]["embed_s"],
                    "total_s": rep["timings"]["total_s"],
                    "load": round(load, 1),
                }
            )
            LOG.info("round %d %s: %s", r + 1, name, runs[name][-1])
            shutil.rmtree(root, ignore_errors=True)
    ray.shutdown()

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    out = {
        "photos": args.photos,
        "size": args.size,
        "cores": args.cores,
        "ray_startup_s": startup,
        "runs": runs,
    }
    print(
        f"{args.photos} photos {args.size}, {args.cores} cores, Ray start-up {startup:.1f}s (not in the rates)"
    )
    print("| build | embed photos/s (median) | x single | end to end photos/s | x single | load avg |")
    print("|---|---|---|---|---|---|")
    for name in configs:
        e, t = med(name, "embed_photos_per_s"), med(name, "end_to_end_photos_per_s")
        out[name] = {
            "embed_ratio": e / med("single", "embed_photos_per_s"),
            "end_to_end_ratio": t / med("single", "end_to_end_photos_per_s"),
        }
        loads = ", ".join(str(x["load"]) for x in runs[name])
        print(
            f"| {name} | {e:.2f} | {out[name]['embed_ratio']:.3f} | {t:.2f} | "
            f"{out[name]['end_to_end_ratio']:.3f} | {loads} |"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
