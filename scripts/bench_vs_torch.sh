#!/usr/bin/env bash
# onehead vs the PyTorch reference (docs/torch_ref), measured back to back, never at the
# same time: ROUNDS rounds of `onehead bench --json` then the reference's own model and loss
# (scripts/torch_ref_step.py, timed like docs/torch_ref/bench.py: 2 threads, batch 16, glibc
# malloc tuned), ratios taken round by round (pairing survives drift), medians printed.
#
# Usage: scripts/bench_vs_torch.sh [ROUNDS]      (default 3; needs a release build)
# Env:   TORCH_PY   python with torch + torchvision   (default ~/.venvs/torch/bin/python;
#                   python3 -m venv ~/.venvs/torch && ~/.venvs/torch/bin/pip install torch torchvision)
#        TORCH_REF  the reference directory            (default docs/torch_ref)
#        ONEHEAD    the onehead binary                 (default target/release/onehead)
#        STEPS      timed steps per measurement        (default 10)
# Run it on an otherwise idle machine: each round prints the cores other processes kept busy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${TORCH_PY:-$HOME/.venvs/torch/bin/python}
REF=${TORCH_REF:-docs/torch_ref}
ONEHEAD=${ONEHEAD:-target/release/onehead}
STEPS=${STEPS:-10}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

busy() { # cores kept busy by anything during `sleep $1`
    read -r _ a b c d e f g h _ < /proc/stat; t1=$((a+b+c+d+e+f+g+h)); i1=$((d+e))
    sleep "$1"
    read -r _ a b c d e f g h _ < /proc/stat; t2=$((a+b+c+d+e+f+g+h)); i2=$((d+e))
    awk -v n="$(nproc)" -v t=$((t2-t1)) -v i=$((i2-i1)) 'BEGIN{printf "%.2f", n*(1-i/t)}'
}

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS: cores busy before: $(busy 3)" >&2
    "$ONEHEAD" bench --json --replay 0 --steps "$STEPS" --sizes 160,224 > "$OUT/onehead.$r.json"
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
        "$PY" scripts/torch_ref_step.py --json --threads 2 --steps "$STEPS" --sizes 160,224 \
        --torch-ref "$REF" > "$OUT/torch.$r.json"
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for r in range(1, rounds + 1):
    o = json.load(open(f"{out}/onehead.{r}.json"))
    t = json.load(open(f"{out}/torch.{r}.json"))
    ot = {x["image_size"]: x["images_per_sec"] for x in o["train"]}
    tt = {x["size"]: x["images_per_sec"] for x in t["train"]}
    for s in sorted(ot):
        rows.setdefault(f"training {s}x{s} b16 (img/s)", []).append((ot[s], tt[s]))
    rows.setdefault("inference 224 b16 (img/s)", []).append(
        (o["inference_b16"]["images_per_sec"], t["inference_b16"]["images_per_sec"]))
    # latency: lower is better, so the ratio is torch / onehead
    rows.setdefault("latency 224 b1 (1/ms)", []).append(
        (1.0 / o["latency_b1_ms"], 1.0 / t["latency_b1_ms"]))
    rows.setdefault("cores busy elsewhere (load)", []).append(
        (o.get("foreign_cores_busy") or 0.0, t.get("foreign_cores_busy") or 0.0))
print(f"{'measurement':34s} {'onehead':>9s} {'pytorch':>9s} {'ratio':>7s}   per round")
for k, v in rows.items():
    if k.startswith("cores busy"):
        print(f"{k:34s} " + " ".join(f"{a:.2f}/{b:.2f}" for a, b in v)
              + "   (onehead/pytorch run; above ~0.2 the round is contaminated)")
        continue
    ratios = [a / b for a, b in v]
    fmt = (lambda x: f"{1/x:9.2f}") if "latency" in k else (lambda x: f"{x:9.1f}")
    name = k.replace("(1/ms)", "(ms)")
    print(f"{name:34s} {fmt(statistics.median(a for a, _ in v))} "
          f"{fmt(statistics.median(b for _, b in v))} {statistics.median(ratios):7.2f}x  "
          + " ".join(f"{x:.2f}" for x in ratios))
print("ratio = onehead / PyTorch throughput (latency: PyTorch ms / onehead ms); > 1 is onehead faster")
PY
