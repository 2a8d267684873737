//! Training: the engine (stages, strategies as plug-ins), losses, optimisers and schedules.

pub mod det_loss;
pub mod losses;
