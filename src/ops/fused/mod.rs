//! The whole network as one autograd node on the CPU: a fused forward/backward executor.
//!
//! Why: with one candle op per layer, a MobileNetV3 + FPN training step is a few hundred
//! autograd nodes. candle's `backward` accumulates every gradient edge as `zeros_like` + `add`
//! (two fresh, zero-filled allocations and a single-threaded pass each), which measured ≈ 20 %
//! of a 224×224 batch-16 step, and fresh allocations above glibc's mmap threshold fault in
//! page by page every step (≈ 25 %). Here the model is described once as a [`Plan`] (convs,
//! BatchNorm + activation, squeeze-excite, residual adds, FPN upsample-adds), and one
//! `CustomOp2` runs it:
//! - forward: activations stored `(C,H,W,B)` (channel-major, batch-minor; see `kernels`), so
//!   every 1×1 conv is one gemm over the whole batch (no per-image weight copies), dense k×k
//!   convs are chunked im2col + one gemm per chunk, depthwise taps are vectors over the batch, BatchNorm is fused with its activation; values needed by the backward are kept in
//!   the op's tape (buffers from a bounded pool: no zero fill, no page faults after warm-up);
//! - backward: the hand-written adjoint of every layer, gradients accumulated in place, values
//!   freed as soon as the backward no longer needs them; it returns the input gradient (only
//!   when the input is tracked) and one flat gradient for all parameters, which candle splits
//!   back onto the variables (the parameters enter the op as one `cat`).
//!
//! The plan is built by the model (`OneHead`, `MobileNetV3`, `Fpn`) from its own layers, so
//! tensor names and the VarMap are unchanged. CPU f32 only; other devices use the per-layer
//! path. Deterministic: fixed chunking and summation order everywhere.

pub mod kernels;
pub mod pool;
pub mod prof;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, Var};

pub use kernels::Act;
use kernels::{ConvGeom, SeSaved};
use prof::{time, Kind};

use super::storage::f32_slice;

/// A value (activation) of the plan.
pub type Id = usize;

/// How a convolution is computed (square kernel, padding `k/2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// 1×1, stride 1: one gemm.
    Pointwise,
    /// Dense k×k: chunked im2col + gemm.
    Dense { k: usize, stride: usize },
    /// `groups = C`: direct kernel.
    Depthwise { k: usize, stride: usize },
}

#[derive(Debug, Clone)]
enum Node {
    Input,
    Conv {
        x: Id,
        kind: ConvKind,
        cout: usize,
        w: usize,
        bias: Option<usize>,
    },
    BnAct {
        x: Id,
        gamma: usize,
        beta: usize,
        act: Act,
        bn: usize,
    },
    Act {
        x: Id,
        act: Act,
    },
    Se {
        x: Id,
        wr: usize,
        br: usize,
        we: usize,
        be: usize,
        rd: usize,
    },
    Add {
        a: Id,
        b: Id,
    },
    Up2Add {
        small: Id,
        big: Id,
    },
}

impl Node {
    fn inputs(&self) -> Vec<Id> {
        match *self {
            Node::Input => vec![],
            Node::Conv { x, .. } | Node::BnAct { x, .. } | Node::Act { x, .. } => vec![x],
            Node::Se { x, .. } => vec![x],
            Node::Add { a, b } => vec![a, b],
            Node::Up2Add { small, big } => vec![small, big],
        }
    }
}

/// A BatchNorm layer's running statistics and mode, as the plan sees them.
#[derive(Debug, Clone)]
pub struct BnRef {
    pub running_mean: Var,
    pub running_var: Var,
    pub eps: f64,
    pub momentum: f64,
    /// Batch statistics (and a running-statistics update) rather than the running ones.
    pub train: bool,
}

/// Builds a [`Plan`]; value 0 is the network input.
pub struct PlanBuilder {
    nodes: Vec<Node>,
    params: Vec<Tensor>,
    bns: Vec<BnRef>,
}

impl Default for PlanBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PlanBuilder {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::Input],
            params: Vec::new(),
            bns: Vec::new(),
        }
    }

    /// The network input `(B, C, H, W)`.
    pub fn input(&self) -> Id {
        0
    }

    fn param(&mut self, t: &Tensor) -> usize {
        self.params.push(t.clone());
        self.params.len() - 1
    }

    fn push(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// Convolution with weight `(O, C/groups, k, k)` and optional bias `(O,)`.
    pub fn conv(
        &mut self,
        x: Id,
        weight: &Tensor,
        bias: Option<&Tensor>,
        kind: ConvKind,
    ) -> Result<Id> {
        let cout = weight.dim(0)?;
        let w = self.param(weight);
        let bias = bias.map(|b| self.param(b));
        Ok(self.push(Node::Conv {
            x,
            kind,
            cout,
            w,
            bias,
        }))
    }

    /// `act(BatchNorm(x))` with affine parameters `gamma`, `beta`.
    pub fn bn_act(&mut self, x: Id, gamma: &Tensor, beta: &Tensor, bn: BnRef, act: Act) -> Id {
        let gamma = self.param(gamma);
        let beta = self.param(beta);
        self.bns.push(bn);
        let bn = self.bns.len() - 1;
        self.push(Node::BnAct {
            x,
            gamma,
            beta,
            act,
            bn,
        })
    }

    pub fn act(&mut self, x: Id, act: Act) -> Id {
        self.push(Node::Act { x, act })
    }

    /// Squeeze-excite: `x · hsig(We·relu(Wr·mean(x) + br) + be)`; `wr (R,C,1,1)`, `we (C,R,1,1)`.
    pub fn se(&mut self, x: Id, wr: &Tensor, br: &Tensor, we: &Tensor, be: &Tensor) -> Result<Id> {
        let rd = wr.dim(0)?;
        let (wr, br, we, be) = (
            self.param(wr),
            self.param(br),
            self.param(we),
            self.param(be),
        );
        Ok(self.push(Node::Se {
            x,
            wr,
            br,
            we,
            be,
            rd,
        }))
    }

    pub fn add(&mut self, a: Id, b: Id) -> Id {
        self.push(Node::Add { a, b })
    }

    /// `big + upsample_nearest_2x(small)`.
    pub fn up2_add(&mut self, small: Id, big: Id) -> Id {
        self.push(Node::Up2Add { small, big })
    }

    /// The plan computing `output`. Nodes that do not feed `output` are dropped, and so are
    /// their parameters (they get no gradient, as with the per-layer path).
    pub fn finish(self, output: Id) -> Plan {
        let mut needed = vec![false; self.nodes.len()];
        needed[output] = true;
        for i in (0..self.nodes.len()).rev() {
            if needed[i] {
                for j in self.nodes[i].inputs() {
                    needed[j] = true;
                }
            }
        }
        needed[0] = true;
        let mut remap = vec![usize::MAX; self.nodes.len()];
        let mut pmap: Vec<Option<usize>> = vec![None; self.params.len()];
        let mut params = Vec::new();
        let mut bmap: Vec<Option<usize>> = vec![None; self.bns.len()];
        let mut bns = Vec::new();
        let mut p = |i: usize| -> usize {
            *pmap[i].get_or_insert_with(|| {
                params.push(self.params[i].clone());
                params.len() - 1
            })
        };
        let mut nodes = Vec::new();
        for (i, n) in self.nodes.into_iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let r = |j: Id| remap[j];
            let n = match n {
                Node::Input => Node::Input,
                Node::Conv {
                    x,
                    kind,
                    cout,
                    w,
                    bias,
                } => Node::Conv {
                    x: r(x),
                    kind,
                    cout,
                    w: p(w),
                    bias: bias.map(&mut p),
                },
                Node::BnAct {
                    x,
                    gamma,
                    beta,
                    act,
                    bn,
                } => Node::BnAct {
                    x: r(x),
                    gamma: p(gamma),
                    beta: p(beta),
                    act,
                    bn: *bmap[bn].get_or_insert_with(|| {
                        bns.push(self.bns[bn].clone());
                        bns.len() - 1
                    }),
                },
                Node::Act { x, act } => Node::Act { x: r(x), act },
                Node::Se {
                    x,
                    wr,
                    br,
                    we,
                    be,
                    rd,
                } => Node::Se {
                    x: r(x),
                    wr: p(wr),
                    br: p(br),
                    we: p(we),
                    be: p(be),
                    rd,
                },
                Node::Add { a, b } => Node::Add { a: r(a), b: r(b) },
                Node::Up2Add { small, big } => Node::Up2Add {
                    small: r(small),
                    big: r(big),
                },
            };
            remap[i] = nodes.len();
            nodes.push(n);
        }
        Plan {
            output: remap[output],
            nodes,
            params,
            bns,
        }
    }
}

/// A network description the fused executor runs (see the module docs).
pub struct Plan {
    nodes: Vec<Node>,
    params: Vec<Tensor>,
    bns: Vec<BnRef>,
    output: Id,
}

/// Whether [`Plan::run`] can run on `x` (CPU, f32).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

type BatchStats = (Vec<f32>, Vec<f32>, usize);

/// A BatchNorm's mode for one run: eps, batch statistics or not, running statistics (eval).
struct BnMode {
    eps: f64,
    train: bool,
    running: Option<(Vec<f32>, Vec<f32>)>,
}

/// What the op needs besides its two tensor arguments; shared with the caller.
struct Core {
    nodes: Vec<Node>,
    output: Id,
    /// Offset of each parameter in the flat parameter vector, and its length.
    offsets: Vec<(usize, usize)>,
    /// Per BatchNorm: eps, train, and (eval mode) the running statistics.
    bns: Vec<BnMode>,
    /// Batch statistics of the train-mode BatchNorms (mean, biased variance, values per
    /// channel), filled by the forward.
    batch_stats: Mutex<Vec<Option<BatchStats>>>,
}

enum Saved {
    None,
    Bn {
        mean: Vec<f32>,
        invstd: Vec<f32>,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Se(SeSaved),
}

/// What the forward keeps for the backward.
struct Tape {
    b: usize,
    shapes: Vec<(usize, usize, usize)>,
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

struct NetOp {
    core: Arc<Core>,
    /// Keep the forward's values for the backward (training). Otherwise (an evaluation
    /// forward that stays differentiable) the backward recomputes them.
    keep_tape: bool,
    tape: Mutex<Option<Tape>>,
}

impl Plan {
    /// Run the network on `x (B, C, H, W)` (CPU f32) -> the output value `(B, O, Ho, Wo)`.
    /// Differentiable with respect to `x` and every parameter; BatchNorms in train mode use
    /// batch statistics and update their running statistics (momentum, unbiased variance),
    /// as `BatchNorm2d::forward_t` does.
    ///
    /// `train`: whether a backward is expected (a training step). Evaluation forwards
    /// (`false`) keep no activations and update BatchNorm outputs in place; they stay
    /// differentiable: a backward through them recomputes the forward first.
    pub fn run(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !supported(x) {
            candle_core::bail!("fused plan: CPU f32 only")
        }
        let mut offsets = Vec::with_capacity(self.params.len());
        let mut off = 0;
        for p in &self.params {
            let n = p.elem_count();
            offsets.push((off, n));
            off += n;
        }
        let mut bns = Vec::with_capacity(self.bns.len());
        for bn in &self.bns {
            let running = if bn.train {
                None
            } else {
                Some((
                    bn.running_mean.as_tensor().to_vec1::<f32>()?,
                    bn.running_var.as_tensor().to_vec1::<f32>()?,
                ))
            };
            bns.push(BnMode {
                eps: bn.eps,
                train: bn.train,
                running,
            });
        }
        let core = Arc::new(Core {
            nodes: self.nodes.clone(),
            output: self.output,
            offsets,
            batch_stats: Mutex::new(vec![None; self.bns.len()]),
            bns,
        });
        let track = x.track_op() || self.params.iter().any(|p| p.track_op());
        let flat: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.flatten_all())
            .collect::<Result<_>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let x = x.contiguous()?;
        let op = NetOp {
            core: core.clone(),
            keep_tape: track && train,
            tape: Mutex::new(None),
        };
        let y = if track {
            x.apply_op2(&flat, op)?
        } else {
            x.apply_op2_no_bwd(&flat, &op)?
        };
        // Running statistics, as BatchNorm2d::forward_t.
        let stats = std::mem::take(&mut *core.batch_stats.lock().expect("batch stats"));
        for (bn, st) in self.bns.iter().zip(stats) {
            let Some((mean, var, count)) = st else {
                continue;
            };
            let k = bn.momentum;
            let m = count as f64;
            let unbiased = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
            let n = mean.len();
            let rm = bn.running_mean.as_tensor().to_vec1::<f32>()?;
            let rv = bn.running_var.as_tensor().to_vec1::<f32>()?;
            // Same rounding as the per-layer path: f32 tensor ops `rm·(1−k) + mean·k`.
            let new_m: Vec<f32> = (0..n)
                .map(|i| rm[i] * (1.0 - k) as f32 + mean[i] * k as f32)
                .collect();
            let new_v: Vec<f32> = (0..n)
                .map(|i| rv[i] * (1.0 - k) as f32 + var[i] * (k * unbiased) as f32)
                .collect();
            let dev = x.device();
            bn.running_mean.set(&Tensor::from_vec(new_m, n, dev)?)?;
            bn.running_var.set(&Tensor::from_vec(new_v, n, dev)?)?;
        }
        Ok(y)
    }
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: fused network runs on the CPU only"),
    }
}

impl Core {
    fn param<'a>(&self, flat: &'a [f32], i: usize) -> &'a [f32] {
        let (o, n) = self.offsets[i];
        &flat[o..o + n]
    }

    /// `(C, H, W)` of every value for an input `(b, cin, h, w)`; checks parameter sizes.
    fn shapes(&self, cin: usize, h: usize, w: usize) -> Result<Vec<(usize, usize, usize)>> {
        let mut shapes: Vec<(usize, usize, usize)> = Vec::with_capacity(self.nodes.len());
        let plen = |i: usize| self.offsets[i].1;
        for (i, node) in self.nodes.iter().enumerate() {
            let s = match *node {
                Node::Input => (cin, h, w),
                Node::Conv {
                    x,
                    kind,
                    cout,
                    w: wi,
                    bias,
                } => {
                    let (c, h, w) = shapes[x];
                    let (want, out) = match kind {
                        ConvKind::Pointwise => (cout * c, (cout, h, w)),
                        ConvKind::Dense { k, stride } => {
                            if h + 2 * (k / 2) < k || w + 2 * (k / 2) < k || stride == 0 {
                                candle_core::bail!("fused conv: {h}x{w} too small for k{k}")
                            }
                            let g = ConvGeom::new(1, c, h, w, k, stride);
                            (cout * c * k * k, (cout, g.ho, g.wo))
                        }
                        ConvKind::Depthwise { k, stride } => {
                            if cout != c || stride == 0 {
                                candle_core::bail!("fused depthwise conv: {c} -> {cout} channels")
                            }
                            let g = ConvGeom::new(1, c, h, w, k, stride);
                            (c * k * k, (c, g.ho, g.wo))
                        }
                    };
                    if plen(wi) != want || bias.is_some_and(|b| plen(b) != cout) {
                        candle_core::bail!(
                            "fused conv (value {i}): weight has {} values, input {c} channels, \
                             {kind:?} to {cout} wants {want}",
                            plen(wi)
                        )
                    }
                    out
                }
                Node::BnAct { x, gamma, beta, .. } => {
                    let s = shapes[x];
                    if plen(gamma) != s.0 || plen(beta) != s.0 {
                        candle_core::bail!("fused batch norm (value {i}): {} channels", s.0)
                    }
                    s
                }
                Node::Act { x, .. } => shapes[x],
                Node::Se { x, wr, we, rd, .. } => {
                    let s = shapes[x];
                    if plen(wr) != rd * s.0 || plen(we) != rd * s.0 {
                        candle_core::bail!("fused squeeze-excite (value {i}): {} channels", s.0)
                    }
                    s
                }
                Node::Add { a, b } => {
                    if shapes[a] != shapes[b] {
                        candle_core::bail!("fused add: {:?} vs {:?}", shapes[a], shapes[b])
                    }
                    shapes[a]
                }
                Node::Up2Add { small, big } => {
                    let (c, h, w) = shapes[small];
                    if shapes[big] != (c, 2 * h, 2 * w) {
                        candle_core::bail!(
                            "fused upsample-add: {:?} is not twice {:?}",
                            shapes[big],
                            shapes[small]
                        )
                    }
                    shapes[big]
                }
            };
            shapes.push(s);
        }
        Ok(shapes)
    }

    /// Values some backward reads (inputs of convs, BatchNorms, activations, SE).
    fn needed_by_backward(&self) -> Vec<bool> {
        let mut need = vec![false; self.nodes.len()];
        for node in &self.nodes {
            match *node {
                Node::Conv { x, .. }
                | Node::BnAct { x, .. }
                | Node::Act { x, .. }
                | Node::Se { x, .. } => need[x] = true,
                _ => {}
            }
        }
        need
    }

    fn forward(
        &self,
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        flat: &[f32],
        keep: bool,
    ) -> Result<(Vec<f32>, Shape, Option<Tape>)> {
        let shapes = self.shapes(cin, h, w)?;
        let n = self.nodes.len();
        let mut last_use = vec![0usize; n];
        for (i, node) in self.nodes.iter().enumerate() {
            for j in node.inputs() {
                last_use[j] = i;
            }
        }
        last_use[self.output] = usize::MAX;
        let needed = self.needed_by_backward();
        let mut values: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
        let mut saved: Vec<Saved> = (0..n).map(|_| Saved::None).collect();
        let mut stats: Vec<Option<BatchStats>> = vec![None; self.bns.len()];
        let val = |values: &[Option<Vec<f32>>], j: Id| -> Result<usize> {
            match &values[j] {
                Some(_) => Ok(j),
                None => candle_core::bail!("fused network: value {j} freed too early"),
            }
        };
        let profiling = prof::enabled();
        for i in 0..n {
            let (c, hh, ww) = shapes[i];
            let len = c * b * hh * ww;
            let t_node = if profiling { prof::clock() } else { 0.0 };
            let out: Vec<f32> = match self.nodes[i] {
                Node::Input => {
                    let mut v = pool::take(len);
                    time(Kind::Layout, 0, || {
                        kernels::nchw_to_chwn(x, b, cin, h * w, &mut v)
                    });
                    v
                }
                Node::Conv {
                    x: xi,
                    kind,
                    cout,
                    w: wi,
                    bias,
                } => {
                    let (ci, hi, wi_) = shapes[xi];
                    let xin = values[val(&values, xi)?].as_deref().unwrap_or(&[]);
                    let mut y = pool::take(len);
                    conv_fwd(
                        kind,
                        b,
                        ci,
                        hi,
                        wi_,
                        cout,
                        xin,
                        self.param(flat, wi),
                        &mut y,
                    );
                    if let Some(bi) = bias {
                        let bias = self.param(flat, bi);
                        time(Kind::Activation, 0, || {
                            kernels::add_bias(&mut y, bias, b * hh * ww)
                        });
                    }
                    y
                }
                Node::BnAct {
                    x: xi,
                    gamma,
                    beta,
                    act,
                    bn,
                } => {
                    let m = b * hh * ww;
                    let BnMode {
                        eps,
                        train,
                        running,
                    } = &self.bns[bn];
                    let zi = val(&values, xi)?;
                    let (mean, var) = if *train {
                        let mut mean = vec![0f32; c];
                        let mut var = vec![0f32; c];
                        let z = values[zi].as_deref().unwrap_or(&[]);
                        time(Kind::BatchNorm, 0, || {
                            kernels::channel_stats(z, m, &mut mean, &mut var)
                        });
                        (mean, var)
                    } else {
                        running.clone().unwrap_or_default()
                    };
                    let (scale, shift, invstd) = kernels::bn_scale_shift(
                        self.param(flat, gamma),
                        self.param(flat, beta),
                        &mean,
                        &var,
                        *eps,
                    );
                    let y = if !keep && last_use[xi] == i {
                        let mut v = values[xi].take().unwrap_or_default();
                        time(Kind::BatchNorm, 0, || {
                            kernels::affine_act_inplace(&mut v, m, &scale, &shift, act)
                        });
                        v
                    } else {
                        let mut y = pool::take(len);
                        let z = values[zi].as_deref().unwrap_or(&[]);
                        time(Kind::BatchNorm, 0, || {
                            kernels::affine_act(z, m, &scale, &shift, act, &mut y)
                        });
                        y
                    };
                    if *train {
                        stats[bn] = Some((mean.clone(), var, m));
                    }
                    if keep {
                        saved[i] = Saved::Bn {
                            mean,
                            invstd,
                            scale,
                            shift,
                        };
                    }
                    y
                }
                Node::Act { x: xi, act } => {
                    val(&values, xi)?;
                    if !keep && last_use[xi] == i {
                        let mut v = values[xi].take().unwrap_or_default();
                        let one = vec![1f32; c];
                        let zero = vec![0f32; c];
                        time(Kind::Activation, 0, || {
                            kernels::affine_act_inplace(&mut v, b * hh * ww, &one, &zero, act)
                        });
                        v
                    } else {
                        let mut y = pool::take(len);
                        let xin = values[xi].as_deref().unwrap_or(&[]);
                        time(Kind::Activation, 0, || kernels::act_fwd(xin, &mut y, act));
                        y
                    }
                }
                Node::Se {
                    x: xi,
                    wr,
                    br,
                    we,
                    be,
                    rd,
                } => {
                    let xin = values[val(&values, xi)?].as_deref().unwrap_or(&[]);
                    let mut y = pool::take(len);
                    let s = time(Kind::SqueezeExcite, 0, || {
                        kernels::se_fwd(
                            xin,
                            c,
                            b,
                            hh * ww,
                            rd,
                            self.param(flat, wr),
                            self.param(flat, br),
                            self.param(flat, we),
                            self.param(flat, be),
                            &mut y,
                        )
                    });
                    if keep {
                        saved[i] = Saved::Se(s);
                    }
                    y
                }
                Node::Add { a, b: bb } => {
                    let (a, bb) = (val(&values, a)?, val(&values, bb)?);
                    let mut y = pool::take(len);
                    let (va, vb) = (
                        values[a].as_deref().unwrap_or(&[]),
                        values[bb].as_deref().unwrap_or(&[]),
                    );
                    time(Kind::AddUpsample, 0, || kernels::add(va, vb, &mut y));
                    y
                }
                Node::Up2Add { small, big } => {
                    let (_, hs, ws) = shapes[small];
                    let (small, big) = (val(&values, small)?, val(&values, big)?);
                    let mut y = pool::take(len);
                    let (vs, vb) = (
                        values[small].as_deref().unwrap_or(&[]),
                        values[big].as_deref().unwrap_or(&[]),
                    );
                    time(Kind::AddUpsample, 0, || {
                        kernels::up2_add(vs, vb, (hs, ws, b), &mut y)
                    });
                    y
                }
            };
            values[i] = Some(out);
            if profiling {
                let (nd, sh) = (&self.nodes[i], shapes[i]);
                prof::node_time(i, || label(nd, sh, b), prof::clock() - t_node, false);
            }
            for j in self.nodes[i].inputs() {
                if last_use[j] == i && (!keep || !needed[j]) {
                    if let Some(v) = values[j].take() {
                        pool::give(v);
                    }
                }
            }
        }
        *self.batch_stats.lock().expect("batch stats") = stats;
        let (oc, oh, ow) = shapes[self.output];
        let out_cnhw = values[self.output].take().unwrap_or_default();
        let mut y = vec![0f32; out_cnhw.len()];
        time(Kind::Layout, 0, || {
            kernels::chwn_to_nchw(&out_cnhw, oc, oh * ow, b, &mut y)
        });
        pool::give(out_cnhw);
        let tape = if keep {
            Some(Tape {
                b,
                shapes,
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
        let (oc, oh, ow) = tape.shapes[self.output];
        let mut g0 = pool::take(oc * b * oh * ow);
        time(Kind::Layout, 0, || {
            kernels::nchw_to_chwn(dy, b, oc, oh * ow, &mut g0)
        });
        grads[self.output] = Some(g0);
        fn accumulate(grads: &mut [Option<Vec<f32>>], j: Id, d: Vec<f32>) {
            match &mut grads[j] {
                Some(g) => {
                    time(Kind::AddUpsample, 0, || kernels::add_assign(g, &d));
                    pool::give(d);
                }
                slot => *slot = Some(d),
            }
        }
        let range = |i: usize| {
            let (o, len) = self.offsets[i];
            o..o + len
        };
        let profiling = prof::enabled();
        for i in (1..n).rev() {
            let Some(mut d) = grads[i].take() else {
                continue;
            };
            let t_node = if profiling { prof::clock() } else { 0.0 };
            let (c, hh, ww) = tape.shapes[i];
            match self.nodes[i] {
                Node::Input => {}
                Node::Conv {
                    x,
                    kind,
                    cout,
                    w,
                    bias,
                } => {
                    if let Some(bi) = bias {
                        let out = &mut dflat[range(bi)];
                        time(Kind::Activation, 0, || {
                            kernels::row_sums(&d, b * hh * ww, out)
                        });
                    }
                    let (ci, hi, wi) = tape.shapes[x];
                    let xin = tape.values[x].as_deref().unwrap_or(&[]);
                    let want_dx = x != 0 || need_dx;
                    let dx = conv_bwd(
                        kind,
                        (b, ci, hi, wi, cout),
                        xin,
                        self.param(flat, w),
                        &d,
                        &mut dflat[range(w)],
                        want_dx,
                    );
                    pool::give(d);
                    if let Some(dx) = dx {
                        accumulate(&mut grads, x, dx);
                    }
                }
                Node::BnAct {
                    x,
                    gamma,
                    beta,
                    act,
                    bn,
                } => {
                    let Saved::Bn {
                        mean,
                        invstd,
                        scale,
                        shift,
                    } = &tape.saved[i]
                    else {
                        candle_core::bail!("fused network: batch norm {i} saved nothing")
                    };
                    let z = tape.values[x].as_deref().unwrap_or(&[]);
                    let (dg, db) = time(Kind::BatchNorm, 0, || {
                        kernels::bn_act_bwd(
                            z,
                            &mut d,
                            b * hh * ww,
                            scale,
                            shift,
                            mean,
                            invstd,
                            act,
                            self.bns[bn].train,
                        )
                    });
                    dflat[range(gamma)].copy_from_slice(&dg);
                    dflat[range(beta)].copy_from_slice(&db);
                    accumulate(&mut grads, x, d);
                }
                Node::Act { x, act } => {
                    let xin = tape.values[x].as_deref().unwrap_or(&[]);
                    time(Kind::Activation, 0, || kernels::act_bwd(xin, &mut d, act));
                    accumulate(&mut grads, x, d);
                }
                Node::Se {
                    x,
                    wr,
                    br,
                    we,
                    be,
                    rd,
                } => {
                    let Saved::Se(s) = &tape.saved[i] else {
                        candle_core::bail!("fused network: squeeze-excite {i} saved nothing")
                    };
                    let (dwr, dbr, dwe, dbe) = time(Kind::SqueezeExcite, 0, || {
                        kernels::se_bwd(
                            tape.values[x].as_deref().unwrap_or(&[]),
                            &mut d,
                            c,
                            b,
                            hh * ww,
                            rd,
                            self.param(flat, wr),
                            self.param(flat, we),
                            s,
                        )
                    });
                    dflat[range(wr)].copy_from_slice(&dwr);
                    dflat[range(br)].copy_from_slice(&dbr);
                    dflat[range(we)].copy_from_slice(&dwe);
                    dflat[range(be)].copy_from_slice(&dbe);
                    accumulate(&mut grads, x, d);
                }
                Node::Add { a, b: bb } => {
                    let mut d2 = pool::take(d.len());
                    time(Kind::AddUpsample, 0, || d2.copy_from_slice(&d));
                    accumulate(&mut grads, a, d);
                    accumulate(&mut grads, bb, d2);
                }
                Node::Up2Add { small, big } => {
                    let (cs, hs, ws) = tape.shapes[small];
                    let mut ds = pool::take(cs * b * hs * ws);
                    time(Kind::AddUpsample, 0, || {
                        kernels::up2_bwd(&d, (hs, ws, b), &mut ds)
                    });
                    accumulate(&mut grads, small, ds);
                    accumulate(&mut grads, big, d);
                }
            }
            if profiling {
                let (nd, sh) = (&self.nodes[i], tape.shapes[i]);
                prof::node_time(i, || label(nd, sh, b), prof::clock() - t_node, true);
            }
            // Every consumer of value i has run its backward: value i is no longer needed.
            if let Some(v) = tape.values[i].take() {
                pool::give(v);
            }
            tape.saved[i] = Saved::None;
        }
        let dx = match grads[0].take() {
            Some(g) if need_dx => {
                let (ci, h, w) = tape.shapes[0];
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

/// A node's description for profiles.
fn label(n: &Node, (c, h, w): (usize, usize, usize), b: usize) -> String {
    let kind = match n {
        Node::Input => "input".to_string(),
        Node::Conv { kind, .. } => format!("conv {kind:?}"),
        Node::BnAct { act, .. } => format!("bn+{act:?}"),
        Node::Act { act, .. } => format!("{act:?}"),
        Node::Se { .. } => "squeeze-excite".to_string(),
        Node::Add { .. } => "add".to_string(),
        Node::Up2Add { .. } => "upsample2x+add".to_string(),
    };
    format!("{kind} -> {c}x{h}x{w} (B={b})")
}

#[allow(clippy::too_many_arguments)]
fn conv_fwd(
    kind: ConvKind,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
) {
    match kind {
        ConvKind::Pointwise => {
            let n = b * h * w;
            // SAFETY: y is (cout × n), wt (cout × c), x (c × n), all row-major and disjoint.
            time(Kind::Gemm, (2 * cout * c * n) as u64, || unsafe {
                kernels::sgemm(
                    cout,
                    n,
                    c,
                    y.as_mut_ptr(),
                    n,
                    false,
                    wt.as_ptr(),
                    c,
                    1,
                    x.as_ptr(),
                    n,
                    1,
                )
            })
        }
        ConvKind::Dense { k, stride } => {
            let g = ConvGeom::new(b, c, h, w, k, stride);
            let (n, rows, nr) = (g.ho * g.wo * b, c * k * k, g.chunk_rows());
            let per_row = g.wo * b;
            let mut cols = pool::take(rows * nr * per_row);
            // yᵀ = colsᵀ · wᵀ with wᵀ row-major: the faster storage order for this shape
            // (see `sgemm_strided`); same values as y = w · cols.
            let mut w_t = vec![0f32; rows * cout];
            kernels::transpose(wt, cout, rows, &mut w_t);
            let mut oy0 = 0;
            while oy0 < g.ho {
                let oy1 = (oy0 + nr).min(g.ho);
                let nc = (oy1 - oy0) * per_row;
                let cols = &mut cols[..rows * nc];
                time(Kind::Im2col, 0, || kernels::im2col(&g, x, oy0, oy1, cols));
                // SAFETY: yᵀ (nc × cout) is columns oy0·Wo·B.. of the (cout × n) output read
                // column-major; colsᵀ (nc × rows) is cols (rows × nc) read column-major.
                time(Kind::Gemm, (2 * cout * rows * nc) as u64, || unsafe {
                    kernels::sgemm_strided(
                        nc,
                        cout,
                        rows,
                        y.as_mut_ptr().add(oy0 * per_row),
                        1,
                        n,
                        false,
                        cols.as_ptr(),
                        1,
                        nc,
                        w_t.as_ptr(),
                        cout,
                        1,
                    )
                });
                oy0 = oy1;
            }
            pool::give(cols);
        }
        ConvKind::Depthwise { k, stride } => time(Kind::Depthwise, 0, || {
            kernels::depthwise_fwd(&ConvGeom::new(b, c, h, w, k, stride), x, wt, y)
        }),
    }
}

/// Weight gradient (written to `dw`) and, if `want_dx`, the input gradient of a conv.
fn conv_bwd(
    kind: ConvKind,
    (b, c, h, w, cout): (usize, usize, usize, usize, usize),
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    want_dx: bool,
) -> Option<Vec<f32>> {
    match kind {
        ConvKind::Pointwise => {
            let n = b * h * w;
            let flops = (2 * cout * c * n) as u64;
            // dw (cout × c) = dy (cout × n) · xᵀ, written column-major (the faster storage
            // order for this shape, see `sgemm_strided`) and transposed.
            let mut dwt = vec![0f32; cout * c];
            // SAFETY: dwt holds (cout × c) column-major; dy (cout × n), x (c × n) row-major.
            time(Kind::Gemm, flops, || unsafe {
                kernels::sgemm_strided(
                    cout,
                    c,
                    n,
                    dwt.as_mut_ptr(),
                    1,
                    cout,
                    false,
                    dy.as_ptr(),
                    n,
                    1,
                    x.as_ptr(),
                    1,
                    n,
                )
            });
            kernels::transpose(&dwt, c, cout, dw);
            want_dx.then(|| {
                let mut dx = pool::take(c * n);
                time(Kind::Gemm, flops, || unsafe {
                    kernels::sgemm(
                        c,
                        n,
                        cout,
                        dx.as_mut_ptr(),
                        n,
                        false,
                        wt.as_ptr(),
                        1,
                        c,
                        dy.as_ptr(),
                        n,
                        1,
                    )
                });
                dx
            })
        }
        ConvKind::Dense { k, stride } => {
            let g = ConvGeom::new(b, c, h, w, k, stride);
            let (n, rows, nr) = (g.ho * g.wo * b, c * k * k, g.chunk_rows());
            let per_row = g.wo * b;
            let mut cols = pool::take(rows * nr * per_row);
            let mut dcols = if want_dx {
                pool::take(rows * nr * per_row)
            } else {
                Vec::new()
            };
            let mut dx = if want_dx {
                pool::take_zeroed(c * h * w * b)
            } else {
                Vec::new()
            };
            // dw accumulated column-major (the faster order here), transposed at the end.
            let mut dwt = vec![0f32; cout * rows];
            let mut oy0 = 0;
            while oy0 < g.ho {
                let oy1 = (oy0 + nr).min(g.ho);
                let nc = (oy1 - oy0) * per_row;
                let cols = &mut cols[..rows * nc];
                time(Kind::Im2col, 0, || kernels::im2col(&g, x, oy0, oy1, cols));
                let flops = (2 * cout * rows * nc) as u64;
                // SAFETY: dwt (cout × rows, column-major) [+]= dy[:, chunk] (cout × nc) · colsᵀ.
                time(Kind::Gemm, flops, || unsafe {
                    kernels::sgemm_strided(
                        cout,
                        rows,
                        nc,
                        dwt.as_mut_ptr(),
                        1,
                        cout,
                        oy0 > 0,
                        dy.as_ptr().add(oy0 * per_row),
                        n,
                        1,
                        cols.as_ptr(),
                        1,
                        nc,
                    )
                });
                if want_dx {
                    let dcols = &mut dcols[..rows * nc];
                    // SAFETY: dcols (rows × nc) = wtᵀ (rows × cout) · dy[:, chunk].
                    time(Kind::Gemm, flops, || unsafe {
                        kernels::sgemm(
                            rows,
                            nc,
                            cout,
                            dcols.as_mut_ptr(),
                            nc,
                            false,
                            wt.as_ptr(),
                            1,
                            rows,
                            dy.as_ptr().add(oy0 * per_row),
                            n,
                            1,
                        )
                    });
                    time(Kind::Im2col, 0, || {
                        kernels::col2im(&g, dcols, oy0, oy1, &mut dx)
                    });
                }
                oy0 = oy1;
            }
            kernels::transpose(&dwt, rows, cout, dw);
            pool::give(cols);
            if want_dx {
                pool::give(dcols);
                Some(dx)
            } else {
                None
            }
        }
        ConvKind::Depthwise { k, stride } => {
            let g = ConvGeom::new(b, c, h, w, k, stride);
            time(Kind::Depthwise, 0, || {
                kernels::depthwise_bwd_kernel(&g, x, dy, dw)
            });
            want_dx.then(|| {
                let mut dx = pool::take(c * b * h * w);
                time(Kind::Depthwise, 0, || {
                    kernels::depthwise_bwd_input(&g, dy, wt, &mut dx)
                });
                dx
            })
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
        let (y, shape, tape) = self.core.forward(x, dims, flat, self.keep_tape)?;
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
                    match self.core.forward(xv, dims, f, true)?.2 {
                        Some(t) => t,
                        None => candle_core::bail!("fused network: no tape"),
                    }
                }
            };
            self.core.backward(tape, f, g, need_dx)?
        };
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dflat = Tensor::from_vec(dflat, flat.shape(), flat.device())?;
        Ok((dx, Some(dflat)))
    }
}

thread_local! {
    static DISABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether models should take the fused path: yes unless `ONEHEAD_FUSED=0` is set or the
/// caller is inside [`without`].
pub fn enabled() -> bool {
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env_off = *ENV_OFF.get_or_init(|| std::env::var("ONEHEAD_FUSED").is_ok_and(|v| v == "0"));
    !env_off && !DISABLED.with(|d| d.get())
}

/// Run `f` with the fused path disabled on this thread (models use their per-layer ops):
/// for tests that compare the two paths, and for profiling.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let before = DISABLED.with(|d| d.replace(true));
    let r = f();
    DISABLED.with(|d| d.set(before));
    r
}
