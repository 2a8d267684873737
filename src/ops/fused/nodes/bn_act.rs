//! `act(BatchNorm(x))`, fused: batch statistics (train mode) or running statistics, then one
//! affine + activation pass per channel. An evaluation forward overwrites its input in place
//! when it is the input's last reader. The backward includes the statistics' gradient in
//! train mode.

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels::{self, Act};
use crate::ops::fused::nodes::BnMode;
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct BnAct {
    pub(in crate::ops::fused) x: Id,
    /// Affine parameters.
    pub(in crate::ops::fused) gamma: usize,
    pub(in crate::ops::fused) beta: usize,
    pub(in crate::ops::fused) act: Act,
    /// Index of the BatchNorm (mode, running statistics) in the plan.
    pub(in crate::ops::fused) bn: usize,
}

/// What the forward keeps: the statistics used and the per-channel affine map.
pub(in crate::ops::fused) struct BnSaved {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BnAct {
    /// `(scale, shift, act)` of an evaluation-mode BatchNorm (none in training mode), given
    /// the flat parameters, their offsets and the plan's BatchNorms: what a convolution
    /// feeding it may apply itself ([`kernels::Epilogue`]), computed as the forward does.
    pub(in crate::ops::fused) fn eval_affine(
        &self,
        flat: &[f32],
        offsets: &[(usize, usize)],
        bns: &[BnMode],
    ) -> Option<(Vec<f32>, Vec<f32>, Act)> {
        let BnMode {
            eps,
            train,
            running,
        } = &bns[self.bn];
        if *train {
            return None;
        }
        let param = |p: usize| &flat[offsets[p].0..offsets[p].0 + offsets[p].1];
        let (mean, var) = running.clone().unwrap_or_default();
        let (scale, shift, _) =
            kernels::bn_scale_shift(param(self.gamma), param(self.beta), &mean, &var, *eps);
        Some((scale, shift, self.act))
    }
}

impl NodeOp for BnAct {
    fn inputs(&self) -> Vec<Id> {
        vec![self.x]
    }

    fn backward_reads(&self) -> Option<Id> {
        Some(self.x)
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::BnAct(BnAct {
            x: m.value(self.x),
            gamma: m.param(self.gamma),
            beta: m.param(self.beta),
            act: self.act,
            bn: m.bn(self.bn),
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        let s = cx.dims[self.x];
        if cx.plen(self.gamma) != s.0 || cx.plen(self.beta) != s.0 {
            candle_core::bail!("fused batch norm (value {}): {} channels", cx.i, s.0)
        }
        Ok(s)
    }

    fn kind(&self) -> Kind {
        Kind::BatchNorm
    }

    fn name(&self) -> String {
        format!("bn+{:?}", self.act)
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (c, hh, ww) = cx.out_dims();
        let m = cx.b * hh * ww;
        let bns = cx.bns;
        let BnMode {
            eps,
            train,
            running,
        } = &bns[self.bn];
        let z = cx.value(self.x)?;
        let (mean, var) = if *train {
            let mut mean = vec![0f32; c];
            let mut var = vec![0f32; c];
            kernels::channel_stats(z, m, &mut mean, &mut var);
            (mean, var)
        } else {
            running.clone().unwrap_or_default()
        };
        let (scale, shift, invstd) =
            kernels::bn_scale_shift(cx.param(self.gamma), cx.param(self.beta), &mean, &var, *eps);
        let y = match cx.take_if_last(self.x) {
            Some(mut v) => {
                kernels::affine_act_inplace(&mut v, m, &scale, &shift, self.act);
                v
            }
            None => {
                let mut y = pool::take(cx.out_len());
                kernels::affine_act(cx.value(self.x)?, m, &scale, &shift, self.act, &mut y);
                y
            }
        };
        if *train {
            cx.stats[self.bn] = Some((mean.clone(), var, m));
        }
        let saved = BnSaved {
            mean,
            invstd,
            scale,
            shift,
        };
        Ok((y, Saved::Bn(saved)))
    }

    fn backward(&self, cx: &mut Bwd, mut d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        let Saved::Bn(s) = cx.saved else {
            candle_core::bail!("fused network: batch norm {} saved nothing", cx.i)
        };
        let (_, hh, ww) = cx.dims[cx.i];
        let (dg, db) = kernels::bn_act_bwd(
            cx.value(self.x),
            &mut d,
            cx.b * hh * ww,
            &s.scale,
            &s.shift,
            &s.mean,
            &s.invstd,
            self.act,
            cx.bns[self.bn].train,
        );
        cx.dparam(self.gamma).copy_from_slice(&dg);
        cx.dparam(self.beta).copy_from_slice(&db);
        Ok(vec![(self.x, d)])
    }
}
