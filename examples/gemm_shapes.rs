//! The 1×1 weight gradient of every pointwise conv of the model (batch 16 at 224 px) timed in
//! both destination storage orders, as `ops::fused::nodes::conv::pointwise_weight_grad` runs
//! long sums (parts of 4096 pixels, one single-threaded gemm per part, side by side; here
//! every shape, also those it runs as one gemm): the gemm
//! crate's speed depends on the order, and the faster one is the one whose contiguous side
//! is the shorter.
//!
//! `cargo run --release --example gemm_shapes` prints per shape the median ms and GFLOP/s of
//! each order.

use std::time::Instant;

use rayon::prelude::*;

/// (input channels, output channels, pixels × images).
const SHAPES: &[(usize, usize, usize)] = &[
    (16, 16, 50176),
    (16, 72, 50176),
    (72, 24, 12544),
    (24, 88, 12544),
    (88, 24, 12544),
    (24, 96, 12544),
    (96, 40, 3136),
    (40, 240, 3136),
    (240, 40, 3136),
    (40, 120, 3136),
    (120, 48, 3136),
    (48, 144, 3136),
    (144, 48, 3136),
    (48, 288, 3136),
    (288, 96, 784),
    (96, 576, 784),
    (576, 96, 784),
    (576, 128, 784),
    (24, 128, 12544),
    (48, 128, 3136),
    (128, 128, 12544),
    (128, 46, 12544),
];

const PART: usize = 4096;

fn median_s(mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[15]
}

/// `partial[i] = dy[:, part i] · x[:, part i]ᵀ`, each `cout × c` at element strides `(rs, cs)`.
fn parts(
    (c, cout, n): (usize, usize, usize),
    dy: &[f32],
    x: &[f32],
    (rs, cs): (usize, usize),
    partial: &mut [f32],
) {
    partial
        .par_chunks_mut(cout * c)
        .enumerate()
        .for_each(|(i, out)| {
            let j0 = i * PART;
            let len = PART.min(n - j0);
            // SAFETY: out holds cout × c values at (rs, cs); dy (cout × n) and x (c × n) are
            // row-major, read from column j0 on, len columns.
            unsafe {
                gemm::gemm(
                    cout,
                    c,
                    len,
                    out.as_mut_ptr(),
                    cs as isize,
                    rs as isize,
                    false,
                    dy.as_ptr().add(j0),
                    1,
                    n as isize,
                    x.as_ptr().add(j0),
                    n as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
}

fn main() {
    println!("c -> cout, pixels: column-major ms (GFLOP/s) | row-major ms (GFLOP/s)");
    for &(c, cout, n) in SHAPES {
        let x = vec![0.5f32; c * n];
        let dy = vec![0.25f32; cout * n];
        let mut partial = vec![0f32; n.div_ceil(PART) * cout * c];
        let flops = 2.0 * (c * cout * n) as f64;
        let col = median_s(|| parts((c, cout, n), &dy, &x, (1, cout), &mut partial));
        let row = median_s(|| parts((c, cout, n), &dy, &x, (c, 1), &mut partial));
        println!(
            "{c:>3} -> {cout:>3}, {n:>5}: {:.3} ({:.0}) | {:.3} ({:.0})",
            col * 1e3,
            flops / col / 1e9,
            row * 1e3,
            flops / row / 1e9
        );
    }
}
