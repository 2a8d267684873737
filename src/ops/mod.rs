//! Kernels candle lacks or gets slow/wrong for this model (see shared/CANDLE_NOTES.md).

pub mod channel;
pub mod depthwise;
pub mod im2col;
pub mod loss;
pub mod resize;

pub use depthwise::depthwise_conv2d;
pub use im2col::conv2d_im2col;
pub use loss::pixel_cross_entropy;
pub use resize::{resize_bilinear, subsample2, upsample_nearest2x};
