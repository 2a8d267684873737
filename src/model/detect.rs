//! Detection box parametrisation and decoding (anchor-free, one prediction per stride-8 cell).

/// One decoded detection in input-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x0, y0, x1, y1]` in pixels of the model input.
    pub bbox: [f32; 4],
    /// objectness × class probability.
    pub score: f32,
    pub class: usize,
}
