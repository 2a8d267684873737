//! The network input: `(B, C, H, W)` converted to the executor's `(C, H, W, B)` layout.

use candle_core::Result;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::prof::Kind;
use crate::ops::fused::{kernels, pool, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct Input;

impl NodeOp for Input {
    fn inputs(&self) -> Vec<Id> {
        vec![]
    }

    fn remap(&self, _: &mut Remap) -> Node {
        Node::Input(Input)
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        Ok(cx.input)
    }

    fn kind(&self) -> Kind {
        Kind::Layout
    }

    fn name(&self) -> String {
        "input".to_string()
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        if cx.input_alias == Some(cx.i) {
            // Read as `x` itself (`Fwd::value`): nothing to convert.
            return Ok((Vec::new(), Saved::None));
        }
        let (c, h, w) = cx.out_dims();
        let mut v = pool::take(cx.out_len());
        kernels::nchw_to_chwn(cx.x, cx.b, c, h * w, &mut v);
        Ok((v, Saved::None))
    }

    /// The executor converts the input's gradient itself (`exec`): nothing to do here.
    fn backward(&self, _: &mut Bwd, _: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        Ok(vec![])
    }
}
