//! Resizing ops with working gradients.
//!
//! - [`resize_bilinear`]: candle's `upsample_bilinear2d` has no backward; two matmuls with
//!   per-axis interpolation matrices do the same (PyTorch `align_corners=False`) and train.
//! - [`upsample_nearest2x`]: candle's `upsample_nearest2d` backward is slow and overwrites
//!   instead of accumulating gradients in some graphs; reshape + broadcast + reshape is exact.
//! - [`subsample2`]: `max_pool2d` with kernel 1 stride 2 (torchvision's `LastLevelMaxPool`) has
//!   no backward in candle when kernel ≠ stride; it is just every second row and column.

use candle_core::{DType, Device, Result, Tensor};

/// Interpolation matrix `(out, in)` for 1-D linear resizing with PyTorch's
/// `align_corners=False` rule: `src = max((dst + 0.5)·in/out − 0.5, 0)`.
pub fn linear_interp_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_len * in_len];
    let scale = in_len as f64 / out_len as f64;
    for d in 0..out_len {
        let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f64).clamp(0.0, 1.0);
        m[d * in_len + i0] += (1.0 - l1) as f32;
        m[d * in_len + i1] += l1 as f32;
    }
    m
}

fn interp_tensor(in_len: usize, out_len: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        linear_interp_matrix(in_len, out_len),
        (out_len, in_len),
        dev,
    )?
    .to_dtype(dtype)
}

/// Bilinear resize `(B,C,H,W) -> (B,C,out_h,out_w)`, `align_corners=False` (PyTorch's
/// `F.interpolate(mode="bilinear")`), differentiable: `y = M_h · x · M_wᵀ` per plane.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let (dev, dt) = (x.device(), x.dtype());
    // Width: (B·C·H, W) · (W, out_w).
    let mw_t = interp_tensor(w, out_w, dt, dev)?.t()?;
    let y = x.reshape((b * c * h, w))?.matmul(&mw_t)?;
    // Height: bring H last, (B·C·out_w, H) · (H, out_h), then back.
    let mh_t = interp_tensor(h, out_h, dt, dev)?.t()?;
    let y = y
        .reshape((b * c, h, out_w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * out_w, h))?
        .matmul(&mh_t)?;
    y.reshape((b * c, out_w, out_h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, out_h, out_w))
}

/// Nearest-neighbour ×2 upsampling `(B,C,H,W) -> (B,C,2H,2W)`, by reshape + broadcast.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Every second row and column starting at 0: `(B,C,H,W) -> (B,C,⌈H/2⌉,⌈W/2⌉)`.
/// Equals `max_pool2d(x, kernel=1, stride=2)`.
pub fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev = x.device();
    let rows: Vec<u32> = (0..h as u32).step_by(2).collect();
    let cols: Vec<u32> = (0..w as u32).step_by(2).collect();
    let rows = Tensor::new(rows.as_slice(), dev)?;
    let cols = Tensor::new(cols.as_slice(), dev)?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}
