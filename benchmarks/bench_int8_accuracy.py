"""Accuracy of models trained on fp32 features when the index and the queries are encoded in int8.

    sbir features DATASET                          # the fp32 cache the models were trained on
    sbir features DATASET --cpu-precision int8     # DATASET/features/BACKBONE-int8
    python benchmarks/bench_int8_accuracy.py DATASET --runs runs/emoji/seed0 runs/emoji/seed1 ...

Runs `sbir eval`'s evaluation (model.evaluate.evaluate_runs, no figures) of the same runs once on
each feature cache, then prints, for every task of the benchmark and every method, mAP@all and P@1
in fp32 and int8 (mean over the runs) and the largest per-run difference, against the tolerance
(`--map-tol` 0.005, `--p1-tol` 0.01). Any dataset with a manifest and both caches works (e.g. a
held-out drawing-style set). Exit status 1 when IIAE, the served model, is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="output directories of `sbir train`")
    ap.add_argument("--fp32-features", type=Path, help="default: DATASET/features/BACKBONE")
    ap.add_argument("--int8-features", type=Path, help="default: DATASET/features/BACKBONE-int8")
    ap.add_argument("--out", type=Path, help="reports go to OUT/fp32 and OUT/int8 (default: FIRST_RUN/int8-check)")
    ap.add_argument("--map-tol", type=float, default=0.005)
    ap.add_argument("--p1-tol", type=float, default=0.01)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from model.commands import default_features_dir
    from model.data.dataset import read_manifest
    from model.evaluate import evaluate_runs
    from model.features import FEATURES_FILE, FeatureSet

    backbone = json.loads((args.runs[0] / "model" / "config.json").read_text())["backbone"]["name"]
    dirs = {"fp32": args.fp32_features or default_features_dir(args.dataset, backbone),
            "int8": args.int8_features or default_features_dir(args.dataset, backbone, "int8")}
    for precision, path in dirs.items():
        if not (path / FEATURES_FILE).is_file():
            flag = "" if precision == "fp32" else " --cpu-precision int8"
            print(f"no {precision} features in {path}: run `sbir features {args.dataset}{flag}`", file=sys.stderr)
            return 2
    records = read_manifest(args.dataset)
    out = args.out or args.runs[0] / "int8-check"
    reports = {}
    for precision, path in dirs.items():
        fs = FeatureSet.load(path)
        got = fs.meta["plan"]["backbone"].get("precision", "fp32")
        if got != precision:
            print(f"{path} holds {got} features, not {precision}", file=sys.stderr)
            return 2
        reports[precision] = evaluate_runs(args.dataset, records, fs, args.runs, out / precision, figures=False)

    rows, worst_iiae = [], {"mAP@all": 0.0, "P@1": 0.0}
    fp32_runs, int8_runs = reports["fp32"]["runs"], reports["int8"]["runs"]
    for task, methods in fp32_runs[0]["tasks"].items():
        for method in methods:
            line = {"task": task, "method": method}
            for metric, tol in (("mAP@all", args.map_tol), ("P@1", args.p1_tol)):
                a = [r["tasks"][task][method][metric] for r in fp32_runs]
                b = [r["tasks"][task][method][metric] for r in int8_runs]
                diff = max((y - x for x, y in zip(a, b, strict=True)), key=abs)
                line[metric] = {"fp32": sum(a) / len(a), "int8": sum(b) / len(b), "worst_diff": diff,
                                "ok": abs(diff) <= tol}
                if method == "iiae":
                    worst_iiae[metric] = max(worst_iiae[metric], abs(diff), key=abs)
            rows.append(line)
    print(f"{args.dataset}: {len(args.runs)} run(s); mean over runs, and the largest int8 - fp32 difference of one run")
    print("| task | method | mAP@all fp32 | mAP@all int8 | worst diff | P@1 fp32 | P@1 int8 | worst diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, p = r["mAP@all"], r["P@1"]
        flag = lambda x: "" if x["ok"] else " (out)"  # noqa: E731
        print(f"| {r['task']} | {r['method']} | {m['fp32']:.4f} | {m['int8']:.4f} | {m['worst_diff']:+.4f}{flag(m)} "
              f"| {p['fp32']:.4f} | {p['int8']:.4f} | {p['worst_diff']:+.4f}{flag(p)} |")
    ok = abs(worst_iiae["mAP@all"]) <= args.map_tol and abs(worst_iiae["P@1"]) <= args.p1_tol
    print(f"IIAE: largest |difference| mAP@all {abs(worst_iiae['mAP@all']):.4f} (tolerance {args.map_tol}), "
          f"P@1 {abs(worst_iiae['P@1']):.4f} (tolerance {args.p1_tol}): {'within' if ok else 'OUT OF'} tolerance")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "iiae_within_tolerance": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
