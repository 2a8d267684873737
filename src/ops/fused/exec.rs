//! The executor: one `CustomOp2` whose forward walks the plan's nodes in order and whose
//! backward walks them in reverse, each node's work done by its kind (`nodes`). What happens
//! here is what every kind shares: value lifetimes (a value is freed after its last reader,
//! or kept for the backward), gradient accumulation, the layout conversions at the op's
//! boundary, and per-node profiling (one wrapper around each node's call). Both passes run
//! on a thread of rayon's pool (`on_pool`), and an evaluation forward hands a BatchNorm that
//! only reads a convolution's output to that convolution (`Fwd::epilogue`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

use super::nodes::{BatchStats, BnMode, Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Saved};
use super::prof::{self, time, Kind};
use super::{kernels, pool, Id};
use crate::ops::storage::f32_slice;

/// What the op needs besides its two tensor arguments; shared with the caller.
pub(super) struct Core {
    pub(super) nodes: Vec<Node>,
    pub(super) output: Id,
    /// Offset of each parameter in the flat parameter vector, and its length.
    pub(super) offsets: Vec<(usize, usize)>,
    /// Per BatchNorm: eps, train, and (eval mode) the running statistics.
    pub(super) bns: Vec<BnMode>,
    /// Batch statistics of the train-mode BatchNorms (mean, biased variance, values per
    /// channel), filled by the forward.
    pub(super) batch_stats: Mutex<Vec<Option<BatchStats>>>,
}

/// What the forward keeps for the backward.
struct Tape {
    b: usize,
    dims: Vec<Dims>,
    values: Vec<Option<Vec<f32>>>,
    saved: Vec<Saved>,
}

impl Drop for Tape {
    fn drop(&mut self) {
        for v in self.values.iter_mut() {
            if let Some(v) = v.take() {
                pool::give(v);
            }
        }
    }
}

pub(super) struct NetOp {
    core: Arc<Core>,
    /// Keep the forward's values for the backward (training). Otherwise (an evaluation
    /// forward that stays differentiable) the backward recomputes them.
    keep_tape: bool,
    tape: Mutex<Option<Tape>>,
}

impl NetOp {
    pub(super) fn new(core: Arc<Core>, keep_tape: bool) -> Self {
        Self {
            core,
            keep_tape,
            tape: Mutex::new(None),
        }
    }
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: fused network runs on the CPU only"),
    }
}

/// A node's description for profiles.
fn label(n: &dyn NodeOp, (c, h, w): Dims, b: usize) -> String {
    format!("{} -> {c}x{h}x{w} (B={b})", n.name())
}

/// Run `f`, node `i`'s work, charging its time to the node's kind (what its kernels do not
/// charge to a finer kind themselves) and to the node's entry of the per-node profile.
fn profiled<R>(
    i: Id,
    n: &dyn NodeOp,
    dims: Dims,
    b: usize,
    backward: bool,
    f: impl FnOnce() -> R,
) -> R {
    if !prof::enabled() {
        return f();
    }
    let t0 = prof::clock();
    let r = time(n.kind(), 0, f);
    prof::node_time(i, || label(n, dims, b), prof::clock() - t0, backward);
    r
}

/// `grads[j] += d` (or `d` itself for the first gradient of value `j`).
fn accumulate(grads: &mut [Option<Vec<f32>>], j: Id, d: Vec<f32>) {
    match &mut grads[j] {
        Some(g) => {
            time(Kind::AddUpsample, 0, || kernels::add_assign(g, &d));
            pool::give(d);
        }
        slot => *slot = Some(d),
    }
}

impl Core {
    /// `(C, H, W)` of every value for an input `(b, cin, h, w)`; checks parameter sizes.
    fn dims(&self, input: Dims) -> Result<Vec<Dims>> {
        let mut dims: Vec<Dims> = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let cx = DimsCx {
                i,
                input,
                dims: &dims,
                offsets: &self.offsets,
            };
            let d = node.op().dims(&cx)?;
            dims.push(d);
        }
        Ok(dims)
    }

    /// Values some backward reads (inputs of convs, BatchNorms, activations, SE).
    fn needed_by_backward(&self) -> Vec<bool> {
        let mut need = vec![false; self.nodes.len()];
        for node in &self.nodes {
            if let Some(x) = node.op().backward_reads() {
                need[x] = true;
            }
        }
        need
    }

    /// An evaluation BatchNorm + activation that only reads node `i`'s output when that is a
    /// convolution: its `(scale, shift, act)`, for the convolution to apply as it writes.
    fn fusable_bn(&self, i: Id, keep: bool, last_use: &[usize], flat: &[f32]) -> Option<Affine> {
        match (&self.nodes[i], self.nodes.get(i + 1)) {
            (Node::Conv(_), Some(Node::BnAct(bn)))
                if !keep && bn.x == i && last_use[i] == i + 1 =>
            {
                bn.eval_affine(flat, &self.offsets, &self.bns)
            }
            _ => None,
        }
    }

    /// The forward pass on `x (B, C, H, W)` -> the output `(B, O, Ho, Wo)`, and the tape when
    /// `keep` (a backward follows).
    fn forward(
        &self,
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        flat: &[f32],
        keep: bool,
    ) -> Result<(Vec<f32>, Shape, Option<Tape>)> {
        let dims = self.dims((cin, h, w))?;
        let n = self.nodes.len();
        let mut last_use = vec![0usize; n];
        for (i, node) in self.nodes.iter().enumerate() {
            for j in node.op().inputs() {
                last_use[j] = i;
            }
        }
        last_use[self.output] = usize::MAX;
        let needed = self.needed_by_backward();
        let mut values: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
        let mut saved: Vec<Saved> = (0..n).map(|_| Saved::None).collect();
        let mut stats: Vec<Option<BatchStats>> = vec![None; self.bns.len()];
        // One image in evaluation: the input `(1, C, H, W)` is already the `(C, H, W, 1)`
        // layout, and its readers take it as it is (no copy; 2–3 % of a batch-1 forward).
        let input_alias = (b == 1 && !keep)
            .then(|| self.nodes.iter().position(|n| matches!(n, Node::Input(_))))
            .flatten()
            .filter(|&j| j != self.output);
        let mut i = 0;
        while i < n {
            let node = self.nodes[i].op();
            let fused_bn = self.fusable_bn(i, keep, &last_use, flat);
            let epilogue = fused_bn
                .as_ref()
                .map(|(scale, shift, act)| kernels::Epilogue {
                    scale,
                    shift,
                    act: *act,
                });
            let (out, s) = profiled(i, node, dims[i], b, false, || {
                node.forward(&mut Fwd {
                    i,
                    b,
                    dims: &dims,
                    values: &mut values,
                    last_use: &last_use,
                    keep,
                    flat,
                    offsets: &self.offsets,
                    bns: &self.bns,
                    stats: &mut stats,
                    x,
                    input_alias,
                    epilogue,
                })
            })?;
            if fused_bn.is_some() {
                // The output is the BatchNorm's value (node i + 1 is skipped); value i is
                // never stored.
                values[i + 1] = Some(out);
                release_inputs(node, i, &last_use, &mut values, |_| false);
                i += 2;
                continue;
            }
            values[i] = Some(out);
            if keep {
                saved[i] = s;
            }
            release_inputs(node, i, &last_use, &mut values, |j| keep && needed[j]);
            i += 1;
        }
        *self.batch_stats.lock().expect("batch stats") = stats;
        let (oc, oh, ow) = dims[self.output];
        let out_cnhw = values[self.output].take().unwrap_or_default();
        let mut y = vec![0f32; out_cnhw.len()];
        time(Kind::Layout, 0, || {
            kernels::chwn_to_nchw(&out_cnhw, oc, oh * ow, b, &mut y)
        });
        pool::give(out_cnhw);
        let tape = if keep {
            Some(Tape {
                b,
                dims,
                values,
                saved,
            })
        } else {
            for v in values.iter_mut() {
                if let Some(v) = v.take() {
                    pool::give(v);
                }
            }
            None
        };
        Ok((y, Shape::from((b, oc, oh, ow)), tape))
    }

    /// An evaluation forward of `groups` image groups, each group's whole pass on a
    /// one-thread pool of its own (see [`eval_groups`]); the outputs are concatenated.
    fn forward_groups(
        &self,
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        flat: &[f32],
        groups: usize,
    ) -> Result<(Vec<f32>, Shape)> {
        let bg = b / groups;
        let per = cin * h * w * bg;
        let pools = group_pools(groups)?;
        let run = |g: usize| {
            let xg = &x[g * per..(g + 1) * per];
            pools[g].install(|| self.forward(xg, (bg, cin, h, w), flat, false))
        };
        let outs = std::thread::scope(|s| {
            let others: Vec<_> = (1..groups).map(|g| s.spawn(move || run(g))).collect();
            let mut outs = vec![run(0)];
            for o in others {
                outs.push(o.join().unwrap_or_else(|_| {
                    candle_core::bail!("fused network: an image group's pass panicked")
                }));
            }
            outs
        });
        let mut y = Vec::new();
        let mut dims = (0, 0, 0, 0);
        for out in outs {
            let (part, shape, _) = out?;
            dims = shape.dims4()?;
            y.extend_from_slice(&part);
        }
        Ok((y, Shape::from((b, dims.1, dims.2, dims.3))))
    }

    /// The backward pass: `dy (B, O, Ho, Wo)` -> (input gradient if `need_dx`, flat
    /// parameter gradient).
    fn backward(
        &self,
        mut tape: Tape,
        flat: &[f32],
        dy: &[f32],
        need_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let b = tape.b;
        let n = self.nodes.len();
        let mut dflat = vec![0f32; flat.len()];
        let mut grads: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
        let (oc, oh, ow) = tape.dims[self.output];
        let mut g0 = pool::take(oc * b * oh * ow);
        time(Kind::Layout, 0, || {
            kernels::nchw_to_chwn(dy, b, oc, oh * ow, &mut g0)
        });
        grads[self.output] = Some(g0);
        for i in (1..n).rev() {
            let Some(d) = grads[i].take() else {
                continue;
            };
            let node = self.nodes[i].op();
            profiled(i, node, tape.dims[i], b, true, || -> Result<()> {
                let mut cx = Bwd {
                    i,
                    b,
                    dims: &tape.dims,
                    values: &tape.values,
                    saved: &tape.saved[i],
                    flat,
                    offsets: &self.offsets,
                    dflat: &mut dflat,
                    bns: &self.bns,
                    need_dx,
                };
                for (j, g) in node.backward(&mut cx, d)? {
                    accumulate(&mut grads, j, g);
                }
                Ok(())
            })?;
            // Every consumer of value i has run its backward: value i is no longer needed.
            if let Some(v) = tape.values[i].take() {
                pool::give(v);
            }
            tape.saved[i] = Saved::None;
        }
        let dx = match grads[0].take() {
            Some(g) if need_dx => {
                let (ci, h, w) = tape.dims[0];
                let mut dx = vec![0f32; g.len()];
                time(Kind::Layout, 0, || {
                    kernels::chwn_to_nchw(&g, ci, h * w, b, &mut dx)
                });
                pool::give(g);
                Some(dx)
            }
            Some(g) => {
                pool::give(g);
                None
            }
            None if need_dx => Some(vec![0f32; tape.values[0].as_ref().map_or(0, |v| v.len())]),
            None => None,
        };
        Ok((dx, dflat))
    }
}

/// `(scale, shift, act)` of an evaluation BatchNorm.
type Affine = (Vec<f32>, Vec<f32>, kernels::Act);

/// Free the inputs of node `i` that no later node reads, unless `kept` (the backward's).
fn release_inputs(
    node: &dyn NodeOp,
    i: Id,
    last_use: &[usize],
    values: &mut [Option<Vec<f32>>],
    kept: impl Fn(Id) -> bool,
) {
    for j in node.inputs() {
        if last_use[j] == i && !kept(j) {
            if let Some(v) = values[j].take() {
                pool::give(v);
            }
        }
    }
}

/// `n` one-thread pools for [`Core::forward_groups`], made once and kept (a thread start
/// per forward would cost ~50 µs).
fn group_pools(n: usize) -> Result<Vec<Arc<rayon::ThreadPool>>> {
    static POOLS: Mutex<Vec<Arc<rayon::ThreadPool>>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    while pools.len() < n {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|i| format!("onehead-group-{i}"))
            .build()
            .map_err(|e| candle_core::Error::Msg(format!("fused network: a thread pool: {e}")))?;
        pools.push(Arc::new(pool));
    }
    Ok(pools[..n].to_vec())
}

/// Image groups of an evaluation forward over `b` images: one per thread where each gets a
/// multiple of 8 images (whole or paired lanes), else 1 (`ONEHEAD_EVAL_GROUPS=0`: always 1).
///
/// Why: with every node split between the threads, each node reads what the other core
/// wrote, and when the machine places its two vCPUs far apart (minutes at a time) that costs
/// a batch-16 forward ~20 % (15.0 → 18.6 ms; one thread is not slowed at all). A group's
/// images stay on one core from the input to the output, as PyTorch's threads keep theirs.
/// The values are the whole batch's, bit for bit: no kernel mixes images.
pub fn eval_groups(b: usize) -> usize {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("ONEHEAD_EVAL_GROUPS").is_ok_and(|v| v == "0"));
    let t = rayon::current_num_threads();
    if !off && t > 1 && b.is_multiple_of(8 * t) {
        t
    } else {
        1
    }
}

/// Run `f` on a thread of rayon's pool, the other workers kept awake until it returns.
/// Called from outside the pool, each of a pass's ~100 parallel loops would hand its work to
/// the pool and sleep until it is done (a futex wake and wait per loop); run from inside,
/// the loops split between the workers, but an idle worker sleeps after a few dozen empty
/// polls and each loop then pays for waking it. So the pass runs beside helpers ([`help`]):
/// jobs that poll for the pass's work until it ends (batch 1 −9 %, batch 16 −2 % against the
/// workers' own idle loop, alternated pairs on 2 threads).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let runner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            s.spawn(move |s| help(s, done, runner));
        }
        let r = f();
        done.store(true, Ordering::Release);
        r
    })
}

/// One helper of [`on_pool`]: run the pass's stealable work until `done`. A helper never
/// blocks for long: it may have been picked up by a worker that is itself waiting inside
/// the pass (its stack holds work the pass needs), so after 1024 empty polls (~0.5 ms) it
/// hands the thread back (and the core to any other process: `yield_now`), leaving a fresh
/// helper in its place. On the thread that runs the pass it returns at once.
fn help<'s>(s: &rayon::Scope<'s>, done: &'s AtomicBool, runner: Option<usize>) {
    if rayon::current_thread_index() == runner {
        return;
    }
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
        } else if idle < 1024 {
            idle += 1;
            // Poll less often than it could: each poll reads the other workers' queues
            // (cache lines they write) and pins crossbeam's epoch (batch 16 −2 %, a training
            // step −3 % against polling after every pause; batch 1 unchanged).
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
            s.spawn(move |s| help(s, done, runner));
            return;
        }
    }
}

impl CustomOp2 for NetOp {
    fn name(&self) -> &'static str {
        "fused-network"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "fused network input")?;
        let flat = f32_slice(s2, l2, "fused network parameters")?;
        let dims = l1.shape().dims4()?;
        // Not with a tape (training keeps the whole batch's values), nor where a BatchNorm
        // takes batch statistics (a group's would be other statistics).
        let groups = if self.keep_tape || self.core.bns.iter().any(|m| m.train) {
            1
        } else {
            eval_groups(dims.0)
        };
        let (y, shape, tape) = if groups > 1 {
            let (y, shape) = self.core.forward_groups(x, dims, flat, groups)?;
            (y, shape, None)
        } else {
            on_pool(|| self.core.forward(x, dims, flat, self.keep_tape))?
        };
        *self.tape.lock().expect("tape") = tape;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let kept = self.tape.lock().expect("tape").take();
        let need_dx = x.track_op();
        let grad = grad.contiguous()?;
        let (dx, dflat) = {
            let (gs, gl) = grad.storage_and_layout();
            let (fs, fl) = flat.storage_and_layout();
            let g = cpu_f32(&gs, gl, "fused network gradient")?;
            let f = cpu_f32(&fs, fl, "fused network parameters")?;
            let tape = match kept {
                Some(t) => t,
                None => {
                    // An evaluation forward (or a second backward): recompute the values.
                    let (xs, xl) = x.storage_and_layout();
                    let xv = cpu_f32(&xs, xl, "fused network input")?;
                    let dims = xl.shape().dims4()?;
                    match on_pool(|| self.core.forward(xv, dims, f, true))?.2 {
                        Some(t) => t,
                        None => candle_core::bail!("fused network: no tape"),
                    }
                }
            };
            on_pool(|| self.core.backward(tape, f, g, need_dx))?
        };
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dflat = Tensor::from_vec(dflat, flat.shape(), flat.device())?;
        Ok((dx, Some(dflat)))
    }
}
