//! Shared pieces of the custom CPU kernels: typed, contiguous slices out of candle's CPU
//! storage, and the valid output range of a padded, strided window.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

fn contiguous<'a, T>(data: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The f32 data of `s` under layout `l`; a clear error names `op` for other dtypes or
/// strided layouts (the kernels only implement contiguous f32).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        other => candle_core::bail!(
            "{op}: only f32 is implemented on CPU, got {:?}",
            other.dtype()
        ),
    }
}

/// As [`f32_slice`] for u32 data (class ids).
pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(v, l, op),
        other => candle_core::bail!("{op}: expected u32, got {:?}", other.dtype()),
    }
}

/// Output positions `o` (along one axis with `out` positions) whose input index
/// `o·stride + tap − pad` lies in `[0, len)`: `(first, end)`, end exclusive. Lets the
/// convolution loops skip padding without a bounds test per element.
pub(crate) fn valid_range(
    tap: usize,
    len: usize,
    out: usize,
    stride: usize,
    pad: usize,
) -> (usize, usize) {
    // o·s + tap ≥ pad
    let first = if pad > tap {
        (pad - tap).div_ceil(stride).min(out)
    } else {
        0
    };
    // o·s + tap − pad ≤ len − 1  ⇔  o ≤ (len − 1 + pad − tap) / s
    let end = if len + pad > tap {
        ((len - 1 + pad - tap) / stride + 1).min(out)
    } else {
        0
    };
    (first, end.max(first))
}
