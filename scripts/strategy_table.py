#!/usr/bin/env python3
"""The README's strategy table from one or more sweep folders (one per data draw).

    python3 scripts/strategy_table.py results/strategies [results/strategies-draw1 ...] [--joint joint_matched]

Per sweep (its `summary.csv`, `index.csv`, `differences.csv` and `references/`), one row per
experiment file: the seeds; per task the final (mean ± sd over seeds), the change from the
single-task baseline pooled over the seeds with its 95 % interval (hierarchical paired
bootstrap: seeds, then test images) and the pooled verdict with the seeds whose own verdict is
"within"; the seeds that kept every task within 5 % with the Clopper–Pearson interval of that
rate; the images the rehearsal buffers keep (and their pixels' MiB); the training time per
run; and each final's paired difference from the `joint_matched` reference (compute-matched
joint training; same seeds, same test images) with its interval. The single-task references the
runs were judged against are a row of their own. Only finished runs count.
Standard library only.
"""
import argparse
import csv
import glob
import json
import os
import re
import statistics
import sys

TASKS = [("seg", "miou", "mIoU"), ("det", "map50", "mAP@.5"), ("cls", "top1", "Top-1")]


def rows_of(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(x):
    return float(x) if x not in (None, "") else None


def pct(d):
    """A drop as a signed change: 0.031 -> '−3.1 %'."""
    if d is None:
        return "—"
    c = -100 * d
    return "±0 %" if abs(c) < 0.05 else f"{c:+.1f} %".replace("-", "−")


def pts(x):
    return f"{x:+.3f}".replace("-", "−")


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = statistics.fmean(xs)
    return f"{m:.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def stem(file):
    return os.path.splitext(os.path.basename(file))[0]


def references(sweep, index):
    """The references the sweep's finished runs were judged against (their summaries'
    `baseline_run`; one per seed and benchmark), not whatever else `references/` holds,
    grouped by data draw and by their stages' epochs (a longer first stage is another
    reference): a list of `(label, {task: [finals]})`. A run copied from another sweep names
    a reference there; it is read where the run names it, else under this sweep's
    `references/` by its key."""
    used = set()
    for x in index:
        if x.get("status") == "ok" and x.get("run_dir"):
            s = json.load(open(os.path.join(x["run_dir"], "summary.json")))
            ref = (s.get("baseline_run") or "").rstrip("/")
            if not ref:
                continue
            here = os.path.join(sweep, "references", os.path.basename(ref))
            for d in (ref, here):
                if os.path.exists(os.path.join(d, "summary.json")):
                    used.add(os.path.realpath(d))
                    break
    # One reference may be reached by two paths (hard-linked copies), or trained under two
    # keys (a config section added since changes the key, not the training): count one per
    # seed, data draw and stage epochs.
    by_key = {}
    for d in sorted(used):
        cfg = tomllib_load(os.path.join(d, "config.toml"))
        stages = cfg.get("stages", [])
        draw = cfg.get("data", {}).get("synth_seed", 0)
        epochs = " / ".join(f"{st.get('task')} {st.get('epochs')}" for st in stages)
        by_key.setdefault((cfg.get("seed"), draw, epochs), d)
    groups = {}
    for (_, draw, epochs), d in by_key.items():
        out = groups.setdefault((draw, epochs), {t: [] for t, _, _ in TASKS})
        s = json.load(open(os.path.join(d, "summary.json")))
        for t, m, _ in TASKS:
            v = s.get("final_metrics", {}).get(f"{t}_{m}")
            if v is not None:
                out[t].append(v)
    draws = {k[0] for k in groups}
    kinds = {k[1] for k in groups}
    out = []
    for (draw, epochs), g in sorted(groups.items()):
        parts = ([f"synth_seed {draw}"] if len(draws) > 1 else []) + ([f"{epochs} epochs"] if len(kinds) > 1 else [])
        out.append(("single-task reference" + (f" ({', '.join(parts)})" if parts else ""), g))
    return out


def draw_suffix(config):
    """`__synth_seed-1` of a config made by a grid over data.synth_seed, else ''."""
    m = re.search(r"__synth_seed-\d+", config)
    return m.group(0) if m else ""


def config_of(run):
    """The config a run of index.csv belongs to: its name without the seed suffix."""
    name = run.get("name", "")
    return name.rsplit("__seed-", 1)[0] if "__seed-" in name else name


def tomllib_load(path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def images_kept(run_dir):
    """Rehearsal memory of a run: images its buffers keep at the end and their MiB as onehead
    holds them (f32 pixels plus stored outputs; summary.json `buffers`). A run from before that
    record gets the count worked out from its config (`full` keeps every image of every earlier
    stage) and the MiB of its f32 pixels only, marked with a dagger: its stored outputs are not
    known."""
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    bufs = s.get("buffers") or {}
    if bufs:
        n = sum(b.get("images", 0) for b in bufs.values())
        mib = sum(b.get("images_mib", 0) + b.get("outputs_mib", 0) for b in bufs.values())
        return f"{n} ({mib:.1f} MiB)"
    cfg = tomllib_load(os.path.join(run_dir, "config.toml"))
    rep = cfg.get("replay", {})
    if not rep.get("enabled", False):
        return "0"
    stages = cfg.get("stages", [])
    train = cfg.get("data", {}).get("synth_train", 240)
    size = cfg.get("model", {}).get("image_size", 160)
    if rep.get("policy", "full") == "full":
        n = train * max(len(stages) - 1, 0)
    else:
        cap = rep.get("capacity", 0)
        n = cap * max(len(stages) - 1, 0) if rep.get("capacity_unit") == "per_task" else cap
    return f"{n} ({n * size * size * 3 * 4 / 2**20:.1f} MiB†)" if n else "0"


def header(joint):
    head = ["experiment", "seeds"]
    for t, _, label in TASKS:
        head += [f"{t} {label} final", f"{t} change vs single-task [95 % CI], verdict (seeds within)"]
    head += ["every task within (seeds) [95 % CI]", "images kept (pixels)", "time / run",
             f"final − {joint}: seg / det / cls [95 % CI]"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def table(sweep, joint, own_end):
    rows, refs, dagger = sweep_rows(sweep, joint, own_end)
    lines = header(joint) + ["| " + " | ".join(c) + " |" for c in rows + refs]
    if dagger:
        lines.append(DAGGER)
    return "\n".join(lines)


DAGGER = ("\n† f32 pixels only: these runs predate `summary.json`'s `buffers` record, "
          "so the outputs they stored are not counted.")


def one_table(sweeps, joint, own_end):
    """Every sweep's rows in one table, each experiment named `sweep/experiment`; the
    single-task reference rows once each (a row shared by several sweeps — the same references
    hard-linked into each — names them all)."""
    lines, refs, dagger = header(joint), {}, False
    for sweep in sweeps:
        name = os.path.basename(os.path.normpath(sweep))
        rows, ref_rows, d = sweep_rows(sweep, joint, own_end)
        dagger |= d
        for c in rows:
            c[0] = f"`{name}/{c[0].strip('`')}`"
            lines.append("| " + " | ".join(c) + " |")
        for c in ref_rows:
            refs.setdefault(tuple(c), []).append(name)
    for c, names in refs.items():
        c = list(c)
        c[0] = f"{c[0]} — {', '.join(names)}"
        lines.append("| " + " | ".join(c) + " |")
    if dagger:
        lines.append(DAGGER)
    return "\n".join(lines)


def sweep_rows(sweep, joint, own_end):
    """The table cells of a sweep: `(experiment rows, single-task reference rows, dagger)`."""
    summary = rows_of(os.path.join(sweep, "summary.csv"))
    index = rows_of(os.path.join(sweep, "index.csv"))
    diffs = rows_of(os.path.join(sweep, "differences.csv"))
    lines, ref_lines = [], []
    # A row is named by its file's stem, unless a grid made several rows of one file (then by
    # its config: `distill_budget__capacity-30`); a grid over data.synth_seed alone only
    # suffixes the draw, which the caption says.
    per_file = {}
    for r in summary:
        per_file[r.get("file")] = per_file.get(r.get("file"), 0) + 1
    name_of = lambda r: (stem(r["file"]) if r.get("file") and per_file[r["file"]] == 1 else r["config"])
    configs = {r["config"] for r in summary}
    # The joint reference of a row: the same draw's when the sweep has a grid over
    # data.synth_seed (`joint_matched__synth_seed-1` for `x__synth_seed-1`).
    joint_of = lambda c: next((j for j in (joint + draw_suffix(c), joint) if j in configs),
                              next((r["config"] for r in summary if name_of(r) == joint), joint))
    base = lambda c: c.replace(draw_suffix(c), "")
    own_end = [r["config"] for r in summary
               if name_of(r) in own_end or r["config"] in own_end or base(r["config"]) in own_end]
    dagger = False
    has_joint = any(base(c) == joint for c in configs)
    for r in summary:
        joint_r = joint_of(r["config"])
        if r.get("n_seeds") in ("0", 0):
            continue  # nothing finished yet
        name = name_of(r)
        cells = [f"`{name}`", r["n_seeds"]]
        for t, m, _ in TASKS:
            finals = [num(x[f"{t}_{m}_final"]) for x in index
                      if x.get("status") == "ok" and config_of(x) == r["config"]]
            cells.append(mean_sd(finals))
            d, lo, hi = (num(r.get(f"{t}_drop_pooled{s}")) for s in ("", "_lo", "_hi"))
            verdict = (r.get(f"{t}_verdict_pooled") or "—").replace("_", " ")
            if r["config"] in own_end:
                cells.append("(reference)")
            elif d is None:
                cells.append("—")
            else:
                cells.append(f"{pct(d)} [{pct(hi)}, {pct(lo)}] {verdict} ({r[f'{t}_n_pass']}/{r['n_seeds']})")
        lo, hi = num(r.get("pass_rate_lo")), num(r.get("pass_rate_hi"))
        if r["config"] in own_end:
            cells.append("reference")
        else:
            cells.append(f"{r['n_pass']}/{r['n_seeds']}" + ("" if lo is None else f" [{100 * lo:.0f}–{100 * hi:.0f} %]"))
        done = [x for x in index if x.get("status") == "ok" and config_of(x) == r["config"]]
        kept = images_kept(done[0]["run_dir"]) if done and done[0].get("run_dir") else "—"
        dagger |= "†" in kept
        cells.append(kept)
        secs = [num(x["train_seconds"]) for x in done]
        secs = [s for s in secs if s is not None]
        cells.append(f"{statistics.fmean(secs) / 60:.1f} min" if secs else "—")
        vs = []
        for t, m, _ in TASKS:
            cell = "—"
            for dr in diffs:
                if dr["task"] != t:
                    continue
                sign = 1 if (dr["a"], dr["b"]) == (r["config"], joint_r) else -1 if (dr["a"], dr["b"]) == (joint_r, r["config"]) else 0
                if sign:
                    v, a, b = (sign * float(dr[k]) for k in ("final_a_minus_b", "lo", "hi"))
                    a, b = min(a, b), max(a, b)
                    cell = f"{pts(v)} [{pts(a)}, {pts(b)}]"
            vs.append(cell)
        if r["config"] == joint_r:
            cells.append("reference")
        elif any(v != "—" for v in vs):
            cells.append(" / ".join(vs))
        else:
            cells.append("not paired yet" if has_joint else f"— (no {joint} in this sweep)")
        lines.append(cells)
    for label, refs in references(sweep, index):
        n = max(len(v) for v in refs.values())
        if n:
            cells = [label, str(n)]
            for t, _, _ in TASKS:
                cells += [mean_sd(refs[t]), "(the baseline)"]
            cells += ["—", "—", "—", "—"]
            ref_lines.append(cells)
    return lines, ref_lines, dagger


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sweeps", nargs="+", help="sweep folders (results/<name>)")
    ap.add_argument("--joint", default="joint_matched",
                    help="config name of the joint reference the finals are compared with (default: the compute-matched one)")
    ap.add_argument("--own-end", default="joint_matched",
                    help="comma-separated configs judged against their own end (references without a single-task baseline): finals only")
    ap.add_argument("--one-table", action="store_true",
                    help="all sweeps' rows in one table (experiments named sweep/experiment)")
    a = ap.parse_args()
    if a.one_table:
        print(one_table(a.sweeps, a.joint, a.own_end.split(",")))
        return
    for sweep in a.sweeps:
        print(f"\n{sweep}:\n")
        print(table(sweep, a.joint, a.own_end.split(",")))


if __name__ == "__main__":
    sys.exit(main())
