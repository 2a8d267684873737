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
//!
//! Code: `nodes/` holds one module per node kind (what it reads, its shape rule, forward,
//! what it saves, backward), `exec` the op and the loops that dispatch to the kinds, value
//! lifetimes and gradient accumulation, `kernels` the slice kernels. Which path a model
//! takes is the model's explicit [`Executor`].

mod direct;
mod exec;
pub mod kernels;
mod nodes;
pub mod pool;
pub mod prof;
pub mod winograd;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, Var};

pub use exec::eval_groups;
use exec::{Core, NetOp};
pub use kernels::Act;
use nodes::BnMode;
use nodes::Node;

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
            nodes: vec![Node::Input(nodes::Input)],
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
        Ok(self.push(Node::Conv(nodes::Conv {
            x,
            kind,
            cout,
            w,
            bias,
        })))
    }

    /// `act(BatchNorm(x))` with affine parameters `gamma`, `beta`.
    pub fn bn_act(&mut self, x: Id, gamma: &Tensor, beta: &Tensor, bn: BnRef, act: Act) -> Id {
        let gamma = self.param(gamma);
        let beta = self.param(beta);
        self.bns.push(bn);
        let bn = self.bns.len() - 1;
        self.push(Node::BnAct(nodes::BnAct {
            x,
            gamma,
            beta,
            act,
            bn,
        }))
    }

    pub fn act(&mut self, x: Id, act: Act) -> Id {
        self.push(Node::Act(nodes::ActNode { x, act }))
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
        Ok(self.push(Node::Se(nodes::Se {
            x,
            wr,
            br,
            we,
            be,
            rd,
        })))
    }

    pub fn add(&mut self, a: Id, b: Id) -> Id {
        self.push(Node::Add(nodes::Add { a, b }))
    }

    /// `big + upsample_nearest_2x(small)`.
    pub fn up2_add(&mut self, small: Id, big: Id) -> Id {
        self.push(Node::Up2Add(nodes::Up2Add { small, big }))
    }

    /// The plan computing `output`. Nodes that do not feed `output` are dropped, and so are
    /// their parameters (they get no gradient, as with the per-layer path).
    pub fn finish(self, output: Id) -> Plan {
        let mut needed = vec![false; self.nodes.len()];
        needed[output] = true;
        for i in (0..self.nodes.len()).rev() {
            if needed[i] {
                for j in self.nodes[i].op().inputs() {
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
        let mut bn = |i: usize| -> usize {
            *bmap[i].get_or_insert_with(|| {
                bns.push(self.bns[i].clone());
                bns.len() - 1
            })
        };
        let mut nodes = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let n = n.op().remap(&mut nodes::Remap {
                values: &remap,
                params: &mut p,
                bns: &mut bn,
            });
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

impl Plan {
    /// What the op needs besides its arguments: parameter offsets, and each BatchNorm's mode
    /// with (evaluation) a copy of its running statistics as they are now.
    fn core(&self) -> Result<Core> {
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
        Ok(Core {
            nodes: self.nodes.clone(),
            output: self.output,
            offsets,
            batch_stats: Mutex::new(vec![None; self.bns.len()]),
            bns,
        })
    }

    /// Every parameter, flattened, one after the other: the op's second argument (a copy,
    /// ~5 MB for the model; a function of the variables, so gradients reach them).
    fn flat_params(&self) -> Result<Tensor> {
        let flat: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.flatten_all())
            .collect::<Result<_>>()?;
        Tensor::cat(&flat, 0)
    }

    /// Whether every parameter is one [`Plan::run`] can take (CPU f32).
    pub fn params_supported(&self) -> bool {
        self.params.iter().all(supported)
    }

    /// This plan with its parameters and BatchNorm statistics as they are now, for repeated
    /// evaluation forwards ([`Prepared::run`]): the per-call work of [`Plan::run`] (the
    /// parameters' copy into one flat vector, ~6 % of a batch-1 forward, and the statistics'
    /// copies) is done once. Every BatchNorm must be in evaluation mode.
    pub fn prepare(&self) -> Result<Prepared> {
        if self.bns.iter().any(|bn| bn.train) {
            candle_core::bail!(
                "fused plan: prepare() is for evaluation; build the plan with train = false"
            )
        }
        Ok(Prepared {
            core: Arc::new(self.core()?),
            flat: self.flat_params()?.detach(),
        })
    }

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
        let core = Arc::new(self.core()?);
        let track = x.track_op() || self.params.iter().any(|p| p.track_op());
        let flat = self.flat_params()?;
        let x = x.contiguous()?;
        let op = NetOp::new(core.clone(), track && train);
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

/// A [`Plan`] frozen for evaluation ([`Plan::prepare`]): later changes to the variables or
/// the running statistics do not reach it; prepare again after them.
pub struct Prepared {
    core: Arc<Core>,
    flat: Tensor,
}

impl Prepared {
    /// The evaluation forward on `x (B, C, H, W)` (CPU f32) -> `(B, O, Ho, Wo)`, the values of
    /// [`Plan::run`] with `train = false`; not differentiable (no backward is recorded).
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        if !supported(x) {
            candle_core::bail!("fused plan: CPU f32 only")
        }
        let x = x.contiguous()?;
        x.apply_op2_no_bwd(&self.flat, &NetOp::new(self.core.clone(), false))
    }
}

/// Which implementation runs a model's forward and backward (see
/// `crate::model::OneHead::set_executor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Executor {
    /// The whole network as one fused op ([`Plan::run`]) where [`supported`] (CPU, f32);
    /// candle's per-layer ops elsewhere.
    #[default]
    Fused,
    /// candle's ops layer by layer on every device: what the fused path is tested against,
    /// and what other devices always use.
    PerLayer,
}

impl Executor {
    /// The process-wide default a new model starts with: [`Executor::Fused`], unless the
    /// environment variable `ONEHEAD_FUSED=0` asks for [`Executor::PerLayer`] (an override for
    /// comparisons without a code or config change; read once per process). An explicit
    /// choice on the model wins over it.
    pub fn from_env() -> Self {
        static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *ENV_OFF.get_or_init(|| std::env::var("ONEHEAD_FUSED").is_ok_and(|v| v == "0"));
        if off {
            Executor::PerLayer
        } else {
            Executor::Fused
        }
    }

    /// `"fused"` or `"per-layer"` (as parsed by `FromStr` and serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Fused => "fused",
            Executor::PerLayer => "per-layer",
        }
    }
}

impl std::fmt::Display for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Executor {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fused" => Ok(Executor::Fused),
            "per-layer" => Ok(Executor::PerLayer),
            _ => Err(format!(
                "unknown executor '{s}': expected 'fused' or 'per-layer'"
            )),
        }
    }
}

#[cfg(test)]
mod kernels_tests;
