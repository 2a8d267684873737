//! `onehead compare`: several runs (or whole sweeps) side by side — the summary block of
//! every run as a table, Markdown or CSV, and with `--out DIR` overlay charts per task
//! metric and a `report.html`. Runs whose configs differ only in `seed` (and `name`,
//! `results_dir`) form a group, drawn as the mean line ± one standard deviation.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use super::html::{self, esc};
use super::plot::{self, OverlayChart, OverlaySeries};
use super::run_files::{RunData, Stage};

/// How `compare` prints its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompareFormat {
    /// Fixed-width columns for a terminal.
    #[default]
    Table,
    Markdown,
    Csv,
}

impl FromStr for CompareFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "table" => Ok(Self::Table),
            "markdown" | "md" => Ok(Self::Markdown),
            "csv" => Ok(Self::Csv),
            o => Err(format!("unknown format '{o}' (table, markdown or csv)")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    /// Run folders and/or sweep folders.
    pub inputs: Vec<PathBuf>,
    /// Write overlay charts, `summary.csv` and `report.html` here.
    pub out: Option<PathBuf>,
    pub format: CompareFormat,
}

/// What `compare` did: the summary text to print, and the files written under `--out`.
#[derive(Debug, Clone)]
pub struct CompareOutput {
    pub text: String,
    pub files: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// Runs that differ only in their seed.
struct Group {
    label: String,
    members: Vec<usize>,
}

/// Compare runs: see [`CompareOptions`].
pub fn compare(opts: &CompareOptions) -> Result<CompareOutput> {
    if opts.inputs.is_empty() {
        bail!("compare needs at least one run folder or sweep folder");
    }
    let mut dirs = Vec::new();
    for input in &opts.inputs {
        for d in find_runs(input)? {
            let key = d.canonicalize().unwrap_or_else(|_| d.clone());
            if !dirs.iter().any(|(k, _): &(PathBuf, PathBuf)| *k == key) {
                dirs.push((key, d));
            }
        }
    }
    let mut runs = Vec::new();
    let mut warnings = Vec::new();
    for (_, d) in &dirs {
        let r = RunData::load(d)?;
        warnings.extend(r.warnings.iter().cloned());
        runs.push(r);
    }
    let labels = run_labels(&runs);
    let groups = group_runs(&runs, &labels);
    let text = match opts.format {
        CompareFormat::Table => summary_table(&runs, &labels, &groups),
        CompareFormat::Markdown => summary_markdown(&runs, &labels),
        CompareFormat::Csv => summary_csv(&runs, &labels, &groups)?,
    };
    let mut files = Vec::new();
    if let Some(out) = &opts.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let csv_path = out.join("summary.csv");
        super::write_atomic(&csv_path, summary_csv(&runs, &labels, &groups)?.as_bytes())?;
        files.push(csv_path);
        let mut figures = Vec::new();
        for (column, chart) in overlay_charts(&runs, &groups) {
            files.extend(plot::save_chart(&chart, out, &column)?);
            let png = std::fs::read(out.join(format!("{column}.png")))
                .with_context(|| format!("reading {}/{column}.png", out.display()))?;
            figures.push((super::fmt::metric_label(&column) + " (validation)", png));
        }
        let title = format!("onehead · comparison of {} runs", runs.len());
        let tables = summary_html(&runs, &labels)
            + &format!("<p class=\"sub\">{}</p>", baselines_note(&runs))
            + &groups_html(&runs, &groups);
        files.push(html::write_compare_report(
            out,
            &title,
            &tables,
            &runs_html(&runs, &labels, &groups),
            &figures,
        )?);
    }
    Ok(CompareOutput {
        text,
        files,
        warnings,
    })
}

/// The run folders of an input: itself if it holds `epochs.csv`; else the runs of its
/// `index.csv` (`run_dir` column) and every folder below it that holds `epochs.csv`.
pub(crate) fn find_runs(input: &Path) -> Result<Vec<PathBuf>> {
    if !input.exists() {
        bail!("{} does not exist", input.display());
    }
    if input.join("epochs.csv").is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !input.is_dir() {
        bail!(
            "{} is neither a run folder nor a sweep folder",
            input.display()
        );
    }
    let mut out = Vec::new();
    let index = input.join("index.csv");
    if index.is_file() {
        let mut r = csv::ReaderBuilder::new()
            .flexible(true)
            .from_path(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let header = r
            .headers()
            .with_context(|| format!("{}: cannot read the header", index.display()))?
            .clone();
        // `onehead sweep` writes `run_dir`; `run` is accepted for hand-made indexes.
        let c = header
            .iter()
            .position(|h| h.trim() == "run_dir")
            .or_else(|| header.iter().position(|h| h.trim() == "run"))
            .with_context(|| format!("{}: no column `run_dir` (or `run`)", index.display()))?;
        for rec in r.records() {
            let rec = rec.with_context(|| format!("{}: malformed CSV", index.display()))?;
            let Some(p) = rec.get(c).map(str::trim).filter(|p| !p.is_empty()) else {
                continue; // a failed run of the sweep
            };
            if let Some(d) = resolve_index_path(input, Path::new(p)) {
                out.push(d);
            }
        }
    }
    walk_runs(input, 0, &mut out);
    if out.is_empty() {
        bail!(
            "{} is neither a run folder (no epochs.csv) nor a sweep folder (no index.csv, no run folders below it)",
            input.display()
        );
    }
    Ok(out)
}

/// `index.csv` paths are as the sweep saw them (relative to its working directory): try
/// them as they are, then below the sweep folder.
fn resolve_index_path(sweep: &Path, p: &Path) -> Option<PathBuf> {
    if p.join("epochs.csv").is_file() {
        return Some(p.to_path_buf());
    }
    let comps: Vec<_> = p.components().collect();
    (0..comps.len())
        .map(|k| sweep.join(comps[k..].iter().collect::<PathBuf>()))
        .find(|c| c.join("epochs.csv").is_file())
}

fn walk_runs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 4 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subs.sort();
    for s in subs {
        if s.join("epochs.csv").is_file() {
            out.push(s);
        } else {
            walk_runs(&s, depth + 1, out);
        }
    }
}

/// Run names, with the run folder's id added where names repeat.
fn run_labels(runs: &[RunData]) -> Vec<String> {
    runs.iter()
        .map(|r| {
            if runs.iter().filter(|o| o.name == r.name).count() > 1 {
                format!("{} [{}]", r.name, r.run_id())
            } else {
                r.name.clone()
            }
        })
        .collect()
}

/// The config without the keys that do not change what is trained.
fn config_key(r: &RunData) -> Option<toml::Value> {
    let mut c = r.config.clone()?;
    if let Some(t) = c.as_table_mut() {
        for k in ["seed", "name", "results_dir"] {
            t.remove(k);
        }
    }
    Some(c)
}

/// A group's label: the members' common name, else the first name without its seed part.
fn group_label(runs: &[RunData], members: &[usize]) -> String {
    let first = &runs[members[0]].name;
    let base = if members.iter().all(|&m| &runs[m].name == first) {
        first.clone()
    } else {
        let strip = |n: &str| -> String {
            n.split("__")
                .filter(|p| {
                    let p = p
                        .trim_start_matches("seed")
                        .trim_start_matches(['-', '_', '=']);
                    !(n.contains("seed") && !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
                })
                .collect::<Vec<_>>()
                .join("__")
        };
        let s = strip(first);
        if members.iter().all(|&m| strip(&runs[m].name) == s) {
            s
        } else {
            format!("{first} …")
        }
    };
    if members.len() > 1 {
        format!("{base} (mean ± sd of {} seeds)", members.len())
    } else {
        base
    }
}

fn group_runs(runs: &[RunData], labels: &[String]) -> Vec<Group> {
    let mut keys: Vec<(Option<toml::Value>, Vec<usize>)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let k = config_key(r);
        match keys.iter_mut().find(|(kk, _)| kk.is_some() && *kk == k) {
            Some((_, m)) => m.push(i),
            None => keys.push((k, vec![i])),
        }
    }
    keys.into_iter()
        .map(|(_, members)| Group {
            label: if members.len() == 1 {
                labels[members[0]].clone()
            } else {
                group_label(runs, &members)
            },
            members,
        })
        .collect()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// One overlay chart per verdict-metric column, in the order tasks are learned.
fn overlay_charts(runs: &[RunData], groups: &[Group]) -> Vec<(String, OverlayChart)> {
    let mut columns: Vec<String> = Vec::new();
    for r in runs {
        for t in &r.tasks {
            if !columns.contains(&t.column) && r.epochs.column(&t.column).is_some() {
                columns.push(t.column.clone());
            }
        }
    }
    let stage_layout = |r: &RunData| -> Vec<(String, usize, usize)> {
        r.epochs
            .stages()
            .into_iter()
            .map(|s| (s.task, s.first_epoch, s.last_epoch))
            .collect()
    };
    // Stage bands only when every run has the same stages.
    let stages: Vec<Stage> = match runs.first() {
        Some(r0) if runs.iter().all(|r| stage_layout(r) == stage_layout(r0)) => r0.epochs.stages(),
        _ => Vec::new(),
    };
    let last_epoch = runs
        .iter()
        .map(|r| r.epochs.last_epoch())
        .max()
        .unwrap_or(1);
    let mut out = Vec::new();
    for col in columns {
        let mut series = Vec::new();
        for g in groups {
            // Per run: (epoch, value) from the stage that learned the task on.
            let per_run: Vec<Vec<(usize, f64)>> = g
                .members
                .iter()
                .filter_map(|&m| {
                    let r = &runs[m];
                    let c = r.epochs.column(&col)?;
                    let task = r.tasks.iter().find(|t| t.column == col)?;
                    let start = r
                        .epochs
                        .stages()
                        .iter()
                        .find(|s| s.task == task.task)
                        .map(|s| s.first_epoch)
                        .unwrap_or(1);
                    Some(
                        r.epochs
                            .series(c)
                            .into_iter()
                            .map(|(e, v)| (e as usize, v))
                            .filter(|(e, _)| *e >= start)
                            .collect(),
                    )
                })
                .collect();
            if per_run.iter().all(|p| p.is_empty()) {
                continue;
            }
            let mut epochs: Vec<usize> = per_run.iter().flatten().map(|p| p.0).collect();
            epochs.sort_unstable();
            epochs.dedup();
            let points = epochs
                .into_iter()
                .map(|e| {
                    let vals: Vec<f64> = per_run
                        .iter()
                        .filter_map(|p| p.iter().find(|x| x.0 == e).map(|x| x.1))
                        .collect();
                    let (m, s) = mean_std(&vals);
                    (e as f64, m, s)
                })
                .collect();
            series.push(OverlaySeries {
                label: g.label.clone(),
                points,
                band: g.members.len() > 1,
            });
        }
        if series.is_empty() {
            continue;
        }
        // Chance is the same for every run of one benchmark and split; runs that disagree
        // (other data) get no line rather than a wrong one.
        let chances: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.tasks.iter().find(|t| t.column == col)?.chance)
            .collect();
        let chance = chances
            .first()
            .copied()
            .filter(|c| chances.iter().all(|x| (x - c).abs() < 1e-9));
        let label = super::fmt::metric_label(&col);
        let chart = OverlayChart {
            title: format!("{label} (val) across {} runs", runs.len()),
            y_desc: label,
            stages: stages.clone(),
            last_epoch,
            series,
            chance,
        };
        out.push((col, chart));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Summary block.

struct Row {
    run: String,
    task: String,
    metric: String,
    baseline: String,
    final_value: String,
    change: String,
    interval: String,
    verdict: String,
    pass: String,
    time: String,
}

fn rows_of(r: &RunData, label: &str) -> Vec<Row> {
    let pass = match r.pass() {
        Some(true) => "PASS".to_string(),
        Some(false) => "FAIL".to_string(),
        None if r.finished() => "?".to_string(),
        None => "unfinished".to_string(),
    };
    let time = html::fmt_seconds(r.train_seconds());
    let mut rows: Vec<Row> = r
        .tasks
        .iter()
        .map(|t| Row {
            run: label.to_string(),
            task: t.task.clone(),
            metric: t.column.clone(),
            baseline: html::fmt_opt(t.baseline, 4),
            final_value: html::fmt_opt(t.final_value, 4),
            change: super::fmt::fmt_drop(t.drop_rel),
            interval: super::fmt::fmt_interval(t.drop_interval),
            verdict: verdict_words(&t.verdict),
            pass: pass.clone(),
            time: time.clone(),
        })
        .collect();
    if rows.is_empty() {
        rows.push(Row {
            run: label.to_string(),
            task: "—".into(),
            metric: String::new(),
            baseline: String::new(),
            final_value: String::new(),
            change: String::new(),
            interval: String::new(),
            verdict: String::new(),
            pass,
            time,
        });
    }
    rows
}

/// A verdict as the console and the README write it (`not learned`, `within`; a summary
/// written before the three-way verdict says `ok`).
fn verdict_words(key: &str) -> String {
    match key {
        "ok" => "within".into(),
        k => k.replace('_', " "),
    }
}

const HEADERS: [&str; 10] = [
    "run",
    "task",
    "metric",
    "baseline",
    "final",
    "change",
    "interval",
    "verdict",
    "pass",
    "train time",
];

fn cells(r: &Row, first: bool) -> [String; 10] {
    let (run, pass, time) = if first {
        (r.run.clone(), r.pass.clone(), r.time.clone())
    } else {
        (String::new(), String::new(), String::new())
    };
    [
        run,
        r.task.clone(),
        r.metric.clone(),
        r.baseline.clone(),
        r.final_value.clone(),
        r.change.clone(),
        r.interval.clone(),
        r.verdict.clone(),
        pass,
        time,
    ]
}

fn summary_table(runs: &[RunData], labels: &[String], groups: &[Group]) -> String {
    let mut lines: Vec<[String; 10]> = Vec::new();
    for (r, l) in runs.iter().zip(labels) {
        for (k, row) in rows_of(r, l).iter().enumerate() {
            lines.push(cells(row, k == 0));
        }
    }
    let right = [
        false, false, false, true, true, true, true, false, false, true,
    ];
    let mut width: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for l in &lines {
        for (w, c) in width.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt_line = |cols: &[String]| -> String {
        let mut s = String::new();
        for (i, c) in cols.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cols.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.trim_end().to_string()
    };
    let mut out = String::new();
    let header: Vec<String> = HEADERS.iter().map(|h| h.to_string()).collect();
    let _ = writeln!(out, "{}", fmt_line(&header));
    let _ = writeln!(
        out,
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for (i, l) in lines.iter().enumerate() {
        if i > 0 && !l[0].is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "{}", fmt_line(l));
    }
    // Seed groups: mean ± sd.
    let multi: Vec<&Group> = groups.iter().filter(|g| g.members.len() > 1).collect();
    if !multi.is_empty() {
        let _ = writeln!(out, "\nseed groups (mean ± sd):");
        for g in multi {
            let _ = writeln!(out, "  {}", g.label);
            for st in group_stats(runs, g) {
                let (task, column) = (&st.task, &st.column);
                let stats = format!(
                    "baseline {}  final {}  change {}  ok {}",
                    st.baseline, st.final_value, st.change, st.ok
                );
                let _ = writeln!(out, "    {task:<5} {column:<12} {stats}");
            }
        }
    }
    out
}

/// One task of a seed group: baseline, final and change as mean ± sd, verdicts `ok k/n`.
struct GroupStat {
    task: String,
    column: String,
    baseline: String,
    final_value: String,
    change: String,
    ok: String,
}

/// Per task of a group: baseline, final and change as mean ± sd, and the verdict counts.
fn group_stats(runs: &[RunData], g: &Group) -> Vec<GroupStat> {
    let first = &runs[g.members[0]];
    first
        .tasks
        .iter()
        .map(|t0| {
            let ts: Vec<_> = g
                .members
                .iter()
                .filter_map(|&m| runs[m].tasks.iter().find(|t| t.task == t0.task))
                .collect();
            let stat = |f: &dyn Fn(&super::run_files::TaskResult) -> Option<f64>, pct: bool| {
                let v: Vec<f64> = ts.iter().filter_map(|t| f(t)).collect();
                if v.is_empty() {
                    return "—".to_string();
                }
                let (m, s) = mean_std(&v);
                if pct {
                    format!("{} ± {:.1}", super::fmt::fmt_drop(Some(m)), s * 100.0)
                } else {
                    format!("{m:.4} ± {s:.4}")
                }
            };
            let ok = ts
                .iter()
                .filter(|t| matches!(t.verdict.as_str(), "within" | "ok"))
                .count();
            GroupStat {
                task: t0.task.clone(),
                column: t0.column.clone(),
                baseline: stat(&|t| t.baseline, false),
                final_value: stat(&|t| t.final_value, false),
                change: stat(&|t| t.drop_rel, true),
                ok: format!("{ok}/{}", ts.len()),
            }
        })
        .collect()
}

fn summary_markdown(runs: &[RunData], labels: &[String]) -> String {
    let mut out = format!("| {} |\n|", HEADERS.join(" | "));
    for h in HEADERS {
        out.push_str(
            if matches!(
                h,
                "baseline" | "final" | "change" | "interval" | "train time"
            ) {
                "---:|"
            } else {
                "---|"
            },
        );
    }
    out.push('\n');
    for (r, l) in runs.iter().zip(labels) {
        for (k, row) in rows_of(r, l).iter().enumerate() {
            let c = cells(row, k == 0);
            let c: Vec<String> = c.iter().map(|x| x.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", c.join(" | "));
        }
    }
    out
}

/// Tidy CSV: one row per (run, task), every cell filled, numbers unformatted.
fn summary_csv(runs: &[RunData], labels: &[String], groups: &[Group]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "run",
        "group",
        "run_dir",
        "task",
        "metric",
        "stage",
        "baseline",
        "final",
        "drop_rel",
        "drop_lo",
        "drop_hi",
        "verdict",
        "pass",
        "train_seconds",
    ])?;
    let num = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    for (i, (r, l)) in runs.iter().zip(labels).enumerate() {
        let group = groups
            .iter()
            .find(|g| g.members.contains(&i))
            .map(|g| g.label.clone())
            .unwrap_or_default();
        let pass = r.pass().map(|p| p.to_string()).unwrap_or_default();
        for t in &r.tasks {
            w.write_record([
                l.clone(),
                group.clone(),
                r.dir.display().to_string(),
                t.task.clone(),
                t.column.clone(),
                t.stage.map(|s| s.to_string()).unwrap_or_default(),
                num(t.baseline),
                num(t.final_value),
                num(t.drop_rel),
                num(t.drop_interval.map(|i| i[0])),
                num(t.drop_interval.map(|i| i[1])),
                t.verdict.clone(),
                pass.clone(),
                num(r.train_seconds()),
            ])?;
        }
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(String::from_utf8(bytes)?)
}

/// The summary as an HTML table: one row per run, one column per task.
fn summary_html(runs: &[RunData], labels: &[String]) -> String {
    let mut tasks: Vec<(String, String)> = Vec::new();
    for r in runs {
        for t in &r.tasks {
            if !tasks.iter().any(|(k, _)| *k == t.task) {
                tasks.push((t.task.clone(), t.column.clone()));
            }
        }
    }
    let mut s = String::from("<div class=\"scroll\"><table><thead><tr><th>run</th>");
    for (_, c) in &tasks {
        let _ = write!(
            s,
            "<th>{}<br>baseline → final</th>",
            esc(&super::fmt::metric_label(c))
        );
    }
    s.push_str("<th>overall</th><th class=\"num\">train time</th></tr></thead><tbody>");
    for (r, l) in runs.iter().zip(labels) {
        let _ = write!(s, "<tr><td class=\"name\">{}</td>", breakable(l));
        for (t, _) in &tasks {
            match r.tasks.iter().find(|x| &x.task == t) {
                Some(x) => {
                    let _ = write!(
                        s,
                        "<td class=\"cell\">{} → {}<br><span class=\"sub\">{} {}</span> {}</td>",
                        html::fmt_opt(x.baseline, 3),
                        html::fmt_opt(x.final_value, 3),
                        super::fmt::fmt_drop(x.drop_rel),
                        super::fmt::fmt_interval(x.drop_interval),
                        html::verdict_badge(&x.verdict)
                    );
                }
                None => s.push_str("<td>—</td>"),
            }
        }
        let (class, label) = match r.pass() {
            Some(true) => ("ok", "PASS"),
            Some(false) => ("fail", "FAIL"),
            None => ("running", "unfinished"),
        };
        let _ = write!(
            s,
            "<td><span class=\"badge {class}\">{label}</span></td><td class=\"num\">{}</td></tr>",
            html::fmt_seconds(r.train_seconds())
        );
    }
    s.push_str("</tbody></table></div>");
    s
}

/// Mean ± sd per task of each seed group (empty without groups of several runs).
fn groups_html(runs: &[RunData], groups: &[Group]) -> String {
    let multi: Vec<&Group> = groups.iter().filter(|g| g.members.len() > 1).collect();
    if multi.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "<h2 style=\"margin-top:18px\">Seed groups (mean ± sd)</h2><div class=\"scroll\"><table><thead><tr>\
         <th>group</th><th>task</th><th class=\"num\">baseline</th><th class=\"num\">final</th>\
         <th class=\"num\">change</th><th class=\"num\">ok</th></tr></thead><tbody>",
    );
    for g in multi {
        for (k, st) in group_stats(runs, g).into_iter().enumerate() {
            let _ = write!(
                s,
                "<tr><td class=\"name\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                if k == 0 { breakable(&g.label) } else { String::new() },
                esc(&super::fmt::metric_label(&st.column)),
                esc(&st.baseline),
                esc(&st.final_value),
                esc(&st.change),
                esc(&st.ok)
            );
        }
    }
    s.push_str("</tbody></table></div>");
    s
}

/// A run name escaped for HTML with break opportunities after `__` and `,` (sweep names
/// such as `replay__weight-0.5__seed-2` wrap there rather than overflow their cell).
fn breakable(name: &str) -> String {
    esc(name).replace("__", "__<wbr>").replace(',', ",<wbr>")
}

/// What "baseline" means in the tables, for the kinds the runs were judged against.
fn baselines_note(runs: &[RunData]) -> String {
    let mut kinds: Vec<&str> = runs
        .iter()
        .filter_map(|r| Some(r.summary.as_ref()?.baseline_kind.label()))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let what = |k: &str| {
        match k {
        "single_task" => "single_task, the same task trained alone from the same initialisation with the same budget (the challenge's baseline)",
        "stage_end" => "stage_end, the task's value at the end of its own stage in the same run",
        "stage_best" => "stage_best, the task's best value during its own stage in the same run",
        _ => "",
    }
    };
    let list: Vec<&str> = kinds
        .iter()
        .map(|k| what(k))
        .filter(|s| !s.is_empty())
        .collect();
    let judged = if list.is_empty() {
        "Change: final value against each run's baseline.".to_string()
    } else {
        format!(
            "Change: final value against the baseline: {}; the interval is a paired bootstrap over the verdict's images at the run's <code>[eval] confidence</code>.",
            list.join("; ")
        )
    };
    format!(
        "{judged} Runs that differ only in their seed are grouped: their lines are the mean, the band ± one standard deviation; the dashed grey line is the metric's chance level."
    )
}

fn runs_html(runs: &[RunData], labels: &[String], groups: &[Group]) -> String {
    let mut s = String::from(
        "<div class=\"scroll\"><table><thead><tr><th>run</th><th>group</th><th>folder</th></tr></thead><tbody>",
    );
    for (i, (r, l)) in runs.iter().zip(labels).enumerate() {
        let g = groups
            .iter()
            .find(|g| g.members.contains(&i))
            .map(|g| g.label.as_str())
            .unwrap_or("");
        let _ = write!(
            s,
            "<tr><td class=\"name\">{}</td><td class=\"name\">{}</td><td class=\"name\"><code>{}</code></td></tr>",
            breakable(l),
            breakable(g),
            esc(&r.dir.display().to_string())
        );
    }
    s.push_str("</tbody></table></div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep folder as `onehead sweep` leaves it: `index.csv` names each run by `run_dir`
    /// (absolute, or relative to where the sweep ran), runs live under `runs/`, and a run that
    /// never started has no folder.
    #[test]
    fn find_runs_reads_a_sweep_index() {
        let tmp = tempfile::tempdir().unwrap();
        let sweep = tmp.path().join("sw");
        for r in ["a", "b"] {
            std::fs::create_dir_all(sweep.join("runs").join(r)).unwrap();
            std::fs::write(sweep.join("runs").join(r).join("epochs.csv"), "stage\n").unwrap();
        }
        let a = sweep.join("runs/a");
        std::fs::write(
            sweep.join("index.csv"),
            format!(
                "index,name,status,reason,run_dir\n0,a,ok,,{}\n1,b,ok,,results/sw/runs/b\n2,c,missing,,\n",
                a.display()
            ),
        )
        .unwrap();
        let runs = find_runs(&sweep).unwrap();
        let names: Vec<_> = runs
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"a".to_string()) && names.contains(&"b".to_string()),
            "{names:?}"
        );
        // Without a run_dir (or run) column the error names the file and the column.
        std::fs::write(sweep.join("index.csv"), "index,name\n").unwrap();
        let msg = find_runs(&sweep).unwrap_err().to_string();
        assert!(
            msg.contains("index.csv") && msg.contains("run_dir"),
            "{msg}"
        );
    }
}
