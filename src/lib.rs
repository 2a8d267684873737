//! onehead: sequential multi-task learning (segmentation -> detection -> classification)
//! with one small model (MobileNetV3-Small -> FPN -> one 2-layer head), built on candle.
//!
//! Layout: `data` (datasets on disk, the built-in synthetic benchmark, `prepare`),
//! `model` (backbone, neck, head, detection decoding, weights), `ops` (kernels candle lacks),
//! `train` (engine, strategies, losses, optimisers), `metrics`, `report` (CSV, summaries),
//! `config` (the TOML experiment schema).

pub mod bench;
pub mod config;
pub mod data;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod report;
pub mod sweep;
pub mod task;
pub mod train;

pub use task::TaskKind;
