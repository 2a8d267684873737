//! Learning-rate schedules, evaluated per optimisation step.

use crate::config::{ScheduleKind, StageConfig};

/// The learning rate of one stage as a function of the step within that stage.
#[derive(Debug, Clone)]
pub struct LrSchedule {
    base_lr: f64,
    min_lr: f64,
    kind: ScheduleKind,
    warmup_steps: usize,
    total_steps: usize,
}

impl LrSchedule {
    pub fn for_stage(stage: &StageConfig, steps_per_epoch: usize) -> Self {
        let total_steps = (stage.epochs * steps_per_epoch).max(1);
        Self {
            base_lr: stage.lr,
            min_lr: stage.lr * stage.min_lr_ratio,
            kind: stage.schedule,
            warmup_steps: (stage.warmup_epochs * steps_per_epoch as f64).round() as usize,
            total_steps,
        }
    }

    /// Learning rate for 0-based `step`: linear warm-up over `warmup_steps` (reaching the base
    /// rate at the end of warm-up), then constant or half-cosine to `min_lr` at the last step.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.min_lr
                    + 0.5
                        * (self.base_lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Freeze, OptimizerKind};

    fn stage(kind: ScheduleKind, warmup: f64) -> StageConfig {
        StageConfig {
            task: "seg".into(),
            epochs: 10,
            batch_size: 1,
            optimizer: OptimizerKind::Adamw,
            lr: 1.0,
            weight_decay: 0.0,
            momentum: 0.9,
            schedule: kind,
            warmup_epochs: warmup,
            min_lr_ratio: 0.1,
            freeze: Freeze::None,
            grad_clip_norm: 0.0,
            train_limit: 0,
            lr_scale: Default::default(),
        }
    }

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule::for_stage(&stage(ScheduleKind::Cosine, 1.0), 10);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        // Halfway through the 90 cosine steps: (1 + 0.1) / 2.
        assert!((s.lr(55) - 0.55).abs() < 1e-12);
        assert!(s.lr(99) > 0.1 && s.lr(99) < 0.11);
    }

    #[test]
    fn constant_stays() {
        let s = LrSchedule::for_stage(&stage(ScheduleKind::Constant, 0.0), 10);
        assert_eq!(s.lr(0), 1.0);
        assert_eq!(s.lr(99), 1.0);
    }
}
