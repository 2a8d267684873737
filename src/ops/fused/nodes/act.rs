//! A stand-alone activation (the head's ReLU). An evaluation forward overwrites its input in
//! place when it is the input's last reader.

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels::{self, Act};
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct ActNode {
    pub(in crate::ops::fused) x: Id,
    pub(in crate::ops::fused) act: Act,
}

impl NodeOp for ActNode {
    fn inputs(&self) -> Vec<Id> {
        vec![self.x]
    }

    fn backward_reads(&self) -> Option<Id> {
        Some(self.x)
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::Act(ActNode {
            x: m.value(self.x),
            act: self.act,
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        Ok(cx.dims[self.x])
    }

    fn kind(&self) -> Kind {
        Kind::Activation
    }

    fn name(&self) -> String {
        format!("{:?}", self.act)
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (c, hh, ww) = cx.out_dims();
        cx.value(self.x)?;
        let y = match cx.take_if_last(self.x) {
            Some(mut v) => {
                // In place: the BatchNorm kernel with scale 1 and shift 0 (same values).
                let one = vec![1f32; c];
                let zero = vec![0f32; c];
                kernels::affine_act_inplace(&mut v, cx.b * hh * ww, &one, &zero, self.act);
                v
            }
            None => {
                let mut y = pool::take(cx.out_len());
                kernels::act_fwd(cx.value(self.x)?, &mut y, self.act);
                y
            }
        };
        Ok((y, Saved::None))
    }

    fn backward(&self, cx: &mut Bwd, mut d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        kernels::act_bwd(cx.value(self.x), &mut d, self.act);
        Ok(vec![(self.x, d)])
    }
}
