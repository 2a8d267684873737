"""Time the PyTorch reference (docs/torch_ref) the way `onehead bench` times onehead.

Usage: python scripts/torch_ref_step.py [--torch-ref DIR] [--threads 2] [--steps 10]
                                        [--sizes 160,224] [--clock wall|cpu] [--json]
                                        [--variant eager|cl|compile|compile_cl]

Imports the reference's own model and loss (`model.py`, `bench.py` in DIR, default
docs/torch_ref in the repository) and measures, after 2 warm-ups, the median of:
training steps (batch 16, forward + backward + Adam step, the reference loss) per size,
inference at batch 16 (224), batch-1 latency (224, 50 runs). `--clock cpu` reports process
CPU time instead of wall time (robust to other processes; use with --threads 1).
`--variant`: PyTorch as a user who cares about speed runs it — `cl` channels-last model and
inputs, `compile` `torch.compile(model)` (default inductor settings), `compile_cl` both. The
first call of every measurement (where compiling happens) is timed apart and reported as
`first_s`; it never enters the medians.
Set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ as bench.py does (the wrapper script does).
"""
import argparse
import json
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser()
here = os.path.dirname(os.path.abspath(__file__))
ap.add_argument("--torch-ref", default=os.path.join(here, "..", "docs", "torch_ref"))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--sizes", default="160,224")
ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
ap.add_argument("--skip-inference", action="store_true")
ap.add_argument("--json", action="store_true")
ap.add_argument("--variant", choices=["eager", "cl", "compile", "compile_cl"], default="eager")
args = ap.parse_args()
CHANNELS_LAST = args.variant in ("cl", "compile_cl")
COMPILE = args.variant.startswith("compile")

sys.path.insert(0, os.path.abspath(args.torch_ref))
import torch  # noqa: E402

import bench  # noqa: E402  (the reference's bench.py: model, loss; sets 2 threads on import)
from model import CLS_CHANNELS, SEG_CHANNELS, MultiTaskNet  # noqa: E402

torch.set_num_threads(args.threads)

clock = time.process_time if args.clock == "cpu" else time.perf_counter


def timed(fn, warmup, iters):
    """(median seconds of `iters` calls, seconds of the very first call): the first call is
    where torch.compile compiles, so it is timed apart and never enters the median."""
    t0 = clock()
    fn()
    first = clock() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    ts = []
    for _ in range(iters):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts), first


def prepared(model, x):
    """The model and input as the variant runs them."""
    if CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return (torch.compile(model) if COMPILE else model), model, x


def train(size, batch=16):
    torch.manual_seed(0)
    model = MultiTaskNet()
    model.train()
    run, model, x = prepared(model, torch.randn(batch, 3, size, size))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seg_t = torch.randint(0, SEG_CHANNELS, (batch, size, size))
    cls_t = torch.randint(0, CLS_CHANNELS, (batch,))
    with torch.no_grad():
        model.eval()
        _, det_probe, _ = model(x[:1])
        model.train()
    det_t = torch.randn(batch, det_probe.shape[1], det_probe.shape[2])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = bench.multitask_loss(run(x), seg_t, cls_t, det_t, size)
        loss.backward()
        opt.step()
        loss.item()

    s, first = timed(step, 2, args.steps)
    return {"size": size, "batch": batch, "ms_per_step": s * 1e3, "images_per_sec": batch / s,
            "first_s": first}


def infer(size, batch):
    torch.manual_seed(0)
    run, _, x = prepared(MultiTaskNet().eval(), torch.randn(batch, 3, size, size))

    def fn():
        with torch.no_grad():
            run(x)

    s, first = timed(fn, 3, max(args.steps, 10) if batch > 1 else 50)
    return {"size": size, "batch": batch, "ms": s * 1e3, "images_per_sec": batch / s,
            "first_s": first}


t_start = bench._cpu_sample()
res = {"torch": torch.__version__, "threads": args.threads, "clock": args.clock,
       "variant": args.variant, "train": []}
for size in [int(v) for v in args.sizes.split(",")]:
    res["train"].append(train(size))
if not args.skip_inference:
    res["inference_b16"] = infer(224, 16)
    lat = infer(224, 1)
    res["latency_b1_ms"] = lat["ms"]
    res["latency_first_s"] = lat["first_s"]
res["foreign_cores_busy"] = round(bench.foreign_load(t_start, bench._cpu_sample()), 3)
if args.json:
    print(json.dumps(res))
else:
    for t in res["train"]:
        print(f"train {t['size']}: {t['ms_per_step']:.1f} ms/step, {t['images_per_sec']:.1f} img/s")
    if "inference_b16" in res:
        print(f"inference b16 224: {res['inference_b16']['images_per_sec']:.1f} img/s")
        print(f"latency b1 224: {res['latency_b1_ms']:.2f} ms")
    print(f"cores busy elsewhere during the run: {res['foreign_cores_busy']:.2f}")
