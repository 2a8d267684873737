#!/usr/bin/env python3
"""The README's strategy table from the `index.csv` of one or more sweeps.

    python3 scripts/strategy_table.py results/strategies/index.csv [more/index.csv ...] [--joint joint]

One row per experiment file (seeds pooled): baseline mean, final metric mean ± sd and relative change mean ± sd
per task, how many seeds kept every task within tolerance, whether the seed-mean changes are all
within 5 %, training time per run, and each final's distance to the `joint` reference
(final − joint's final, in metric points). Only finished runs (`status = ok`) count.
Standard library only.
"""
import argparse
import csv
import os
import statistics
import sys
from collections import OrderedDict

TASKS = [("seg", "miou", "mIoU"), ("det", "map50", "mAP@.5"), ("cls", "top1", "Top-1")]


def mean_sd(xs):
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def pm(m, s, digits=3, pct=False):
    if m is None:
        return "—"
    def f(v):
        if not pct:
            return f"{v:.{digits}f}"
        return "±0.0 %" if abs(v) < 5e-4 else f"{100 * v:+.1f} %".replace("-", "−")
    return f(m) + ("" if s is None else (f" ± {100 * s:.1f}" if pct else f" ± {s:.{digits}f}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("index", nargs="+")
    ap.add_argument("--joint", default="joint", help="file stem of the joint reference experiment")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--references", default="joint,single_task",
                    help="file stems of reference modes (no verdict: nothing is learned in sequence)")
    a = ap.parse_args()
    runs = OrderedDict()
    for path in a.index:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("status") != "ok":
                    continue
                # Seeds of one experiment file pool into one row (run names carry the seed).
                key = os.path.splitext(os.path.basename(row["file"]))[0] if row.get("file") else row["name"]
                runs.setdefault(key, []).append(row)
    joint = runs.get(a.joint, [])
    head = ["experiment", "seeds"]
    for t, _, label in TASKS:
        head.append(f"{t} {label}: baseline → final (change)")
    head += ["all within 5 % (seeds)", "mean within 5 %", "time / run"]
    if joint:
        head.append("final − joint (seg / det / cls)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, rows in runs.items():
        cells = [f"`{name}`", str(len(rows))]
        mean_ok = True
        deltas = []
        for t, m, _ in TASKS:
            base = [float(r[f"{t}_{m}_baseline"]) for r in rows if r.get(f"{t}_{m}_baseline")]
            fin = [float(r[f"{t}_{m}_final"]) for r in rows if r.get(f"{t}_{m}_final")]
            drop = [float(r[f"{t}_{m}_drop"]) for r in rows if r.get(f"{t}_{m}_drop")]
            fm, fs = mean_sd(fin)
            dm, ds = mean_sd(drop)
            # index.csv's drop is (baseline − final) / baseline; show the change (final vs base).
            cm = None if dm is None else -dm
            bm, _ = mean_sd(base)
            cells.append(f"{pm(bm, None)} → {pm(fm, fs)} ({pm(cm, ds, 3, pct=True)})")
            # A task never learned (baseline near chance) cannot pass, whatever its change.
            if dm is None or dm > a.tolerance or any(r.get(f"{t}_verdict") == "not_learned" for r in rows):
                mean_ok = False
            jf = [float(r[f"{t}_{m}_final"]) for r in joint if r.get(f"{t}_{m}_final")]
            deltas.append(None if not jf or fm is None else fm - statistics.fmean(jf))
        n_pass = sum(r.get("pass") == "true" for r in rows)
        secs = [float(r["train_seconds"]) for r in rows if r.get("train_seconds")]
        is_ref = name in a.references.split(",")
        cells += [
            "reference" if is_ref else f"{n_pass}/{len(rows)}",
            "reference" if is_ref else ("**yes**" if mean_ok else "no"),
            f"{statistics.fmean(secs) / 60:.1f} min" if secs else "—",
        ]
        if joint:
            cells.append(" / ".join("—" if d is None else f"{d:+.3f}".replace("-", "−") for d in deltas))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
