//! The three tasks as a value. Task-specific behaviour (loss, metric, dataset) hangs off
//! [`TaskKind`] so the engine never grows `match` chains over tasks in many files.

use serde::{Deserialize, Serialize};

/// One of the three tasks the unified head learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Semantic segmentation (VOC-style palette masks, 255 = ignore). Metric: mIoU.
    Seg,
    /// Object detection (COCO JSON). Metric: mAP@0.5 and mAP@[0.5:0.95].
    Det,
    /// Classification (one folder per class). Metric: Top-1 (and Top-5).
    Cls,
}

impl TaskKind {
    pub const ALL: [TaskKind; 3] = [TaskKind::Seg, TaskKind::Det, TaskKind::Cls];

    /// Short name used in configs, CSV columns and file names.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Seg => "seg",
            TaskKind::Det => "det",
            TaskKind::Cls => "cls",
        }
    }

    /// Name of the task's headline metric (the one whose drop is judged against `tolerance`).
    pub fn metric_name(self) -> &'static str {
        match self {
            TaskKind::Seg => "miou",
            TaskKind::Det => "map50",
            TaskKind::Cls => "top1",
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seg" => Ok(TaskKind::Seg),
            "det" => Ok(TaskKind::Det),
            "cls" => Ok(TaskKind::Cls),
            other => Err(format!("unknown task '{other}' (expected seg, det or cls)")),
        }
    }
}
