#!/usr/bin/env python3
"""Per-op-kind profile of onehead training steps from a `perf` recording, for the per-layer
code (before the fused executor) and the fused code alike.

    RAYON_NUM_THREADS=1 perf record -F 999 --call-graph dwarf,32768 -o perf.data \
        target/release/onehead bench --sizes 224 --steps 5 --replay 0
    perf script -i perf.data -F ip,sym | python3 scripts/perf_op_kinds.py --hz 999 --steps 7

Each sample's stack (inlined frames included) is scanned from the leaf; the first frame that
names a known op kind wins. Gradient-accumulation adds/zero-fills reached from candle's
`backward` count as autograd bookkeeping. Setup and the inference/latency measurements are
excluded. `--steps`: training steps the command ran (warm-ups included) for ms per step.
"""
import argparse, collections, re, sys

ap = argparse.ArgumentParser()
ap.add_argument("--hz", type=float, default=0, help="perf sampling frequency (for ms)")
ap.add_argument("--steps", type=int, default=0, help="training steps recorded (for ms/step)")
args = ap.parse_args()
RULES = [
    ("setup (excluded)", r"bench::setup|OneHead::new|rand_normal|rand_uniform|Init::var|Tensor::randn|Tensor::rand\b|bench::targets"),
    ("inference/latency (excluded)", r"bench_inference|median_latency_ms|sgemm_peak"),
    ("optimiser", r"Optimizer::step"),
    ("gemm", r"gemm_f32|gemm_common|gemm::gemm|MatMul|matmul"),
    ("depthwise", r"ops::depthwise|dw_fwd|dw_bwd|depthwise"),
    ("im2col / col2im", r"ops::im2col|kernels::im2col|kernels::col2im|Im2col|Col2im"),
    ("BatchNorm", r"channel::\{impl#[1267]\}|fused::kernels::(channel_stats|sum_sq_dev|affine_act|bn_act_bwd|bn_scale_shift|sum\b)"),
    ("activations / biases / channel affine", r"channel::\{impl#[0345]\}|fused::kernels::(act_fwd|act_bwd|add_bias|row_sums|add_scalar)"),
    ("squeeze-excite", r"se_fwd|se_bwd|scale_lanes|lane_sum|lane_dot|scale_add_lanes|small_mm|SqueezeExcite"),
    ("resize / upsample", r"ops::resize|upsample|subsample|up2_add|up2_bwd|Bilinear"),
    ("loss", r"ops::loss|PixelCe|cross_entropy|loss::mse|log_softmax|fastmath|reference_loss|bench_loss"),
    ("layout / adds (fused)", r"fused::kernels::(nchw_to_chwn|chwn_to_nchw|transpose|add\b|add_into|add_chunk|add_assign)"),
    ("copies (contiguous/cat/transpose/narrow)", r"copy_strided|copy2d|Tensor::cat|cat_contiguous|contiguous|index_select|IndexSelect|narrow"),
    ("autograd bookkeeping (zeros+add per edge)", r"backprop"),
    ("candle element-wise / reductions (forward)", r"binary_map|unary_map|Map1|Map2|ReduceSum|Tensor::add|Tensor::mul|Tensor::sub|affine|sum_keepdim|mean_keepdim"),
]
rules = [(n, re.compile(p)) for n, p in RULES]
cnt = collections.Counter(); total = 0
CONTEXT = [(n, r) for n, r in rules if "excluded" in n or n == "optimiser"]
def flush(stack):
    global total
    if not stack: return
    total += 1
    # Whole-stack context first (an optimiser step is all candle element-wise ops).
    for n, r in CONTEXT:
        if any(r.search(sym) for sym in stack):
            cnt[n] += 1; return
    for sym in stack:
        for n, r in rules:
            if r.search(sym):
                if (n.startswith("candle element") or n.startswith("copies")) and any("backprop" in f for f in stack):
                    n = "autograd bookkeeping (zeros+add per edge)"
                cnt[n] += 1; return
    j = " ".join(stack[:14])
    if re.search(r"rayon|sched|futex|wait|yield|Sleep|latch|Latch", j): cnt["idle / thread sync"] += 1
    elif re.search(r"memset|page|clear_page|malloc|calloc|free|munmap|mmap|alloc", j): cnt["allocation / page faults (unattributed)"] += 1
    else: cnt["other"] += 1
stack = []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        flush(stack); stack = []; continue
    if line.startswith("\t") or line.startswith(" "):
        parts = line.strip().split(None, 1)
        if len(parts) == 2: stack.append(parts[1])
    else:
        flush(stack); stack = []
flush(stack)
ex = sum(v for k, v in cnt.items() if "excluded" in k)
tot = total - ex
print(f"samples {total}, excluded (setup/inference) {ex}, counted {tot}")
per_step = (lambda c: c / args.hz * 1e3 / args.steps) if args.hz and args.steps else None
for n, c in cnt.most_common(40):
    if "excluded" in n: continue
    ms = f"{per_step(c):8.1f} ms/step" if per_step else ""
    print(f"{100*c/tot:6.1f}%  {ms}  {n}")
if per_step:
    print(f"total {per_step(tot):.1f} ms/step (CPU time, summed over threads)")
