//! Run outputs: run directories, per-epoch CSV, summary.
