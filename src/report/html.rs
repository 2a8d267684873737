//! Self-contained `report.html` pages: one per run, one per comparison. Images are embedded
//! as base64 PNG data URIs and the style sheet is inline, so a report can be mailed or moved
//! on its own; there is no script and no external reference.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use base64::Engine as _;

use super::fmt::{fmt_drop, fmt_interval, pct};
use super::run_files::RunData;

const CSS: &str = r#"
:root { --ink:#1f2328; --muted:#5b636e; --line:#e3e6ea; --bg:#f6f7f9; --ok:#1a7f37; --ok-bg:#dafbe1;
  --bad:#b42318; --bad-bg:#fde7e4; --warn:#8a5a00; --warn-bg:#fff4d6; --info:#1f4e8c; --info-bg:#e3edfb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 24px 48px; }
header { display:flex; align-items:flex-start; justify-content:space-between; gap:16px; margin-bottom:18px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing:-0.01em; }
h2 { font-size: 18px; margin: 0 0 12px; }
.sub { color: var(--muted); margin: 0; font-size: 13.5px; overflow-wrap: anywhere; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 20px; margin: 0 0 18px; }
.facts { display:grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap:10px; padding:14px; }
.fact { padding:8px 10px; border-radius:8px; background:var(--bg); }
.fact .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.fact .v { font-size:17px; font-weight:600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width:100%; font-variant-numeric: tabular-nums; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
th { font-size:12.5px; color:var(--muted); font-weight:600; letter-spacing:.02em; }
td.num, th.num { text-align:right; }
td.cell { line-height:1.35; white-space:normal; min-width:12em; }
td.name { white-space:normal; overflow-wrap:anywhere; min-width:8em; max-width:18em; }
th { white-space:normal; }
td .sub { font-size:12.5px; }
tr:last-child td { border-bottom:none; }
.scroll { overflow-x:auto; }
.badge { display:inline-block; padding:2px 10px; border-radius:999px; font-size:13px; font-weight:600; }
.badge.big { font-size:16px; padding:6px 16px; }
.ok, .within { color:var(--ok); background:var(--ok-bg); }
.forgot, .fail { color:var(--bad); background:var(--bad-bg); }
.not_learned, .undecided { color:var(--warn); background:var(--warn-bg); }
.unfinished, .running, .unknown { color:var(--info); background:var(--info-bg); }
figure { margin:0; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
pre { background:#f3f4f6; border:1px solid var(--line); border-radius:8px; padding:12px 14px; overflow:auto;
  font: 13px/1.45 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; margin:0; }
.warn { background:var(--warn-bg); color:var(--warn); border-color:#f0d48a; }
.warn ul { margin:0; padding-left:18px; }
footer { color:var(--muted); font-size:12.5px; text-align:center; margin-top:24px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
"#;

pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The whole page around `body`; `svg_note` (HTML) says where the charts' SVG files are.
pub(crate) fn page(title: &str, body: &str, svg_note: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n\
         <footer>Written by onehead {} · images are embedded; {svg_note}</footer>\n\
         </main>\n</body>\n</html>\n",
        esc(title),
        env!("CARGO_PKG_VERSION"),
    )
}

/// `<figure>` with a PNG as a data URI.
pub(crate) fn figure(png: &[u8], alt: &str, caption: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let mut s = format!(
        "<figure><img alt=\"{}\" src=\"data:image/png;base64,{b64}\">",
        esc(alt)
    );
    if !caption.is_empty() {
        let _ = write!(s, "<figcaption>{caption}</figcaption>");
    }
    s.push_str("</figure>");
    s
}

pub(crate) fn verdict_badge(v: &str) -> String {
    let class = match v {
        "within" | "forgot" | "undecided" | "not_learned" | "unfinished" => v,
        // Summaries written before the three-way verdict.
        "ok" => "within",
        _ => "unknown",
    };
    format!(
        "<span class=\"badge {class}\">{}</span>",
        esc(&class.replace('_', " "))
    )
}

pub(crate) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "—".into())
}

pub(crate) fn fmt_seconds(s: Option<f64>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

pub(crate) fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202F}');
        }
        out.push(c);
    }
    out
}

fn fact(k: &str, v: &str) -> String {
    format!(
        "<div class=\"fact\"><div class=\"k\">{}</div><div class=\"v\">{}</div></div>",
        esc(k),
        v
    )
}

/// The verdict table of one run (rows: tasks).
fn verdict_table(run: &RunData) -> String {
    let mut s = String::from(
        "<div class=\"scroll\"><table><thead><tr><th>task</th><th>metric</th><th class=\"num\">learned in</th>\
         <th class=\"num\">baseline</th><th class=\"num\">final</th><th class=\"num\">change</th>\
         <th class=\"num\">interval</th><th class=\"num\">threshold</th><th>verdict</th></tr></thead><tbody>",
    );
    for t in &run.tasks {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&t.task),
            esc(&super::fmt::metric_label(&t.column)),
            t.stage.map(|s| format!("stage {s}")).unwrap_or_default(),
            fmt_opt(t.baseline, 4),
            fmt_opt(t.final_value, 4),
            fmt_drop(t.drop_rel),
            fmt_interval(t.drop_interval),
            fmt_opt(t.threshold, 4),
            verdict_badge(&t.verdict)
        );
    }
    s.push_str("</tbody></table></div>");
    s
}

fn run_status(run: &RunData) -> (&'static str, &'static str) {
    match run.pass() {
        Some(true) => ("ok", "PASS"),
        Some(false) => ("fail", "FAIL"),
        None if run.finished() => ("unknown", "FINISHED"),
        None => ("running", "UNFINISHED"),
    }
}

fn str_field<'a>(j: Option<&'a serde_json::Value>, k: &str) -> Option<&'a str> {
    j?.get(k)?.as_str()
}

/// A text field of the summary, when it has a value.
fn summary_text(
    s: Option<&super::RunSummary>,
    field: fn(&super::RunSummary) -> &String,
) -> Option<&str> {
    s.map(|s| field(s).as_str()).filter(|v| !v.is_empty())
}

/// Write `<run>/report.html`; `pngs` are the charts by stem (`loss`, `metrics`, `matrix`).
pub(crate) fn write_run_report(run: &RunData, pngs: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    let path = run.dir.join("report.html");
    super::write_atomic(&path, run_report(run, pngs).as_bytes())?;
    Ok(path)
}

pub(crate) fn run_report(run: &RunData, pngs: &[(String, Vec<u8>)]) -> String {
    let mut b = String::new();
    run_header(&mut b, run);
    run_facts(&mut b, run);
    run_verdict_and_charts(&mut b, run, pngs);
    run_params(&mut b, run);
    if let Some(cfg) = &run.config_text {
        let _ = write!(
            b,
            "<section><h2>Configuration</h2><pre>{}</pre></section>",
            esc(cfg.trim_end())
        );
    }
    page(
        &format!("onehead · {}", run.name),
        &b,
        "SVG versions are in <code>plots/</code>",
    )
}

/// Title, folder, time, version and the run's badge; then any warnings about its files.
fn run_header(b: &mut String, run: &RunData) {
    let (class, label) = run_status(run);
    let summary = run.summary.as_ref();
    let meta = run.meta.as_ref();
    let mut sub = vec![esc(&run.dir.display().to_string())];
    if let Some(t) = summary_text(summary, |s| &s.finished_at) {
        sub.push(format!("finished {}", esc(t)));
    } else if let Some(t) =
        summary_text(summary, |s| &s.started_at).or(str_field(meta, "started_at"))
    {
        sub.push(format!("started {}", esc(t)));
    }
    if let Some(v) = summary_text(summary, |s| &s.version).or(str_field(meta, "version")) {
        let commit = summary_text(summary, |s| &s.git_commit)
            .or(str_field(meta, "git_commit"))
            .map(|c| format!(" ({})", esc(&c.chars().take(12).collect::<String>())))
            .unwrap_or_default();
        sub.push(format!("onehead {}{commit}", esc(v)));
    }
    let _ = write!(
        *b,
        "<header><div><h1>{}</h1><p class=\"sub\">{}</p></div><span class=\"badge big {class}\">{label}</span></header>",
        esc(&run.name),
        sub.join(" · ")
    );
    if !run.warnings.is_empty() {
        b.push_str("<section class=\"warn\"><ul>");
        for w in &run.warnings {
            let _ = write!(*b, "<li>{}</li>", esc(w));
        }
        b.push_str("</ul></section>");
    }
}

/// The key facts: tasks within tolerance, tolerance, time, parameters, latency, epochs…
fn run_facts(b: &mut String, run: &RunData) {
    let summary = run.summary.as_ref();
    let meta = run.meta.as_ref();
    b.push_str("<section class=\"facts\">");
    let ok = run
        .tasks
        .iter()
        .filter(|t| matches!(t.verdict.as_str(), "within" | "ok"))
        .count();
    b.push_str(&fact(
        "tasks within tolerance",
        &if run.finished() {
            format!("{ok} / {}", run.tasks.len())
        } else {
            "—".into()
        },
    ));
    b.push_str(&fact(
        "tolerance",
        &esc(&if run.tolerance_kind == "absolute" {
            format!("−{} (absolute)", run.tolerance)
        } else {
            format!("−{} (relative)", pct(run.tolerance))
        }),
    ));
    if let Some(s) = summary.filter(|s| !s.tasks.is_empty()) {
        let intervals = if s.resamples > 0 {
            format!(", {:.0} % intervals", s.confidence * 100.0)
        } else {
            String::new()
        };
        b.push_str(&fact(
            "judged against",
            &esc(&format!(
                "{} baseline, on {}{intervals}",
                s.baseline_kind.label().replace('_', "-"),
                s.verdict_split
            )),
        ));
    }
    b.push_str(&fact("training time", &fmt_seconds(run.train_seconds())));
    b.push_str(&fact(
        "parameters",
        &run.params_total()
            .map(fmt_count)
            .unwrap_or_else(|| "—".into()),
    ));
    b.push_str(&fact(
        "latency",
        &run.latency_ms()
            .map(|l| format!("{l:.2} ms/image"))
            .unwrap_or_else(|| "—".into()),
    ));
    b.push_str(&fact(
        "epochs",
        &format!(
            "{} in {} stages",
            run.epochs.last_epoch(),
            run.epochs.stages().len()
        ),
    ));
    let device = summary_text(summary, |s| &s.device).or(str_field(meta, "device"));
    if let Some(d) = device {
        b.push_str(&fact("device", &esc(&device_label(d))));
    }
    if let Some(seed) = summary
        .map(|s| s.seed.to_string())
        .or_else(|| run.config.as_ref()?.get("seed").map(|v| v.to_string()))
    {
        b.push_str(&fact("seed", &esc(&seed)));
    }
    b.push_str("</section>");
}

/// The verdict table and the charts with their captions.
fn run_verdict_and_charts(b: &mut String, run: &RunData, pngs: &[(String, Vec<u8>)]) {
    let _ = write!(
        *b,
        "<section><h2>Verdict</h2>{}{}</section>",
        verdict_table(run),
        if run.finished() {
            String::new()
        } else {
            "<p class=\"sub\">The run has no <code>summary.json</code> yet (still training, or stopped): \
             baselines are the metric at the end of each task's own stage as far as trained, the \
             final value is the latest one.</p>"
                .into()
        }
    );

    let captions = [
        ("loss", "Training loss", "Mean loss per epoch over the whole run, one colour per stage; dashed lines mark the stage boundaries. Each strategy's extra term (weighted as added to the total) is drawn apart."),
        ("metrics", "Validation metrics", "Each task's verdict metric from the stage that learned it on, with its baseline and the tolerance line under which the task counts as forgotten."),
        ("matrix", "Task × stage", "Each task's verdict metric at the end of every stage."),
    ];
    for (stem, h, cap) in captions {
        if let Some((_, png)) = pngs.iter().find(|(s, _)| s == stem) {
            let _ = write!(
                *b,
                "<section><h2>{h}</h2>{}</section>",
                figure(png, &format!("{} — {h}", run.name), cap)
            );
        }
    }
}

/// A device as people write it: candle's `Cpu` → `CPU`, `Cuda(0)` / `Cuda { gpu_id: 0 }` →
/// `CUDA 0`, `Metal…` → `Metal …`.
pub(crate) fn device_label(d: &str) -> String {
    let lower = d.to_ascii_lowercase();
    let Some(kind) = [("cpu", "CPU"), ("cuda", "CUDA"), ("metal", "Metal")]
        .into_iter()
        .find_map(|(k, label)| lower.starts_with(k).then_some(label))
    else {
        return d.to_string();
    };
    let digits: String = d.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || kind == "CPU" {
        kind.into()
    } else {
        format!("{kind} {digits}")
    }
}

/// Parameters, in detail when the summary breaks them down.
fn run_params(b: &mut String, run: &RunData) {
    let summary = run.summary.as_ref();
    if let Some(p) = summary.map(|s| &s.params).filter(|p| p.total > 0) {
        b.push_str("<section><h2>Parameters</h2><div class=\"scroll\"><table><tbody>");
        // `total` first, then the parts.
        let rows = [
            ("Total", p.total),
            ("Backbone (MobileNetV3-Small)", p.backbone),
            ("Neck (FPN)", p.neck),
            ("Head (shared two-layer head)", p.head),
            ("Used in a forward pass", p.used_in_forward),
        ];
        for (k, n) in rows.into_iter().filter(|(_, n)| *n > 0) {
            let _ = write!(
                *b,
                "<tr><td>{}</td><td class=\"num\">{}</td></tr>",
                esc(k),
                fmt_count(n as u64)
            );
        }
        b.push_str("</tbody></table></div></section>");
    }
}

/// `report.html` of a comparison.
pub(crate) fn write_compare_report(
    dir: &Path,
    title: &str,
    summary_table_html: &str,
    runs_html: &str,
    figures: &[(String, Vec<u8>)],
) -> Result<PathBuf> {
    let mut b = String::new();
    let _ = write!(
        b,
        "<header><div><h1>{}</h1><p class=\"sub\">{}</p></div></header>",
        esc(title),
        esc(&dir.display().to_string())
    );
    let _ = write!(b, "<section><h2>Summary</h2>{summary_table_html}</section>");
    for (label, png) in figures {
        let _ = write!(
            b,
            "<section><h2>{}</h2>{}</section>",
            esc(label),
            figure(png, label, "")
        );
    }
    let _ = write!(b, "<section><h2>Runs</h2>{runs_html}</section>");
    let path = dir.join("report.html");
    super::write_atomic(
        &path,
        page(title, &b, "SVG versions are next to this file").as_bytes(),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_as_people_write_them() {
        assert_eq!(device_label("Cpu"), "CPU");
        assert_eq!(device_label("Cuda(1)"), "CUDA 1");
        assert_eq!(device_label("Cuda { gpu_id: 0 }"), "CUDA 0");
        assert_eq!(device_label("cuda"), "CUDA");
        assert_eq!(device_label("Metal(2)"), "Metal 2");
        assert_eq!(device_label("tpu"), "tpu");
    }
}
