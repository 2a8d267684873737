//! Continual-learning summaries of a task × stage matrix `a[t][k]` (task t's metric after
//! stage k; `None` before t is learned), as Chaudhry et al. 2018 (forgetting) and
//! Lopez-Paz & Ranzato 2017 (backward transfer) define them, for metrics where higher is
//! better:
//!
//! - `final` = `a[t][T−1]`, the value after the last stage;
//! - `at_learned` = `a[t][ℓ_t]`, after the (last) stage that trained t;
//! - `best` = `max_{ℓ_t ≤ k < T−1} a[t][k]`, the best value before the last stage;
//! - `forgetting` = `best − final` (≥ 0 means lost);
//! - `bwt` = `final − at_learned` (negative means forgotten).
//!
//! A task learned in the last stage has had no chance to be forgotten: its `best`,
//! `forgetting` and `bwt` are `None` and it is left out of the means, which average over
//! the other tasks.

use serde::{Deserialize, Serialize};

/// One task's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskForgetting {
    pub task: String,
    pub final_value: Option<f64>,
    pub at_learned: Option<f64>,
    pub best: Option<f64>,
    pub forgetting: Option<f64>,
    pub bwt: Option<f64>,
}

/// Per task, and averaged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Forgetting {
    pub tasks: Vec<TaskForgetting>,
    /// Mean of `final` over tasks that have one.
    pub mean_final: Option<f64>,
    /// Mean `forgetting` over the tasks learned before the last stage.
    pub mean_forgetting: Option<f64>,
    /// Mean `bwt` over the tasks learned before the last stage.
    pub mean_bwt: Option<f64>,
}

fn mean(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = xs.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The summaries of matrix `a` (`a[t]` has one entry per stage), with `learned[t]` the
/// 0-based stage that (last) trained task t and `names[t]` its name.
pub fn forgetting(names: &[String], a: &[Vec<Option<f64>>], learned: &[usize]) -> Forgetting {
    let tasks: Vec<TaskForgetting> = names
        .iter()
        .zip(a)
        .zip(learned)
        .map(|((name, row), &l)| {
            let last = row.len().checked_sub(1);
            let final_value = last.and_then(|k| row[k]);
            let at_learned = row.get(l).copied().flatten();
            let earlier = last.filter(|&k| l < k);
            let best = earlier.and_then(|k| row[l..k].iter().flatten().copied().reduce(f64::max));
            let forgetting = best.zip(final_value).map(|(b, f)| b - f);
            let bwt = earlier.and(final_value.zip(at_learned)).map(|(f, a)| f - a);
            TaskForgetting {
                task: name.clone(),
                final_value,
                at_learned,
                best,
                forgetting,
                bwt,
            }
        })
        .collect();
    Forgetting {
        mean_final: mean(tasks.iter().map(|t| t.final_value)),
        mean_forgetting: mean(tasks.iter().map(|t| t.forgetting)),
        mean_bwt: mean(tasks.iter().map(|t| t.bwt)),
        tasks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i}")).collect()
    }

    #[test]
    fn hand_computed_three_stages() {
        // t0 learned in stage 0: 0.8, then 0.6, then 0.5.
        // t1 learned in stage 1: 0.7, then 0.75 (improves).
        // t2 learned in stage 2: 0.9.
        let a = vec![
            vec![Some(0.8), Some(0.6), Some(0.5)],
            vec![None, Some(0.7), Some(0.75)],
            vec![None, None, Some(0.9)],
        ];
        let f = forgetting(&names(3), &a, &[0, 1, 2]);
        let t0 = &f.tasks[0];
        assert_eq!(
            (t0.final_value, t0.at_learned, t0.best),
            (Some(0.5), Some(0.8), Some(0.8))
        );
        assert!((t0.forgetting.unwrap() - 0.3).abs() < 1e-12);
        assert!((t0.bwt.unwrap() + 0.3).abs() < 1e-12);
        let t1 = &f.tasks[1];
        // Best before the last stage is stage 1 only (0.7): forgetting −0.05, bwt +0.05.
        assert_eq!(t1.best, Some(0.7));
        assert!((t1.forgetting.unwrap() + 0.05).abs() < 1e-12);
        assert!((t1.bwt.unwrap() - 0.05).abs() < 1e-12);
        let t2 = &f.tasks[2];
        assert_eq!((t2.best, t2.forgetting, t2.bwt), (None, None, None));
        // Means over t0 and t1 only; final over all three.
        assert!((f.mean_forgetting.unwrap() - 0.125).abs() < 1e-12);
        assert!((f.mean_bwt.unwrap() + 0.125).abs() < 1e-12);
        assert!((f.mean_final.unwrap() - (0.5 + 0.75 + 0.9) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn the_best_value_is_searched_before_the_last_stage_only() {
        // A peak in the middle counts; the final value itself is never the "best".
        let a = vec![vec![Some(0.4), Some(0.9), Some(0.3), Some(0.95)]];
        let f = forgetting(&names(1), &a, &[0]);
        assert_eq!(f.tasks[0].best, Some(0.9));
        assert!((f.tasks[0].forgetting.unwrap() + 0.05).abs() < 1e-12);
        // One stage: nothing to forget.
        let f = forgetting(&names(1), &[vec![Some(0.5)]], &[0]);
        assert_eq!((f.mean_forgetting, f.mean_bwt), (None, None));
        assert_eq!(f.mean_final, Some(0.5));
    }

    #[test]
    fn a_task_retrained_later_counts_from_its_last_stage() {
        // t0 trained in stages 0 and 2 (learned = 2): nothing to forget at the end.
        let a = vec![vec![Some(0.5), Some(0.2), Some(0.6)]];
        let f = forgetting(&names(1), &a, &[2]);
        assert_eq!(f.tasks[0].forgetting, None);
        assert_eq!(f.tasks[0].at_learned, Some(0.6));
    }
}
