"""Accuracy of models trained on fp32 features when the index and the queries are encoded in int8.

    sbir features DATASET                          # the fp32 cache the models were trained on
    sbir features DATASET --cpu-precision int8     # DATASET/features/BACKBONE-int8
    python benchmarks/bench_int8_accuracy.py DATASET --runs runs/emoji/seed0 runs/emoji/seed1 ...

Runs `sbir eval`'s evaluation (model.evaluate.evaluate_runs, no figures) of the same runs once on
each feature cache, then prints, for every task of the benchmark and every method, mAP@all and P@1
in fp32 and int8 (mean over the runs) and the largest per-run difference, against the tolerance
(`--map-tol` 0.005, `--p1-tol` 0.01), both as the difference of the means over the runs and as the
difference of the worst run. Any dataset with a manifest and both caches works (e.g. a held-out
drawing-style set). Exit status 1 when the served ranking (method "served": IIAE and its re-ranking
stage, as `sbir serve` answers) is out of tolerance on the mean over runs of any task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The method whose accuracy decides: what the service answers (model/evaluate.py METHODS).
JUDGED = "served"


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

    rows = compare(reports["fp32"]["runs"], reports["int8"]["runs"], args.map_tol, args.p1_tol)
    print(f"{args.dataset}: {len(args.runs)} run(s); mean over runs of fp32, int8 and int8 - fp32, and the "
          "int8 - fp32 difference of the worst run; (out): beyond the tolerance")
    print("| task | method | mAP@all fp32 | int8 | mean diff | worst run | P@1 fp32 | int8 | mean diff | worst run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for metric in ("mAP@all", "P@1"):
            x = r[metric]
            cells.append(f"{x['fp32']:.4f} | {x['int8']:.4f} | {x['mean_diff']:+.4f}{'' if x['mean_ok'] else ' (out)'} "
                         f"| {x['worst_diff']:+.4f}{'' if x['worst_ok'] else ' (out)'}")
        print(f"| {r['task']} | {r['method']} | " + " | ".join(cells) + " |")
    judged = [r for r in rows if r["method"] == JUDGED]
    failing = [f"{r['task']} {m}" for r in judged for m in ("mAP@all", "P@1") if not r[m]["mean_ok"]]
    worst = [f"{r['task']} {m}" for r in judged for m in ("mAP@all", "P@1") if not r[m]["worst_ok"]]
    ok = not failing
    print(f"{JUDGED}: mean over runs {'within' if ok else 'OUT OF'} tolerance (mAP@all {args.map_tol}, P@1 "
          f"{args.p1_tol}) on {len(judged) - len({f.rsplit(' ', 1)[0] for f in failing})} of {len(judged)} tasks"
          + (f"; out: {', '.join(failing)}" if failing else "")
          + (f"; beyond it in the worst run: {', '.join(worst)}" if worst else ""))
    if args.json:
        args.json.write_text(json.dumps({"judged_method": JUDGED, "rows": rows, "within_tolerance": ok,
                                         "out_of_tolerance": failing, "worst_run_out": worst}, indent=2) + "\n")
    return 0 if ok else 1


def compare(fp32_runs: list[dict], int8_runs: list[dict], map_tol: float, p1_tol: float) -> list[dict]:
    """Per task and method, for mAP@all and P@1: the means over runs, int8 - fp32 of the means, the
    difference of the run where it is largest, and each against its tolerance."""
    rows = []
    for task, methods in fp32_runs[0]["tasks"].items():
        for method in methods:
            line = {"task": task, "method": method}
            for metric, tol in (("mAP@all", map_tol), ("P@1", p1_tol)):
                a = [r["tasks"][task][method][metric] for r in fp32_runs]
                b = [r["tasks"][task][method][metric] for r in int8_runs]
                mean_diff = sum(b) / len(b) - sum(a) / len(a)
                worst = max((y - x for x, y in zip(a, b, strict=True)), key=abs)
                line[metric] = {"fp32": sum(a) / len(a), "int8": sum(b) / len(b), "mean_diff": mean_diff,
                                "worst_diff": worst, "mean_ok": abs(mean_diff) <= tol, "worst_ok": abs(worst) <= tol}
            rows.append(line)
    return rows


if __name__ == "__main__":
    sys.exit(main())
