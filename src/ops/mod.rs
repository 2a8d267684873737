//! Kernels candle lacks or gets slow/wrong for this model (see shared/CANDLE_NOTES.md).
