#!/usr/bin/env bash
# onehead vs the PyTorch reference (docs/torch_ref) at its best, measured back to back, never at
# the same time: ROUNDS rounds of `onehead bench --json`, then the reference's own model and loss
# (scripts/torch_ref_step.py: 2 threads, batch 16, glibc malloc tuned) in each of PyTorch's
# variants — eager, channels-last (cl), torch.compile (compile), compile + channels-last
# (compile_cl); the first call of each measurement (compiling) is timed apart and reported on its
# own. Every figure's ratio is taken to the BEST PyTorch variant of the same round (pairing
# survives drift); medians and the per-round ratios are printed.
#
# Usage: scripts/bench_vs_torch.sh [ROUNDS]      (default 3; needs a release build)
# Env:   TORCH_PY   python with torch + torchvision   (default ~/.venvs/torch/bin/python;
#                   python3 -m venv ~/.venvs/torch && ~/.venvs/torch/bin/pip install torch torchvision)
#        TORCH_REF  the reference directory            (default docs/torch_ref)
#        ONEHEAD    the onehead binary                 (default target/release/onehead)
#        STEPS      timed steps per measurement        (default 10)
#        VARIANTS   PyTorch variants                   (default eager,cl,compile,compile_cl)
# Run it on an otherwise idle machine (never beside a sweep): each round prints the cores other
# processes kept busy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${TORCH_PY:-$HOME/.venvs/torch/bin/python}
REF=${TORCH_REF:-docs/torch_ref}
ONEHEAD=${ONEHEAD:-target/release/onehead}
STEPS=${STEPS:-10}
VARIANTS=${VARIANTS:-eager,cl,compile,compile_cl}
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
    for v in ${VARIANTS//,/ }; do
        MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
            "$PY" scripts/torch_ref_step.py --json --threads 2 --steps "$STEPS" --sizes 160,224 \
            --torch-ref "$REF" --variant "$v" > "$OUT/torch.$r.$v.json"
    done
done

python3 - "$OUT" "$ROUNDS" "$VARIANTS" <<'PY'
import json, statistics, sys
out, rounds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
# measurement -> per round: (onehead, {variant: pytorch}); higher is better throughout
# (latency is taken as 1/ms, so the ratio is best PyTorch ms / onehead ms).
rows, first = {}, {}
for r in range(1, rounds + 1):
    o = json.load(open(f"{out}/onehead.{r}.json"))
    t = {v: json.load(open(f"{out}/torch.{r}.{v}.json")) for v in variants}
    def put(name, mine, theirs):
        rows.setdefault(name, []).append((mine, theirs))
    for x in o["train"]:
        s = x["image_size"]
        put(f"training {s}x{s} b16 (img/s)", x["images_per_sec"],
            {v: next(y["images_per_sec"] for y in t[v]["train"] if y["size"] == s) for v in variants})
    put("inference 224 b16 (img/s)", o["inference_b16"]["images_per_sec"],
        {v: t[v]["inference_b16"]["images_per_sec"] for v in variants})
    put("latency 224 b1 (1/ms)", 1.0 / o["latency_b1_ms"],
        {v: 1.0 / t[v]["latency_b1_ms"] for v in variants})
    for v in variants:
        f = [y.get("first_s") for y in t[v]["train"]] + [t[v]["inference_b16"].get("first_s"),
                                                          t[v].get("latency_first_s")]
        first.setdefault(v, []).append(max(x or 0.0 for x in f))
    busy = [o.get("foreign_cores_busy") or 0.0] + [t[v].get("foreign_cores_busy") or 0.0 for v in variants]
    rows.setdefault("cores busy elsewhere", []).append(busy)

head = f"{'measurement':30s} {'onehead':>9s} " + " ".join(f"{v:>10s}" for v in variants)
print(head + f" {'best':>10s} {'vs best':>8s}   per round")
for k, v in rows.items():
    if k.startswith("cores busy"):
        print(f"{k:30s} " + "  ".join("/".join(f"{x:.2f}" for x in b) for b in v)
              + "   (onehead/each variant; above ~0.2 the round is contaminated)")
        continue
    lat = "latency" in k
    show = (lambda x: f"{1 / x:9.2f}") if lat else (lambda x: f"{x:9.1f}")
    med = {var: statistics.median(th[var] for _, th in v) for var in variants}
    best = max(variants, key=lambda var: med[var])
    ratios = [mine / max(th.values()) for mine, th in v]  # to the round's best variant
    name = k.replace("(1/ms)", "(ms)")
    print(f"{name:30s} {show(statistics.median(m for m, _ in v))} "
          + " ".join(f"{show(med[var]):>10s}" for var in variants)
          + f" {best:>10s} {statistics.median(ratios):7.2f}x   " + " ".join(f"{x:.2f}" for x in ratios))
print("first call (compiling) per variant, s: " + ", ".join(
    f"{v} {statistics.median(first[v]):.1f}" for v in variants) + " (not in any median)")
print("vs best = onehead / the best PyTorch variant of the same round (latency: best PyTorch ms / onehead ms); > 1 is onehead faster")
PY
