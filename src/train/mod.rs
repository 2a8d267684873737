//! Training: the engine (stages, strategies as plug-ins), losses, optimisers and schedules.

pub mod losses;
pub mod optim;
pub mod schedule;
