//! Training: the engine (stages, strategies as plug-ins), losses, optimisers and schedules.

pub mod det_loss;
pub mod engine;
pub mod losses;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod strategy;
pub mod tasks;
