//! The node kinds of a fused [`super::Plan`], one module each: what a kind reads, its shape
//! rule, its forward (and what it keeps for the backward), its backward, and its profile
//! label, side by side. The executor (`super::exec`) only walks the plan and dispatches
//! through [`NodeOp`]; it knows no kind.

mod act;
mod add;
mod bn_act;
mod conv;
mod input;
mod se;
mod up2_add;

use candle_core::Result;

use super::kernels::{Epilogue, SeSaved};
use super::prof::Kind;
use super::Id;

/// A train-mode BatchNorm's batch mean, biased variance and values per channel.
pub(in crate::ops::fused) type BatchStats = (Vec<f32>, Vec<f32>, usize);

/// A BatchNorm's mode for one run: eps, batch statistics or not, running statistics (eval).
pub(in crate::ops::fused) struct BnMode {
    pub(in crate::ops::fused) eps: f64,
    pub(in crate::ops::fused) train: bool,
    pub(in crate::ops::fused) running: Option<(Vec<f32>, Vec<f32>)>,
}

pub(super) use act::ActNode;
pub(super) use add::Add;
pub(super) use bn_act::{BnAct, BnSaved};
pub(super) use conv::Conv;
pub(super) use input::Input;
pub(super) use se::Se;
pub(super) use up2_add::Up2Add;

/// `(C, H, W)` of a value; the batch is the run's.
pub(super) type Dims = (usize, usize, usize);

/// One step of a plan.
#[derive(Debug, Clone)]
pub(super) enum Node {
    Input(Input),
    Conv(Conv),
    BnAct(BnAct),
    Act(ActNode),
    Se(Se),
    Add(Add),
    Up2Add(Up2Add),
}

impl Node {
    /// The node's kind as a [`NodeOp`].
    pub(super) fn op(&self) -> &dyn NodeOp {
        match self {
            Node::Input(n) => n,
            Node::Conv(n) => n,
            Node::BnAct(n) => n,
            Node::Act(n) => n,
            Node::Se(n) => n,
            Node::Add(n) => n,
            Node::Up2Add(n) => n,
        }
    }
}

/// What one node kind does; implemented once per kind.
pub(super) trait NodeOp {
    /// Values the forward reads.
    fn inputs(&self) -> Vec<Id>;

    /// The value the backward reads besides the output gradient (kept on the tape when
    /// training), if any.
    fn backward_reads(&self) -> Option<Id> {
        None
    }

    /// This node in a pruned plan: values and parameters renumbered (`PlanBuilder::finish`).
    /// Parameters are renumbered in the order they were added, so the flat parameter vector
    /// keeps its layout.
    fn remap(&self, m: &mut Remap) -> Node;

    /// `(C, H, W)` of the output from those of the inputs; checks parameter sizes.
    fn dims(&self, cx: &DimsCx) -> Result<Dims>;

    /// The profile kind charged with this node's time (outside the finer sections its
    /// kernels time themselves, e.g. a dense conv's im2col).
    fn kind(&self) -> Kind;

    /// What the node computes, for per-node profiles ("conv Pointwise", "bn+Relu", …).
    fn name(&self) -> String;

    /// The output value, and what the backward needs besides the input (kept only when
    /// training: [`Fwd::keep`]).
    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)>;

    /// From `d`, the gradient of the output: the gradients of the inputs, in the order they
    /// are accumulated; parameter gradients are written through [`Bwd::dparam`].
    fn backward(&self, cx: &mut Bwd, d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>>;
}

/// What a forward keeps for the backward besides its input value.
pub(super) enum Saved {
    None,
    Bn(BnSaved),
    Se(SeSaved),
    /// A Winograd conv's transformed input (`winograd::forward_keeping`).
    Winograd(super::pool::Pooled),
}

/// Renumbering of values, parameters and BatchNorms when a plan is pruned.
pub(super) struct Remap<'a> {
    pub(super) values: &'a [Id],
    pub(super) params: &'a mut dyn FnMut(usize) -> usize,
    pub(super) bns: &'a mut dyn FnMut(usize) -> usize,
}

impl Remap<'_> {
    pub(super) fn value(&self, j: Id) -> Id {
        self.values[j]
    }

    pub(super) fn param(&mut self, p: usize) -> usize {
        (self.params)(p)
    }

    pub(super) fn bn(&mut self, b: usize) -> usize {
        (self.bns)(b)
    }
}

/// What a shape rule sees: the input dims, the dims of the earlier values, parameter sizes.
pub(super) struct DimsCx<'a> {
    /// This node's value.
    pub(super) i: Id,
    /// `(C, H, W)` of the network input.
    pub(super) input: Dims,
    pub(super) dims: &'a [Dims],
    pub(super) offsets: &'a [(usize, usize)],
}

impl DimsCx<'_> {
    /// Number of values of parameter `p`.
    pub(super) fn plen(&self, p: usize) -> usize {
        self.offsets[p].1
    }
}

/// What a node's forward sees.
pub(super) struct Fwd<'a> {
    /// This node's value.
    pub(super) i: Id,
    pub(super) b: usize,
    pub(super) dims: &'a [Dims],
    /// Values computed so far (`(C, H, W, B)`); consumed ones already freed.
    pub(super) values: &'a mut [Option<Vec<f32>>],
    pub(super) last_use: &'a [usize],
    /// Training forward: the values and [`Saved`] are kept for the backward.
    pub(super) keep: bool,
    pub(super) flat: &'a [f32],
    pub(super) offsets: &'a [(usize, usize)],
    pub(super) bns: &'a [BnMode],
    /// Batch statistics of the train-mode BatchNorms, filled by their forwards.
    pub(super) stats: &'a mut [Option<BatchStats>],
    /// The op's input `(B, C, H, W)`.
    pub(super) x: &'a [f32],
    /// The input node whose value is `x` itself, not a copy (one image in evaluation, where
    /// the two layouts are the same): [`Fwd::value`] returns `x` for it.
    pub(super) input_alias: Option<Id>,
    /// An evaluation BatchNorm + activation that reads only this node's output, for a
    /// convolution to apply as it writes (the executor then skips the BatchNorm's node).
    pub(super) epilogue: Option<Epilogue<'a>>,
}

impl<'a> Fwd<'a> {
    /// `(C, H, W)` of this node's output.
    pub(super) fn out_dims(&self) -> Dims {
        self.dims[self.i]
    }

    /// Length of this node's output (`C·H·W·B`).
    pub(super) fn out_len(&self) -> usize {
        let (c, h, w) = self.out_dims();
        c * self.b * h * w
    }

    /// Value `j`; an error if it was freed already.
    pub(super) fn value(&self, j: Id) -> Result<&[f32]> {
        if self.input_alias == Some(j) {
            return Ok(self.x);
        }
        match &self.values[j] {
            Some(v) => Ok(v),
            None => candle_core::bail!("fused network: value {j} freed too early"),
        }
    }

    /// Parameter `p`.
    pub(super) fn param(&self, p: usize) -> &'a [f32] {
        let (o, n) = self.offsets[p];
        let flat: &'a [f32] = self.flat;
        &flat[o..o + n]
    }

    /// Value `j` itself, to be overwritten in place, when this is an evaluation forward and
    /// this node is its last reader (no copy). Call after [`Fwd::value`] has checked it.
    pub(super) fn take_if_last(&mut self, j: Id) -> Option<Vec<f32>> {
        if !self.keep && self.last_use[j] == self.i && self.input_alias != Some(j) {
            Some(self.values[j].take().unwrap_or_default())
        } else {
            None
        }
    }
}

/// What a node's backward sees.
pub(super) struct Bwd<'a> {
    /// This node's value.
    pub(super) i: Id,
    pub(super) b: usize,
    pub(super) dims: &'a [Dims],
    pub(super) values: &'a [Option<Vec<f32>>],
    /// What this node's forward saved.
    pub(super) saved: &'a Saved,
    pub(super) flat: &'a [f32],
    pub(super) offsets: &'a [(usize, usize)],
    /// The flat parameter gradient.
    pub(super) dflat: &'a mut [f32],
    pub(super) bns: &'a [BnMode],
    /// Whether the network input's gradient is wanted.
    pub(super) need_dx: bool,
}

impl<'a> Bwd<'a> {
    /// Value `j` as the forward kept it.
    pub(super) fn value(&self, j: Id) -> &'a [f32] {
        let values: &'a [Option<Vec<f32>>] = self.values;
        values[j].as_deref().unwrap_or(&[])
    }

    /// Parameter `p`.
    pub(super) fn param(&self, p: usize) -> &'a [f32] {
        let (o, n) = self.offsets[p];
        let flat: &'a [f32] = self.flat;
        &flat[o..o + n]
    }

    /// The gradient of parameter `p`, to be overwritten.
    pub(super) fn dparam(&mut self, p: usize) -> &mut [f32] {
        let (o, n) = self.offsets[p];
        &mut self.dflat[o..o + n]
    }
}
