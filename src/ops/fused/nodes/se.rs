//! Squeeze-excite: `x · hsig(We·relu(Wr·mean(x) + br) + be)`; `wr (R,C,1,1)`,
//! `we (C,R,1,1)`. The forward keeps the pooled means and the small layers' values
//! ([`SeSaved`]) for the backward.

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels;
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct Se {
    pub(in crate::ops::fused) x: Id,
    /// Reduce conv weight and bias, expand conv weight and bias.
    pub(in crate::ops::fused) wr: usize,
    pub(in crate::ops::fused) br: usize,
    pub(in crate::ops::fused) we: usize,
    pub(in crate::ops::fused) be: usize,
    /// Reduced channels R.
    pub(in crate::ops::fused) rd: usize,
}

impl NodeOp for Se {
    fn inputs(&self) -> Vec<Id> {
        vec![self.x]
    }

    fn backward_reads(&self) -> Option<Id> {
        Some(self.x)
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::Se(Se {
            x: m.value(self.x),
            wr: m.param(self.wr),
            br: m.param(self.br),
            we: m.param(self.we),
            be: m.param(self.be),
            rd: self.rd,
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        let s = cx.dims[self.x];
        if cx.plen(self.wr) != self.rd * s.0 || cx.plen(self.we) != self.rd * s.0 {
            candle_core::bail!("fused squeeze-excite (value {}): {} channels", cx.i, s.0)
        }
        Ok(s)
    }

    fn kind(&self) -> Kind {
        Kind::SqueezeExcite
    }

    fn name(&self) -> String {
        "squeeze-excite".to_string()
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (c, hh, ww) = cx.out_dims();
        let xin = cx.value(self.x)?;
        let mut y = pool::take(cx.out_len());
        let s = kernels::se_fwd(
            xin,
            c,
            cx.b,
            hh * ww,
            self.rd,
            cx.param(self.wr),
            cx.param(self.br),
            cx.param(self.we),
            cx.param(self.be),
            &mut y,
        );
        Ok((y, Saved::Se(s)))
    }

    fn backward(&self, cx: &mut Bwd, mut d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        let Saved::Se(s) = cx.saved else {
            candle_core::bail!("fused network: squeeze-excite {} saved nothing", cx.i)
        };
        let (c, hh, ww) = cx.dims[cx.i];
        let (dwr, dbr, dwe, dbe) = kernels::se_bwd(
            cx.value(self.x),
            &mut d,
            c,
            cx.b,
            hh * ww,
            self.rd,
            cx.param(self.wr),
            cx.param(self.we),
            s,
        );
        cx.dparam(self.wr).copy_from_slice(&dwr);
        cx.dparam(self.br).copy_from_slice(&dbr);
        cx.dparam(self.we).copy_from_slice(&dwe);
        cx.dparam(self.be).copy_from_slice(&dbe);
        Ok(vec![(self.x, d)])
    }
}
