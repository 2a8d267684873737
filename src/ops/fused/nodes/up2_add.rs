//! The FPN's top-down step `big + upsample_nearest_2x(small)`; the backward sums 2×2 blocks
//! of the output gradient into `small`'s gradient and hands the gradient itself to `big`.

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels;
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct Up2Add {
    pub(in crate::ops::fused) small: Id,
    pub(in crate::ops::fused) big: Id,
}

impl NodeOp for Up2Add {
    fn inputs(&self) -> Vec<Id> {
        vec![self.small, self.big]
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::Up2Add(Up2Add {
            small: m.value(self.small),
            big: m.value(self.big),
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        let (c, h, w) = cx.dims[self.small];
        if cx.dims[self.big] != (c, 2 * h, 2 * w) {
            candle_core::bail!(
                "fused upsample-add: {:?} is not twice {:?}",
                cx.dims[self.big],
                cx.dims[self.small]
            )
        }
        Ok(cx.dims[self.big])
    }

    fn kind(&self) -> Kind {
        Kind::AddUpsample
    }

    fn name(&self) -> String {
        "upsample2x+add".to_string()
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (_, hs, ws) = cx.dims[self.small];
        let (vs, vb) = (cx.value(self.small)?, cx.value(self.big)?);
        let mut y = pool::take(cx.out_len());
        kernels::up2_add(vs, vb, (hs, ws, cx.b), &mut y);
        Ok((y, Saved::None))
    }

    fn backward(&self, cx: &mut Bwd, d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        let (cs, hs, ws) = cx.dims[self.small];
        let mut ds = pool::take(cs * cx.b * hs * ws);
        kernels::up2_bwd(&d, (hs, ws, cx.b), &mut ds);
        Ok(vec![(self.small, ds), (self.big, d)])
    }
}
