//! onehead: sequential multi-task learning (segmentation -> detection -> classification)
//! with one small model (MobileNetV3-Small -> FPN -> one 2-layer head), built on candle.
//!
//! Layout: `tasks` (one file per task behind the `Task` trait: data, target, head slice,
//! loss, evaluator, prediction, export), `train` (the loop, one step, optimisers, resume
//! state, evaluation), `plugins` (anti-forgetting strategies around the loop), `model`
//! (backbone, neck, head, weights), `boxes` (box geometry), `metrics` (pure metric
//! functions), `data` (formats, the synthetic benchmark, `prepare`), `report` (run folders,
//! CSVs, verdict), `predict` (a trained run on any images: JSON + overlays), `ops` (kernels
//! candle lacks), `config` (the TOML experiment schema), `sweep` (grids of runs: local or
//! Slurm).

pub mod bench;
pub mod boxes;
pub mod commands;
pub mod config;
pub mod data;
pub mod files;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plugins;
pub mod predict;
pub mod registry;
pub mod report;
pub mod sweep;
pub mod tasks;
pub mod train;

/// Cache-line-aligned large blocks for the vector kernels (see `ops::aligned_alloc`).
#[global_allocator]
static ALLOCATOR: ops::aligned_alloc::CacheAligned = ops::aligned_alloc::CacheAligned;

pub use config::Experiment;
pub use train::{resume, run, RunOptions, RunOutcome};
