//! Convolutions (square kernel, padding `k/2`): 1×1 as one gemm over the whole batch, dense
//! 3×3 stride 1 over 1 or 8+ images by Winograd F(4×4, 3×3) (`winograd.rs`; the backward
//! from 8 images), the stem's forward (few input channels) directly (`direct.rs`, below 8
//! images over padded planes), other dense k×k as chunked im2col + one gemm per chunk,
//! depthwise with the direct kernels; optional bias. An evaluation forward may be handed the
//! following BatchNorm + activation to apply as it writes (`kernels::Epilogue`). The
//! backward writes the weight (and bias) gradient and returns the input gradient unless
//! nothing needs it (the network input when it is not tracked).

use candle_core::Result;
use rayon::prelude::*;

use super::{Bwd, Dims, DimsCx, Fwd, Node, NodeOp, Remap, Saved};
use crate::ops::fused::kernels::{self, serial_gemms, ConvGeom, Epilogue};
use crate::ops::fused::prof::{time, Kind};
use crate::ops::fused::{direct, pool, winograd, ConvKind, Id};

#[derive(Debug, Clone)]
pub(in crate::ops::fused) struct Conv {
    pub(in crate::ops::fused) x: Id,
    pub(in crate::ops::fused) kind: ConvKind,
    pub(in crate::ops::fused) cout: usize,
    /// Weight `(O, C/groups, k, k)` and bias `(O,)` parameters.
    pub(in crate::ops::fused) w: usize,
    pub(in crate::ops::fused) bias: Option<usize>,
}

impl NodeOp for Conv {
    fn inputs(&self) -> Vec<Id> {
        vec![self.x]
    }

    fn backward_reads(&self) -> Option<Id> {
        Some(self.x)
    }

    fn remap(&self, m: &mut Remap) -> Node {
        Node::Conv(Conv {
            x: m.value(self.x),
            kind: self.kind,
            cout: self.cout,
            w: m.param(self.w),
            bias: self.bias.map(|b| m.param(b)),
        })
    }

    fn dims(&self, cx: &DimsCx) -> Result<Dims> {
        let (i, kind, cout) = (cx.i, self.kind, self.cout);
        let (c, h, w) = cx.dims[self.x];
        let (want, out) = match kind {
            ConvKind::Pointwise => (cout * c, (cout, h, w)),
            ConvKind::Dense { k, stride } => {
                if h + 2 * (k / 2) < k || w + 2 * (k / 2) < k || stride == 0 {
                    candle_core::bail!("fused conv: {h}x{w} too small for k{k}")
                }
                let g = ConvGeom::new(1, c, h, w, k, stride);
                (cout * c * k * k, (cout, g.ho, g.wo))
            }
            ConvKind::Depthwise { k, stride } => {
                if cout != c || stride == 0 {
                    candle_core::bail!("fused depthwise conv: {c} -> {cout} channels")
                }
                let g = ConvGeom::new(1, c, h, w, k, stride);
                (c * k * k, (c, g.ho, g.wo))
            }
        };
        if cx.plen(self.w) != want || self.bias.is_some_and(|b| cx.plen(b) != cout) {
            candle_core::bail!(
                "fused conv (value {i}): weight has {} values, input {c} channels, \
                 {kind:?} to {cout} wants {want}",
                cx.plen(self.w)
            )
        }
        Ok(out)
    }

    fn kind(&self) -> Kind {
        match self.kind {
            ConvKind::Pointwise | ConvKind::Dense { .. } => Kind::Gemm,
            ConvKind::Depthwise { .. } => Kind::Depthwise,
        }
    }

    fn name(&self) -> String {
        format!("conv {:?}", self.kind)
    }

    fn forward(&self, cx: &mut Fwd) -> Result<(Vec<f32>, Saved)> {
        let (_, hh, ww) = cx.out_dims();
        let (ci, hi, wi) = cx.dims[self.x];
        let xin = cx.value(self.x)?;
        let mut y = pool::take(cx.out_len());
        let geom = (cx.b, ci, hi, wi, self.cout);
        let mut saved = Saved::None;
        if cx.keep && self.kind == (ConvKind::Dense { k: 3, stride: 1 }) && winograd::applies(cx.b)
        {
            // Training: the transformed input stays on the tape for the weight gradient.
            let v = winograd::forward_keeping(&wino(geom), xin, cx.param(self.w), &mut y);
            saved = v.map_or(Saved::None, |v| Saved::Winograd(pool::Pooled(v)));
        } else {
            // The executor hands a following evaluation BatchNorm only to bias-free convs.
            let ep = cx.epilogue.filter(|_| self.bias.is_none());
            conv_fwd(self.kind, geom, xin, cx.param(self.w), &mut y, ep.as_ref());
        }
        if let Some(bi) = self.bias {
            let bias = cx.param(bi);
            time(Kind::Activation, 0, || {
                kernels::add_bias(&mut y, bias, cx.b * hh * ww)
            });
        }
        Ok((y, saved))
    }

    fn backward(&self, cx: &mut Bwd, d: Vec<f32>) -> Result<Vec<(Id, Vec<f32>)>> {
        let b = cx.b;
        if let Some(bi) = self.bias {
            let (_, hh, ww) = cx.dims[cx.i];
            let out = cx.dparam(bi);
            time(Kind::Activation, 0, || {
                kernels::row_sums(&d, b * hh * ww, out)
            });
        }
        let (ci, hi, wi) = cx.dims[self.x];
        let xin = cx.value(self.x);
        let wt = cx.param(self.w);
        let want_dx = self.x != 0 || cx.need_dx;
        let geom = (b, ci, hi, wi, self.cout);
        let kept = match cx.saved {
            Saved::Winograd(v) => Some(&v.0[..]),
            _ => None,
        };
        let dx = conv_bwd(
            self.kind,
            geom,
            (xin, kept),
            wt,
            &d,
            cx.dparam(self.w),
            want_dx,
        );
        pool::give(d);
        Ok(dx.map(|dx| (self.x, dx)).into_iter().collect())
    }
}

/// `(B, C, H, W, O)`: batch, input channels and size, output channels.
type Geom = (usize, usize, usize, usize, usize);

fn wino((b, c, h, w, o): Geom) -> winograd::Geom {
    winograd::Geom { b, c, h, w, o }
}

/// `y = conv(x, wt)`, then through `ep` (block by block where the kernel allows it).
fn conv_fwd(
    kind: ConvKind,
    geom: Geom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ep: Option<&Epilogue>,
) {
    let (b, c, h, w, o) = geom;
    let mut ep_left = ep;
    match kind {
        ConvKind::Pointwise if ep.is_some() => {
            pointwise_fwd_blocks(geom, x, wt, y, ep);
            ep_left = None;
        }
        ConvKind::Pointwise => pointwise_fwd(geom, x, wt, y),
        ConvKind::Dense { k: 3, stride: 1 } if winograd::applies_forward(b) => {
            winograd::forward(&wino(geom), x, wt, y)
        }
        ConvKind::Dense { k, stride } if direct::applies(b, c, k, o) => {
            direct::forward(&ConvGeom::new(b, c, h, w, k, stride), o, x, wt, y, ep);
            ep_left = None;
        }
        ConvKind::Dense { k, stride } if direct::applies_small(b, c, (k, stride), o) => {
            direct::forward_small(&ConvGeom::new(b, c, h, w, k, stride), o, x, wt, y)
        }
        ConvKind::Dense { k, stride } => dense_fwd(geom, k, stride, x, wt, y),
        ConvKind::Depthwise { k, stride } => {
            let g = ConvGeom::new(b, c, h, w, k, stride);
            kernels::depthwise_fwd(&g, x, wt, y, ep);
            ep_left = None;
        }
    }
    if let Some(e) = ep_left {
        let n = y.len() / o.max(1);
        time(Kind::BatchNorm, 0, || e.apply_all(y, n));
    }
}

/// [`pointwise_fwd`] with `ep` applied as it goes: blocks of output channels where
/// [`row_block`] says, column blocks of about 64 K outputs otherwise (in cache until the
/// epilogue has run), one single-threaded gemm each, blocks in parallel. The values are the
/// one gemm's: the gemm crate splits rows and columns, never the sum.
fn pointwise_fwd_blocks(
    (b, c, h, w, cout): Geom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ep: Option<&Epilogue>,
) {
    let n = b * h * w;
    let (rb, nb) = match row_block(cout, c, n) {
        Some(rb) => (rb, n.max(1)),
        None => {
            // At most ~64 K outputs, a multiple of the thread count of blocks, equal widths
            // (a 576 → 96 conv at 7×7 × 16 had blocks of 704 and 80 columns: one thread did
            // 90 %).
            let threads = rayon::current_num_threads().max(1);
            let blocks = (n * cout)
                .div_ceil(65536)
                .next_multiple_of(threads)
                .min(n.max(1));
            (cout.max(1), n.div_ceil(blocks.max(1)).max(1))
        }
    };
    let cols = n.div_ceil(nb);
    let yp = kernels::Ptr(y.as_mut_ptr());
    time(Kind::Gemm, (2 * cout * c * n) as u64, || {
        (0..cout.div_ceil(rb) * cols)
            .into_par_iter()
            .for_each(|blk| {
                let (r0, j0) = (blk / cols * rb, blk % cols * nb);
                let block = ((r0, rb.min(cout - r0)), (j0, nb.min(n - j0)));
                // SAFETY: the blocks tile y (cout × n) without overlap, one task each; y, wt
                // (cout × c) and x (c × n) are the sizes `pointwise_block` wants.
                unsafe { pointwise_block(&yp, (n, c), (x, wt), block, ep) }
            })
    })
}

/// Output channels `r0 .. r0 + m`, columns `j0 .. j0 + len` of `y (cout × n)` = `wt (cout ×
/// c) · x (c × n)` (all row-major), one single-threaded gemm, then through `ep`.
///
/// # Safety
/// `y` must hold `cout × n` values with the block inside them, and no other task may touch
/// the block meanwhile; `wt` and `x` must hold the rows and columns the block reads.
#[allow(clippy::type_complexity)]
unsafe fn pointwise_block(
    y: &kernels::Ptr,
    (n, c): (usize, usize),
    (x, wt): (&[f32], &[f32]),
    ((r0, m), (j0, len)): ((usize, usize), (usize, usize)),
    ep: Option<&Epilogue>,
) {
    serial_gemms(|| unsafe {
        kernels::sgemm(
            m,
            len,
            c,
            y.0.add(r0 * n + j0),
            n,
            false,
            wt.as_ptr().add(r0 * c),
            c,
            1,
            x.as_ptr().add(j0),
            n,
            1,
        )
    });
    if let Some(e) = ep {
        for o in r0..r0 + m {
            // SAFETY: row o's part of the block (the caller's promise).
            let row = unsafe { std::slice::from_raw_parts_mut(y.0.add(o * n + j0), len) };
            e.apply(o, row);
        }
    }
}

/// Output channels per task when a `cout × c` by `c × n` pointwise product is split by
/// output channels, one block per thread, rather than by columns: for products below 16
/// MFLOP (every batch-1 pointwise conv of the model; the smallest at batch 16 has 24).
/// There the weights are the larger operand, and a column split had each thread read all of
/// them (half of them from the other core's cache) for a product of 25 columns: a batch-1
/// forward on 2 threads took 2.45 ms, 2.23 with these convs on one thread, 2.22 split by
/// channels (8 of 8 alternated runs; 1.59, 1.71 and 1.60 ms while the two cores were close,
/// with the 576-input convs split too).
///
/// `None` where the split could change a bit: the gemm crate sums up to 512 inputs in one
/// block but splits a longer sum at a point that depends on whether `m` and `n` are at most
/// 64 (`gemm-common`'s `gemm_basic_generic`), and has matrix-vector and small-product
/// kernels of their own; a sum of at most 512 over more than 16 columns keeps the whole
/// product's bits (the test below checks the model's shapes).
fn row_block(cout: usize, c: usize, n: usize) -> Option<usize> {
    let threads = rayon::current_num_threads().max(1);
    let rb = cout.div_ceil(threads).next_multiple_of(16);
    (2 * cout * c * n < 16 << 20 && c <= 512 && n > 16 && rb < cout).then_some(rb)
}

fn pointwise_fwd((b, c, h, w, cout): Geom, x: &[f32], wt: &[f32], y: &mut [f32]) {
    let n = b * h * w;
    if row_block(cout, c, n).is_some() {
        return pointwise_fwd_blocks((b, c, h, w, cout), x, wt, y, None);
    }
    // SAFETY: y is (cout × n), wt (cout × c), x (c × n), all row-major and disjoint.
    time(Kind::Gemm, (2 * cout * c * n) as u64, || unsafe {
        kernels::sgemm(
            cout,
            n,
            c,
            y.as_mut_ptr(),
            n,
            false,
            wt.as_ptr(),
            c,
            1,
            x.as_ptr(),
            n,
            1,
        )
    })
}

fn dense_fwd(
    (b, c, h, w, cout): Geom,
    k: usize,
    stride: usize,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
) {
    let g = ConvGeom::new(b, c, h, w, k, stride);
    let (n, rows, nr) = (g.ho * g.wo * b, c * k * k, g.chunk_rows());
    let per_row = g.wo * b;
    let mut cols = pool::take(rows * nr * per_row);
    // yᵀ = colsᵀ · wᵀ with wᵀ row-major: the faster storage order for this shape
    // (see `sgemm_strided`); same values as y = w · cols.
    let mut w_t = vec![0f32; rows * cout];
    kernels::transpose(wt, cout, rows, &mut w_t);
    let mut oy0 = 0;
    while oy0 < g.ho {
        let oy1 = (oy0 + nr).min(g.ho);
        let nc = (oy1 - oy0) * per_row;
        let cols = &mut cols[..rows * nc];
        time(Kind::Im2col, 0, || kernels::im2col(&g, x, oy0, oy1, cols));
        // SAFETY: yᵀ (nc × cout) is columns oy0·Wo·B.. of the (cout × n) output read
        // column-major; colsᵀ (nc × rows) is cols (rows × nc) read column-major.
        time(Kind::Gemm, (2 * cout * rows * nc) as u64, || unsafe {
            kernels::sgemm_strided(
                nc,
                cout,
                rows,
                y.as_mut_ptr().add(oy0 * per_row),
                1,
                n,
                false,
                cols.as_ptr(),
                1,
                nc,
                w_t.as_ptr(),
                cout,
                1,
            )
        });
        oy0 = oy1;
    }
    pool::give(cols);
}

/// Weight gradient (written to `dw`) and, if `want_dx`, the input gradient of a conv.
fn conv_bwd(
    kind: ConvKind,
    geom: Geom,
    (x, kept): (&[f32], Option<&[f32]>),
    wt: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    want_dx: bool,
) -> Option<Vec<f32>> {
    let (b, c, h, w, _) = geom;
    match kind {
        ConvKind::Pointwise => pointwise_bwd(geom, x, wt, dy, dw, want_dx),
        ConvKind::Dense { k: 3, stride: 1 } if winograd::applies(b) => {
            winograd::backward(&wino(geom), x, wt, dy, dw, want_dx, kept)
        }
        ConvKind::Dense { k, stride } => dense_bwd(geom, (k, stride), x, wt, dy, dw, want_dx),
        ConvKind::Depthwise { k, stride } => {
            let g = ConvGeom::new(b, c, h, w, k, stride);
            kernels::depthwise_bwd_kernel(&g, x, dy, dw);
            want_dx.then(|| {
                let mut dx = pool::take(c * b * h * w);
                kernels::depthwise_bwd_input(&g, dy, wt, &mut dx);
                dx
            })
        }
    }
}

fn pointwise_bwd(
    (b, c, h, w, cout): Geom,
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    want_dx: bool,
) -> Option<Vec<f32>> {
    let n = b * h * w;
    let flops = (2 * cout * c * n) as u64;
    time(Kind::Gemm, flops, || {
        pointwise_weight_grad((cout, c, n), dy, x, dw)
    });
    want_dx.then(|| {
        let mut dx = pool::take(c * n);
        // SAFETY: dx (c × n) = wtᵀ (c × cout) · dy (cout × n), row-major buffers.
        time(Kind::Gemm, flops, || unsafe {
            kernels::sgemm(
                c,
                n,
                cout,
                dx.as_mut_ptr(),
                n,
                false,
                wt.as_ptr(),
                1,
                c,
                dy.as_ptr(),
                n,
                1,
            )
        });
        dx
    })
}

/// Pixels (times images) per part of a split 1×1 weight gradient.
const WGRAD_PART: usize = 4096;

/// `dw (cout × c) = dy (cout × n) · xᵀ` for `x (c × n)`.
///
/// The product is computed in the storage order the gemm crate runs faster for its shape:
/// with the destination's contiguous side the shorter one (row-major when `c < cout`,
/// column-major and transposed otherwise): 16 → 72 channels over 50 K pixels took 2.8 ms
/// column-major and 0.57 ms row-major, 128 → 46 over 12.5 K 0.49 and 0.69 ms, and every 1×1
/// shape of the model follows the rule (`examples/gemm_shapes.rs`).
///
/// Why split: the backbone's early 1×1 convs have tiny weight gradients (16 × 72) summed over
/// 50 K pixel columns; the gemm crate splits a product's rows and columns between threads,
/// never its sum, so one thread did all of it (a 2-thread step spent longer on it than a
/// 1-thread one). A long sum runs as parts of [`WGRAD_PART`] columns, one single-threaded
/// gemm per part side by side, and the parts are added in order: a fixed split, so the
/// values do not depend on the thread count. `ONEHEAD_WINOGRAD=0` keeps the one gemm (the
/// tables' arithmetic).
fn pointwise_weight_grad(
    (cout, c, n): (usize, usize, usize),
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
) {
    let row_major = c < cout;
    // Element (o, i) of `out` at o·rs + i·cs.
    let (rs, cs) = if row_major { (c, 1) } else { (1, cout) };
    // SAFETY: out holds cout × c values at those strides; dy (cout × n) and x (c × n)
    // row-major with row stride n, read from column j0 on, `len` columns (j0 + len ≤ n).
    let part = |j0: usize, len: usize, out: &mut [f32]| unsafe {
        kernels::sgemm_strided(
            cout,
            c,
            len,
            out.as_mut_ptr(),
            rs,
            cs,
            false,
            dy.as_ptr().add(j0),
            n,
            1,
            x.as_ptr().add(j0),
            1,
            n,
        )
    };
    let mut sum = if row_major {
        Vec::new()
    } else {
        vec![0f32; cout * c]
    };
    let out: &mut [f32] = if row_major { dw } else { &mut sum };
    if n < 2 * WGRAD_PART || !winograd::fast_dense_paths() {
        part(0, n, out);
    } else {
        let parts = n.div_ceil(WGRAD_PART);
        let mut partial = vec![0f32; parts * cout * c];
        partial
            .par_chunks_mut(cout * c)
            .enumerate()
            .for_each(|(i, o)| {
                let j0 = i * WGRAD_PART;
                kernels::serial_gemms(|| part(j0, WGRAD_PART.min(n - j0), o))
            });
        add_parts_in_order(&partial, out);
    }
    if !row_major {
        kernels::transpose(&sum, c, cout, dw);
    }
}

/// `out = Σ parts` over the consecutive `out.len()`-long parts of `partial`, first to last
/// (a fixed order: the sum does not depend on which thread computed which part).
fn add_parts_in_order(partial: &[f32], out: &mut [f32]) {
    let mut parts = partial.chunks_exact(out.len());
    if let Some(first) = parts.next() {
        out.copy_from_slice(first);
    }
    for p in parts {
        for (d, v) in out.iter_mut().zip(p) {
            *d += v;
        }
    }
}

fn dense_bwd(
    (b, c, h, w, cout): Geom,
    (k, stride): (usize, usize),
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    want_dx: bool,
) -> Option<Vec<f32>> {
    let g = ConvGeom::new(b, c, h, w, k, stride);
    let (n, rows, nr) = (g.ho * g.wo * b, c * k * k, g.chunk_rows());
    let per_row = g.wo * b;
    if !want_dx && g.ho > nr && winograd::fast_dense_paths() {
        // The stem (the network input needs no gradient): a small weight gradient summed
        // over many chunks, chunks side by side (see `dense_weight_grad_parts`).
        let mut dwt = vec![0f32; cout * rows];
        dense_weight_grad_parts(&g, cout, x, dy, &mut dwt);
        kernels::transpose(&dwt, rows, cout, dw);
        return None;
    }
    let mut cols = pool::take(rows * nr * per_row);
    let mut dcols = if want_dx {
        pool::take(rows * nr * per_row)
    } else {
        Vec::new()
    };
    let mut dx = if want_dx {
        pool::take_zeroed(c * h * w * b)
    } else {
        Vec::new()
    };
    // dw accumulated column-major (the faster order here), transposed at the end.
    let mut dwt = vec![0f32; cout * rows];
    let mut oy0 = 0;
    while oy0 < g.ho {
        let oy1 = (oy0 + nr).min(g.ho);
        let nc = (oy1 - oy0) * per_row;
        let cols = &mut cols[..rows * nc];
        time(Kind::Im2col, 0, || kernels::im2col(&g, x, oy0, oy1, cols));
        let flops = (2 * cout * rows * nc) as u64;
        // SAFETY: dwt (cout × rows, column-major) [+]= dy[:, chunk] (cout × nc) · colsᵀ.
        time(Kind::Gemm, flops, || unsafe {
            kernels::sgemm_strided(
                cout,
                rows,
                nc,
                dwt.as_mut_ptr(),
                1,
                cout,
                oy0 > 0,
                dy.as_ptr().add(oy0 * per_row),
                n,
                1,
                cols.as_ptr(),
                1,
                nc,
            )
        });
        if want_dx {
            let dcols = &mut dcols[..rows * nc];
            // SAFETY: dcols (rows × nc) = wtᵀ (rows × cout) · dy[:, chunk].
            time(Kind::Gemm, flops, || unsafe {
                kernels::sgemm(
                    rows,
                    nc,
                    cout,
                    dcols.as_mut_ptr(),
                    nc,
                    false,
                    wt.as_ptr(),
                    1,
                    rows,
                    dy.as_ptr().add(oy0 * per_row),
                    n,
                    1,
                )
            });
            time(Kind::Im2col, 0, || {
                kernels::col2im(&g, dcols, oy0, oy1, &mut dx)
            });
        }
        oy0 = oy1;
    }
    kernels::transpose(&dwt, rows, cout, dw);
    pool::give(cols);
    if want_dx {
        pool::give(dcols);
        Some(dx)
    } else {
        None
    }
}

/// `dwt (cout × C·k·k, column-major) = dy · colsᵀ` summed over the im2col chunks of `g`: each
/// chunk's im2col and single-threaded gemm into its own part, chunks side by side, parts
/// added in order (a fixed split: the values do not depend on the thread count). Why: the
/// stem's 16 × 27 gradient over 200 K columns was one thread's work (the gemm crate splits
/// rows and columns, never the sum).
fn dense_weight_grad_parts(g: &ConvGeom, cout: usize, x: &[f32], dy: &[f32], dwt: &mut [f32]) {
    let (n, rows, nr) = (g.ho * g.wo * g.b, g.c * g.k * g.k, g.chunk_rows());
    let per_row = g.wo * g.b;
    let chunks = g.ho.div_ceil(nr);
    let mut partial = vec![0f32; chunks * cout * rows];
    // One profile section around the parallel parts (the profile's sections are per thread);
    // the chunks' im2col counts as gemm time here.
    time(Kind::Gemm, (2 * cout * rows * n) as u64, || {
        partial
            .par_chunks_mut(cout * rows)
            .enumerate()
            .for_each(|(i, out)| {
                let (oy0, oy1) = (i * nr, ((i + 1) * nr).min(g.ho));
                let nc = (oy1 - oy0) * per_row;
                let mut cols = pool::take(rows * nc);
                kernels::im2col(g, x, oy0, oy1, &mut cols);
                // SAFETY: out (cout × rows, column-major) = dy[:, chunk] (cout × nc) · colsᵀ.
                kernels::serial_gemms(|| unsafe {
                    kernels::sgemm_strided(
                        cout,
                        rows,
                        nc,
                        out.as_mut_ptr(),
                        1,
                        cout,
                        false,
                        dy.as_ptr().add(oy0 * per_row),
                        n,
                        1,
                        cols.as_ptr(),
                        1,
                        nc,
                    )
                });
                pool::give(cols);
            })
    });
    add_parts_in_order(&partial, dwt);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [−0.5, 0.5).
    fn values(n: usize, mul: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * mul) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    /// The split by output channels gives the whole product's bits (what the rest of the
    /// executor and the recorded fingerprints assume) for every pointwise shape of the model at
    /// batch-1 map sizes, on 2 and 3 threads, and takes the split where it is meant to.
    #[test]
    fn row_blocks_keep_the_whole_products_bits() {
        let shapes = [
            (16, 16),
            (72, 16),
            (24, 72),
            (88, 24),
            (24, 88),
            (96, 24),
            (40, 96),
            (240, 40),
            (40, 240),
            (120, 40),
            (48, 120),
            (144, 48),
            (48, 144),
            (288, 48),
            (96, 288),
            (576, 96),
            (96, 576),
            (128, 576),
            (128, 48),
            (128, 24),
            (46, 128),
        ];
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut split = 0;
            for n in [1, 4, 16, 17, 25, 49, 64, 65, 100, 196, 784, 3136] {
                for &(cout, c) in &shapes {
                    let (x, wt) = (values(c * n, 104729), values(cout * c, 7919));
                    let mut whole = vec![0f32; cout * n];
                    // SAFETY: row-major (cout × c), (c × n), (cout × n) buffers of these sizes.
                    serial_gemms(|| unsafe {
                        kernels::sgemm(
                            cout,
                            n,
                            c,
                            whole.as_mut_ptr(),
                            n,
                            false,
                            wt.as_ptr(),
                            c,
                            1,
                            x.as_ptr(),
                            n,
                            1,
                        )
                    });
                    let mut y = vec![f32::NAN; cout * n];
                    pool.install(|| {
                        split += usize::from(row_block(cout, c, n).is_some());
                        pointwise_fwd((1, c, n, 1, cout), &x, &wt, &mut y)
                    });
                    let same = whole
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{cout}x{c} by {c}x{n} on {threads} threads");
                }
            }
            // Every shape of more than 16 channels with at most 512 inputs splits at 49 columns.
            assert!(split > 100, "{split} products split on {threads} threads");
        }
    }
}
