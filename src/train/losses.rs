//! Task losses.
