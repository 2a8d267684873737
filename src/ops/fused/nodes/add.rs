//! A residual add `a + b`; its backward hands the output gradient to both inputs (a copy for
//! the second).

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels;
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct Add {
    pub(in crate::ops::fused) a: Id,
    pub(in crate::ops::fused) b: Id,
}

impl NodeOp for Add {
    fn inputs(&self) -> Vec<Id> {
        vec![self.a, self.b]
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::Add(Add {
            a: m.value(self.a),
            b: m.value(self.b),
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        let (a, b) = (cx.dims[self.a], cx.dims[self.b]);
        if a != b {
            candle_core::bail!("fused add: {a:?} vs {b:?}")
        }
        Ok(a)
    }

    fn kind(&self) -> Kind {
        Kind::AddUpsample
    }

    fn name(&self) -> String {
        "add".to_string()
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (va, vb) = (cx.value(self.a)?, cx.value(self.b)?);
        let mut y = pool::take(cx.out_len());
        kernels::add(va, vb, &mut y);
        Ok((y, Saved::None))
    }

    fn backward(&self, _: &mut Bwd, d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        let mut d2 = pool::take(d.len());
        d2.copy_from_slice(&d);
        Ok(vec![(self.a, d), (self.b, d2)])
    }
}
