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
