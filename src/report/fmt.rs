//! Number formats shared by the charts and the HTML report.

/// `0.05` → `5 %`.
pub(crate) fn pct(x: f64) -> String {
    let p = x * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{:.0} %", p)
    } else {
        format!("{:.1} %", p)
    }
}

/// A metric column as people write it: `seg_miou` → `seg mIoU`, `det_map50` →
/// `det mAP@0.5`, `cls_top1` → `cls Top-1`; other columns with spaces for underscores.
pub fn metric_label(column: &str) -> String {
    let (task, metric) = column.split_once('_').unwrap_or(("", column));
    let m = match metric {
        "miou" => "mIoU".to_string(),
        "miou_nanmean" => "mIoU (present classes)".to_string(),
        "pixel_acc" => "pixel accuracy".to_string(),
        "map50" => "mAP@0.5".to_string(),
        "map75" => "mAP@0.75".to_string(),
        "map50_95" => "mAP@[.5:.95]".to_string(),
        "top1" => "Top-1".to_string(),
        "top5" => "Top-5".to_string(),
        "mean_acc" => "mean class accuracy".to_string(),
        other => other.replace('_', " "),
    };
    if task.is_empty() {
        m
    } else {
        format!("{task} {m}")
    }
}

/// `+3.1 %` / `−17 %` (a drop is shown as a negative change).
pub fn fmt_drop(d: Option<f64>) -> String {
    match d {
        Some(d) if d.is_finite() => {
            let p = d * 100.0;
            if p.abs() < 0.05 {
                "±0 %".into()
            } else {
                format!("{}{:.1} %", if p > 0.0 { "−" } else { "+" }, p.abs())
            }
        }
        _ => "—".into(),
    }
}

/// A drop interval `[lo, hi]` shown as the interval of the change: `[−8.2 %, +1.9 %]`.
pub fn fmt_interval(i: Option<[f64; 2]>) -> String {
    match i {
        Some([lo, hi]) => format!("[{}, {}]", fmt_drop(Some(hi)), fmt_drop(Some(lo))),
        None => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_read_as_people_write_them() {
        assert_eq!(metric_label("seg_miou"), "seg mIoU");
        assert_eq!(metric_label("det_map50_95"), "det mAP@[.5:.95]");
        assert_eq!(metric_label("cls_top1"), "cls Top-1");
        assert_eq!(metric_label("seg_iou.cat"), "seg iou.cat");
        assert_eq!(metric_label("grad_norm"), "grad norm");
        assert_eq!(metric_label("loss"), "loss");
    }
}
