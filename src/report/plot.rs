//! Charts drawn from a run folder's CSVs with `plotters`: training loss over the whole run,
//! every task's validation metric with its baseline and tolerance line, the task × stage
//! matrix as a heat map, and the overlays of `compare`. Each chart is written as PNG and SVG.
//!
//! Text is rendered with DejaVu Sans compiled into the binary (ab_glyph), so drawing needs
//! no system fonts and no fontconfig. Legends sit in their own column to the right of each
//! plot, so they never cover a curve.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::fmt::{fmt_drop, metric_label, pct};
use super::glyphs::CrispText;
use super::run_files::{RunData, Stage};

/// The family name the embedded font ([`super::glyphs::FONT`]) is registered under.
pub(crate) const FONT_FAMILY: &str = "sans-serif";

/// Stage colours (Tableau 10): stage k is drawn in `PALETTE[(k - 1) % 10]` in every chart.
const PALETTE: [(u8, u8, u8); 10] = [
    (0x4E, 0x79, 0xA7),
    (0xF2, 0x8E, 0x2B),
    (0x59, 0xA1, 0x4F),
    (0xE1, 0x57, 0x59),
    (0x76, 0xB7, 0xB2),
    (0xB0, 0x7A, 0xA1),
    (0x9C, 0x75, 0x5F),
    (0xED, 0xC9, 0x48),
    (0xFF, 0x9D, 0xA7),
    (0xBA, 0xB0, 0xAC),
];
/// Colours of the strategies' extra loss terms (distinct from the stage colours).
const TERM_COLOURS: [(u8, u8, u8); 4] = [
    (0x3B, 0x3B, 0x3B),
    (0x7B, 0x3F, 0x9E),
    (0x8C, 0x56, 0x4B),
    (0x17, 0x8F, 0x8F),
];
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const GREY: RGBColor = RGBColor(0x77, 0x77, 0x77);
const THRESHOLD_RED: RGBColor = RGBColor(0xC0, 0x39, 0x2B);

pub(crate) const WIDTH: u32 = 1000;
const LEGEND_W: u32 = 250;
const LOSS_HEIGHT: u32 = 620;

/// Pixel size of `metrics.png` for `n` tasks.
pub(crate) fn metrics_size(n: usize) -> (u32, u32) {
    (WIDTH, 60 + 230 * n.max(1) as u32)
}
/// Pixel size of `loss.png`.
pub(crate) fn loss_size() -> (u32, u32) {
    (WIDTH, LOSS_HEIGHT)
}
/// Pixel size of `matrix.png` for `tasks` rows and `stages` columns.
pub(crate) fn matrix_size(tasks: usize, stages: usize) -> (u32, u32) {
    (
        (200 + 150 * stages.max(1) as u32).max(640),
        120 + 64 * tasks.max(1) as u32,
    )
}
/// Pixel size of an overlay chart of `compare`.
pub(crate) fn overlay_size() -> (u32, u32) {
    (WIDTH, 520)
}

pub(crate) fn stage_colour(stage: usize) -> RGBColor {
    let (r, g, b) = PALETTE[(stage.max(1) - 1) % PALETTE.len()];
    RGBColor(r, g, b)
}

pub(crate) fn series_colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

fn term_colour(i: usize) -> RGBColor {
    let (r, g, b) = TERM_COLOURS[i % TERM_COLOURS.len()];
    RGBColor(r, g, b)
}

/// Register the embedded font once per process (plotters keeps a global font table).
pub(crate) fn ensure_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, super::glyphs::FONT)
            .is_err()
        {
            // Cannot happen with the bundled file; charts would then fail with a clear error.
            tracing::error!("the embedded chart font could not be loaded");
        }
    });
}

fn font(size: f64) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&INK)
}

/// Drawing errors of any backend, as `anyhow`.
trait DrawResult<T> {
    fn draw_err(self) -> Result<T>;
}
impl<T, E: std::fmt::Display> DrawResult<T> for std::result::Result<T, E> {
    fn draw_err(self) -> Result<T> {
        self.map_err(|e| anyhow!("drawing failed: {e}"))
    }
}

/// A chart that can draw itself on any plotters backend.
pub(crate) trait Chart {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// Render `chart` as `<dir>/<stem>.png` and `<dir>/<stem>.svg`; returns both paths.
pub(crate) fn save_chart<C: Chart>(chart: &C, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    ensure_font();
    let (w, h) = chart.size();
    let png_path = dir.join(format!("{stem}.png"));
    let svg_path = dir.join(format!("{stem}.svg"));
    let png = render_png(chart).with_context(|| format!("drawing {}", png_path.display()))?;
    super::write_atomic(&png_path, &png)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).draw_err()?;
        chart
            .draw(&root)
            .with_context(|| format!("drawing {}", svg_path.display()))?;
        root.present().draw_err()?;
    }
    super::write_atomic(&svg_path, svg.as_bytes())?;
    Ok(vec![png_path, svg_path])
}

/// The chart as PNG bytes.
pub(crate) fn render_png<C: Chart>(chart: &C) -> Result<Vec<u8>> {
    ensure_font();
    let (w, h) = chart.size();
    let mut buf = vec![255u8; (w as usize) * (h as usize) * 3];
    {
        let root = CrispText(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
        root.fill(&WHITE).draw_err()?;
        chart.draw(&root)?;
        root.present().draw_err()?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&buf)?;
        writer.finish()?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Shared pieces: ticks, legends, stage bands.

fn fmt_epoch(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// An axis value: as few digits as it needs (`0.25`, `4`, `1.5`, `2e-4`).
fn fmt_value(x: &f64) -> String {
    let a = x.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if a < 0.001 {
        return format!("{x:.0e}");
    }
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[derive(Clone)]
pub(crate) enum Swatch {
    Line {
        colour: RGBColor,
        dashed: bool,
        marker: bool,
    },
    Band(RGBColor),
    Text,
}

#[derive(Clone)]
pub(crate) struct LegendEntry {
    pub swatch: Swatch,
    pub label: String,
}

impl LegendEntry {
    fn line(colour: RGBColor, label: impl Into<String>, marker: bool) -> Self {
        Self {
            swatch: Swatch::Line {
                colour,
                dashed: false,
                marker,
            },
            label: label.into(),
        }
    }
    fn dashed(colour: RGBColor, label: impl Into<String>) -> Self {
        Self {
            swatch: Swatch::Line {
                colour,
                dashed: true,
                marker: false,
            },
            label: label.into(),
        }
    }
    fn text(label: impl Into<String>) -> Self {
        Self {
            swatch: Swatch::Text,
            label: label.into(),
        }
    }
}

/// The area below a title line; a long title gets a smaller font, then is shortened.
fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> Result<DrawingArea<DB, Shift>> {
    let max = root.dim_in_pixel().0.saturating_sub(24);
    for size in [20.0, 18.0, 16.0, 14.0] {
        let fits = root
            .estimate_text_size(title, &font(size))
            .map(|(w, _)| w <= max)
            .unwrap_or(true);
        if fits {
            return root.titled(title, font(size)).draw_err();
        }
    }
    let short = fit_text(root, title, &font(14.0), max);
    root.titled(&short, font(14.0)).draw_err()
}

/// Shorten `text` with "…" until it fits `max_px` at `style`.
fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
    max_px: u32,
) -> String {
    let fits = |s: &str| {
        area.estimate_text_size(s, style)
            .map(|(w, _)| w <= max_px)
            .unwrap_or(true)
    };
    if fits(text) {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for n in (1..chars.len()).rev() {
        let s: String = chars[..n].iter().collect::<String>() + "…";
        if fits(&s) {
            return s;
        }
    }
    "…".into()
}

/// Split `text` into lines that fit `max_px`: at spaces, and inside a word too long for a
/// line after `_`, `.`, `-`, `,` or `=` (sweep run names are one long word); what is still too
/// long, or beyond `max_lines`, is shortened.
fn wrap_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
    max_px: u32,
    max_lines: usize,
) -> Vec<String> {
    let fits = |s: &str| {
        area.estimate_text_size(s, style)
            .map(|(w, _)| w <= max_px)
            .unwrap_or(true)
    };
    // (piece, glue before it): words glued with a space, a long word's pieces with nothing.
    let mut pieces: Vec<(String, &str)> = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        let glue = if i == 0 { "" } else { " " };
        if fits(word) {
            pieces.push((word.to_string(), glue));
            continue;
        }
        let mut cur = String::new();
        let mut first = true;
        for c in word.chars() {
            cur.push(c);
            if matches!(c, '_' | '.' | '-' | ',' | '=') {
                pieces.push((std::mem::take(&mut cur), if first { glue } else { "" }));
                first = false;
            }
        }
        if !cur.is_empty() {
            pieces.push((cur, if first { glue } else { "" }));
        }
    }
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for (piece, glue) in pieces {
        let cand = if cur.is_empty() {
            piece.clone()
        } else {
            format!("{cur}{glue}{piece}")
        };
        if fits(&cand) || cur.is_empty() {
            cur = cand;
        } else {
            lines.push(std::mem::take(&mut cur));
            cur = piece;
        }
    }
    lines.push(cur);
    if lines.len() > max_lines {
        let rest = lines[max_lines - 1..].join(" ");
        lines.truncate(max_lines - 1);
        lines.push(rest);
    }
    lines
        .into_iter()
        .map(|l| fit_text(area, &l, style, max_px))
        .collect()
}

/// A legend column: entries from the top of `area`, `top` pixels down; long labels wrap.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
    top: i32,
) -> Result<()> {
    let style = font(13.0).pos(Pos::new(HPos::Left, VPos::Center));
    let (w, _) = area.dim_in_pixel();
    let (row, line_h) = (21, 16);
    let mut y = top;
    for e in entries {
        let x0 = 10;
        let text_x = match &e.swatch {
            Swatch::Text => x0,
            _ => x0 + 34,
        };
        match &e.swatch {
            Swatch::Line {
                colour,
                dashed,
                marker,
            } => {
                let st = colour.stroke_width(2);
                if *dashed {
                    area.draw(&DashedPathElement::new(
                        vec![(x0, y), (x0 + 26, y)],
                        5,
                        3,
                        st,
                    ))
                    .draw_err()?;
                } else {
                    area.draw(&PathElement::new(vec![(x0, y), (x0 + 26, y)], st))
                        .draw_err()?;
                }
                if *marker {
                    area.draw(&Circle::new((x0 + 13, y), 3, colour.filled()))
                        .draw_err()?;
                }
            }
            Swatch::Band(colour) => {
                area.draw(&Rectangle::new(
                    [(x0, y - 6), (x0 + 26, y + 6)],
                    colour.mix(0.25).filled(),
                ))
                .draw_err()?;
                area.draw(&PathElement::new(
                    vec![(x0, y), (x0 + 26, y)],
                    colour.stroke_width(2),
                ))
                .draw_err()?;
            }
            Swatch::Text => {}
        }
        let lines = wrap_text(
            area,
            &e.label,
            &style,
            w.saturating_sub(text_x as u32 + 8),
            5,
        );
        for (k, l) in lines.iter().enumerate() {
            area.draw(&Text::new(
                l.clone(),
                (text_x, y + line_h * k as i32),
                style.clone(),
            ))
            .draw_err()?;
        }
        y += row + line_h * (lines.len() as i32 - 1);
    }
    Ok(())
}

type EpochChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A cartesian chart over global epochs `0.5..last+0.5` and `y0..y1`.
fn epoch_chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: Option<&str>,
    last_epoch: usize,
    y: (f64, f64),
    y_desc: &str,
    x_desc: Option<&str>,
) -> Result<EpochChart<'a, DB>> {
    epoch_chart_scaled(area, caption, last_epoch, y, y_desc, x_desc, false)
}

/// [`epoch_chart`], with `log_y`: the y values given are log10 of the data (see
/// [`log_scale`]) and the tick labels show the data's values.
fn epoch_chart_scaled<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: Option<&str>,
    last_epoch: usize,
    (y0, y1): (f64, f64),
    y_desc: &str,
    x_desc: Option<&str>,
    log_y: bool,
) -> Result<EpochChart<'a, DB>> {
    let mut b = ChartBuilder::on(area);
    b.margin_left(8)
        .margin_right(14)
        .margin_top(6)
        .margin_bottom(4)
        .x_label_area_size(if x_desc.is_some() { 44 } else { 26 })
        .y_label_area_size(64);
    if let Some(c) = caption {
        b.caption(c, font(16.0));
    }
    // At most one tick per epoch: plotters then picks whole-number steps (1, 2, 5, 10, …).
    let last = last_epoch.max(1);
    let mut chart = b
        .build_cartesian_2d(0.5..last as f64 + 0.5, y0..y1)
        .draw_err()?;
    // Two significant digits: a log axis ticks at 10^0.5 steps (3.2, not 3.162).
    let from_log = |v: &f64| {
        let x = 10f64.powf(*v);
        let digits = (1 - x.log10().floor() as i32).max(0) as usize;
        fmt_value(&format!("{x:.digits$}").parse().unwrap_or(x))
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(0xE4, 0xE4, 0xE4))
        .axis_style(RGBColor(0x99, 0x99, 0x99))
        .y_labels(6)
        .x_labels(last.min(12))
        .x_label_formatter(&fmt_epoch)
        .y_label_formatter(if log_y { &from_log } else { &fmt_value })
        .label_style(font(13.0))
        .axis_desc_style(font(14.0))
        .y_desc(y_desc);
    if let Some(d) = x_desc {
        mesh.x_desc(d);
    }
    mesh.draw().draw_err()?;
    Ok(chart)
}

/// Light stage bands, dashed boundaries, and (if `labels`) "k · task" at the top.
fn draw_stages<DB: DrawingBackend>(
    chart: &mut EpochChart<'_, DB>,
    stages: &[Stage],
    (y0, y1): (f64, f64),
    labels: bool,
) -> Result<()> {
    for (i, s) in stages.iter().enumerate() {
        let (a, b) = (s.first_epoch as f64 - 0.5, s.last_epoch as f64 + 0.5);
        let c = stage_colour(s.index);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, y0), (b, y1)],
                c.mix(0.07).filled(),
            )))
            .draw_err()?;
        if i > 0 {
            chart
                .draw_series(std::iter::once(DashedPathElement::new(
                    vec![(a, y0), (a, y1)],
                    6,
                    4,
                    GREY.stroke_width(1),
                )))
                .draw_err()?;
        }
        if labels {
            let px = chart.backend_coord(&(b, y1)).0 - chart.backend_coord(&(a, y1)).0;
            let style = font(13.0).color(&c).pos(Pos::new(HPos::Center, VPos::Top));
            let full = format!("stage {} · {}", s.index, s.task);
            let label = [
                full,
                format!("{} · {}", s.index, s.task),
                s.index.to_string(),
            ]
            .into_iter()
            .find(|l| {
                chart
                    .plotting_area()
                    .estimate_text_size(l, &style)
                    .map(|(w, _)| (w as i32) < px - 4)
                    .unwrap_or(true)
            });
            if let Some(l) = label {
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at(((a + b) / 2.0, y1)) + Text::new(l, (0, 5), style),
                    ))
                    .draw_err()?;
            }
        }
    }
    Ok(())
}

/// Whether epochs are far enough apart on the x axis for a marker at each.
fn markers_fit<DB: DrawingBackend>(chart: &EpochChart<'_, DB>) -> bool {
    let plot_w = chart.plotting_area().dim_in_pixel().0 as f64;
    let r = chart.x_range();
    plot_w / (r.end - r.start).max(1.0) >= 14.0
}

/// Line with round markers (markers only while the epochs are not too dense).
fn draw_line<DB: DrawingBackend>(
    chart: &mut EpochChart<'_, DB>,
    pts: &[(f64, f64)],
    colour: RGBColor,
    width: u32,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(
            pts.iter().copied(),
            colour.stroke_width(width),
        ))
        .draw_err()?;
    if markers_fit(chart) {
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .draw_err()?;
    }
    Ok(())
}

/// Points split where a stage ends, so lines do not jump across stage boundaries.
fn by_stage(pts: &[(f64, f64)], stages: &[Stage]) -> Vec<Vec<(f64, f64)>> {
    let stage_of = |x: f64| {
        stages
            .iter()
            .position(|s| x >= s.first_epoch as f64 - 0.5 && x <= s.last_epoch as f64 + 0.5)
    };
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut cur_stage = None;
    for p in pts {
        let st = stage_of(p.0);
        if out.is_empty() || st != cur_stage {
            out.push(Vec::new());
            cur_stage = st;
        }
        out.last_mut().expect("pushed").push(*p);
    }
    out
}

fn draw_hline<DB: DrawingBackend>(
    chart: &mut EpochChart<'_, DB>,
    y: f64,
    (x0, x1): (f64, f64),
    style: ShapeStyle,
    dashed: bool,
) -> Result<()> {
    if dashed {
        chart
            .draw_series(std::iter::once(DashedPathElement::new(
                vec![(x0, y), (x1, y)],
                8,
                5,
                style,
            )))
            .draw_err()?;
    } else {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x0, y), (x1, y)],
                style,
            )))
            .draw_err()?;
    }
    Ok(())
}

fn max_of<'a>(vals: impl IntoIterator<Item = &'a f64>) -> f64 {
    vals.into_iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max)
}

fn min_of<'a>(vals: impl IntoIterator<Item = &'a f64>) -> f64 {
    vals.into_iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min)
}

/// `(0, top)` for values ≥ 0 (or `(min, top)` if some are negative), with head room.
fn y_range(vals: &[f64], headroom: f64) -> (f64, f64) {
    let hi = max_of(vals);
    let lo = min_of(vals);
    if !hi.is_finite() {
        return (0.0, 1.0);
    }
    let lo = if lo >= 0.0 { 0.0 } else { lo * 1.05 };
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    (lo, lo + (hi - lo) * headroom)
}

// ---------------------------------------------------------------------------------------
// The run's charts.

/// Points of a line: `(global epoch, value)`.
type Points = Vec<(f64, f64)>;

/// A chart's PNG bytes, by file stem (`loss`, `metrics`, `matrix`).
pub(crate) type Pngs = Vec<(String, Vec<u8>)>;

/// Training loss over the whole run.
pub(crate) struct LossChart {
    pub title: String,
    pub stages: Vec<Stage>,
    pub last_epoch: usize,
    /// Per stage: `(stage index, task, [(global epoch, loss_new)])`.
    pub new_loss: Vec<(usize, String, Points)>,
    /// `(global epoch, loss_total)`.
    pub total: Vec<(f64, f64)>,
    /// Per extra term: `(name, [(global epoch, value)])`.
    pub terms: Vec<(String, Vec<(f64, f64)>)>,
}

impl LossChart {
    pub fn from_run(run: &RunData) -> Option<Self> {
        let e = &run.epochs;
        let stages = e.stages();
        let new_loss: Vec<_> = stages
            .iter()
            .map(|s| {
                let pts = e
                    .rows
                    .iter()
                    .filter(|r| r.stage == s.index)
                    .filter_map(|r| Some((r.global_epoch as f64, *r.losses.get("loss_new")?)))
                    .filter(|p| p.1.is_finite())
                    .collect::<Vec<_>>();
                (s.index, s.task.clone(), pts)
            })
            .collect();
        if new_loss.iter().all(|(_, _, p)| p.is_empty()) {
            return None;
        }
        let terms: Vec<_> = e
            .terms
            .iter()
            .map(|name| {
                // Files before empty cells wrote 0 where a term did not exist: a stage whose
                // every value of the term is exactly 0 is drawn as absent, not as a zero loss.
                let silent: Vec<usize> = stages
                    .iter()
                    .filter(|s| {
                        e.rows
                            .iter()
                            .filter(|r| r.stage == s.index)
                            .all(|r| r.losses.get(name).is_none_or(|v| *v == 0.0))
                    })
                    .map(|s| s.index)
                    .collect();
                let pts: Vec<(f64, f64)> = e
                    .rows
                    .iter()
                    .filter(|r| !silent.contains(&r.stage))
                    .filter_map(|r| Some((r.global_epoch as f64, *r.losses.get(name)?)))
                    .filter(|p| p.1.is_finite())
                    .collect();
                (name.trim_start_matches("loss_").to_string(), pts)
            })
            // A term that never added anything (a fixed `loss_replay` column of a run
            // without replay) is not drawn.
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let total = e
            .rows
            .iter()
            .filter_map(|r| Some((r.global_epoch as f64, *r.losses.get("loss_total")?)))
            .filter(|p| p.1.is_finite())
            .collect();
        Some(Self {
            title: format!("{} — training loss", run.name),
            stages: run.chart_stages(),
            last_epoch: run.chart_last_epoch(),
            new_loss,
            total,
            terms,
        })
    }
}

impl Chart for LossChart {
    fn size(&self) -> (u32, u32) {
        loss_size()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let area = titled(root, &self.title)?;
        let (w, h) = area.dim_in_pixel();
        let (plots, legend) = area.split_horizontally(w - LEGEND_W);
        let with_terms = !self.terms.is_empty();
        let (top, bottom, ltop, lbottom) = if with_terms {
            let split = (h as f64 * 0.6) as u32;
            let (t, b) = plots.split_vertically(split);
            let (lt, lb) = legend.split_vertically(split);
            (t, Some(b), lt, Some(lb))
        } else {
            (plots, None, legend, None)
        };

        // The new task's loss, one colour per stage (and the total, when terms exist).
        let mut vals: Vec<f64> = self
            .new_loss
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|x| x.1))
            .collect();
        if with_terms {
            vals.extend(self.total.iter().map(|x| x.1));
        }
        let log = log_scale(&vals);
        let tf = |p: &[(f64, f64)]| if log { to_log(p) } else { p.to_vec() };
        let yr = if log {
            log_range(&vals)
        } else {
            y_range(&vals, 1.15)
        };
        let mut chart = epoch_chart_scaled(
            &top,
            with_terms.then_some("the new task's loss"),
            self.last_epoch,
            yr,
            if log { "loss (log scale)" } else { "loss" },
            (!with_terms).then_some("global epoch"),
            log,
        )?;
        draw_stages(&mut chart, &self.stages, yr, true)?;
        let mut entries = Vec::new();
        if with_terms {
            for seg in by_stage(&tf(&self.total), &self.stages) {
                chart
                    .draw_series(DashedLineSeries::new(seg, 5, 4, GREY.stroke_width(1)))
                    .draw_err()?;
            }
        }
        for (stage, task, pts) in &self.new_loss {
            let c = stage_colour(*stage);
            draw_line(&mut chart, &tf(pts), c, 2)?;
            entries.push(LegendEntry::line(
                c,
                format!("{task} loss (stage {stage})"),
                markers_fit(&chart),
            ));
        }
        if with_terms && !self.total.is_empty() {
            entries.push(LegendEntry::dashed(GREY, "total (new + terms)"));
        }
        draw_legend(&ltop, &entries, 40)?;

        // The strategies' extra terms, apart.
        if let (Some(bottom), Some(lbottom)) = (bottom, lbottom) {
            let vals: Vec<f64> = self
                .terms
                .iter()
                .flat_map(|(_, p)| p.iter().map(|x| x.1))
                .collect();
            let log = log_scale(&vals);
            let yr = if log {
                log_range(&vals)
            } else {
                y_range(&vals, 1.1)
            };
            let mut chart = epoch_chart_scaled(
                &bottom,
                Some("strategy terms (weighted, as added to the total)"),
                self.last_epoch,
                yr,
                if log { "loss (log scale)" } else { "loss" },
                Some("global epoch"),
                log,
            )?;
            draw_stages(&mut chart, &self.stages, yr, false)?;
            let mut entries = Vec::new();
            for (i, (name, pts)) in self.terms.iter().enumerate() {
                let c = term_colour(i);
                let pts = if log { to_log(pts) } else { pts.clone() };
                for seg in by_stage(&pts, &self.stages) {
                    draw_line(&mut chart, &seg, c, 2)?;
                }
                entries.push(LegendEntry::line(
                    c,
                    format!("{name} term"),
                    markers_fit(&chart),
                ));
            }
            draw_legend(&lbottom, &entries, 40)?;
        }
        Ok(())
    }
}

/// Whether losses spanning `vals` need a log axis (the largest over 30× the smallest
/// positive one: detection's loss would otherwise flatten the others), and the transform.
fn log_scale(vals: &[f64]) -> bool {
    let pos: Vec<f64> = vals.iter().copied().filter(|v| *v > 0.0).collect();
    let (lo, hi) = (min_of(&pos), max_of(&pos));
    !pos.is_empty() && hi > 30.0 * lo
}

/// The log10 y range of the positive `vals`, with a little room.
fn log_range(vals: &[f64]) -> (f64, f64) {
    let l: Vec<f64> = vals
        .iter()
        .filter(|v| **v > 0.0)
        .map(|v| v.log10())
        .collect();
    let (lo, hi) = (min_of(&l), max_of(&l));
    (lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
}

/// `pts` with y as log10 (non-positive values, which a log axis cannot show, left out).
fn to_log(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    pts.iter()
        .filter(|p| p.1 > 0.0)
        .map(|&(x, y)| (x, y.log10()))
        .collect()
}

/// One task's panel of the metrics chart.
pub(crate) struct MetricPanel {
    pub column: String,
    pub stage: usize,
    pub points: Vec<(f64, f64)>,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
    /// The metric's chance level (on the verdict's split): a verdict depends on it.
    pub chance: Option<f64>,
    pub final_value: Option<f64>,
    pub drop_rel: Option<f64>,
    pub verdict: String,
}

/// Every task's validation metric over global epochs, from the stage that learned it on.
pub(crate) struct MetricsChart {
    pub title: String,
    pub stages: Vec<Stage>,
    pub last_epoch: usize,
    pub tolerance_label: String,
    /// The split the baselines, finals and chance were measured on (` (test)`; empty for
    /// val, the curves' own split).
    pub verdict_split: String,
    pub panels: Vec<MetricPanel>,
}

impl MetricsChart {
    pub fn from_run(run: &RunData) -> Option<Self> {
        let stages = run.epochs.stages();
        let mut panels = Vec::new();
        for t in &run.tasks {
            let Some(col) = run.epochs.column(&t.column) else {
                continue;
            };
            let stage = t.stage.unwrap_or(1);
            // From the (first) stage that trained the task onward.
            let start = stages
                .iter()
                .find(|s| s.task == t.task)
                .or_else(|| stages.iter().find(|s| s.index == stage))
                .map(|s| s.first_epoch)
                .unwrap_or(1);
            let points: Vec<(f64, f64)> = run
                .epochs
                .series(col)
                .into_iter()
                .filter(|(e, _)| *e as usize >= start)
                .collect();
            if points.is_empty() {
                continue;
            }
            panels.push(MetricPanel {
                column: t.column.clone(),
                stage,
                points,
                baseline: t.baseline,
                threshold: t.threshold,
                chance: t.chance,
                final_value: t.final_value,
                drop_rel: t.drop_rel,
                verdict: t.verdict.clone(),
            });
        }
        if panels.is_empty() {
            return None;
        }
        let tolerance_label = if run.tolerance_kind == "absolute" {
            format!("baseline − {}", fmt_value(&run.tolerance))
        } else {
            format!("(1 − {}) · baseline", pct(run.tolerance))
        };
        Some(Self {
            title: format!("{} — validation metrics", run.name),
            stages: run.chart_stages(),
            last_epoch: run.chart_last_epoch(),
            tolerance_label,
            verdict_split: run
                .summary
                .as_ref()
                .map(|s| s.verdict_split.as_str())
                .filter(|s| !s.is_empty() && *s != "val")
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            panels,
        })
    }
}

impl Chart for MetricsChart {
    fn size(&self) -> (u32, u32) {
        metrics_size(self.panels.len())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let area = titled(root, &self.title)?;
        let (w, _) = area.dim_in_pixel();
        let (plots, legends) = area.split_horizontally(w - LEGEND_W);
        let n = self.panels.len();
        let rows = plots.split_evenly((n, 1));
        let lrows = legends.split_evenly((n, 1));
        let x_span = (0.5, self.last_epoch.max(1) as f64 + 0.5);
        for (i, (p, (parea, larea))) in self
            .panels
            .iter()
            .zip(rows.iter().zip(lrows.iter()))
            .enumerate()
        {
            let mut vals: Vec<f64> = p.points.iter().map(|x| x.1).collect();
            vals.extend(p.baseline);
            vals.extend(p.chance);
            let yr = y_range(&vals, 1.2);
            let last = i + 1 == n;
            let label = metric_label(&p.column);
            let caption = format!("{label} (learned in stage {})", p.stage);
            let mut chart = epoch_chart(
                parea,
                Some(&caption),
                self.last_epoch,
                yr,
                &label,
                last.then_some("global epoch"),
            )?;
            draw_stages(&mut chart, &self.stages, yr, i == 0)?;
            let c = stage_colour(p.stage);
            let mut entries = vec![LegendEntry::line(
                c,
                format!("{label} (val)"),
                markers_fit(&chart),
            )];
            // Baseline and tolerance line from the start of the stage that learned the task.
            let from = self
                .stages
                .iter()
                .find(|s| s.index == p.stage)
                .map(|s| s.first_epoch as f64 - 0.5)
                .unwrap_or(x_span.0);
            if let Some(b) = p.baseline {
                draw_hline(&mut chart, b, (from, x_span.1), INK.stroke_width(1), true)?;
                let split = &self.verdict_split;
                entries.push(LegendEntry::dashed(INK, format!("baseline {b:.3}{split}")));
            }
            if let Some(t) = p.threshold {
                draw_hline(
                    &mut chart,
                    t,
                    (from, x_span.1),
                    THRESHOLD_RED.stroke_width(2),
                    true,
                )?;
                entries.push(LegendEntry::dashed(
                    THRESHOLD_RED,
                    format!("{} = {t:.3}", self.tolerance_label),
                ));
            }
            if let Some(ch) = p.chance {
                draw_hline(&mut chart, ch, x_span, GREY.stroke_width(1), true)?;
                entries.push(LegendEntry::dashed(GREY, format!("chance {ch:.3}")));
            }
            draw_line(&mut chart, &p.points, c, 2)?;
            if let Some(f) = p.final_value {
                let drop = p
                    .drop_rel
                    .map(|d| format!(" ({})", fmt_drop(Some(d))))
                    .unwrap_or_default();
                let split = &self.verdict_split;
                entries.push(LegendEntry::text(format!("final {f:.3}{split}{drop}")));
            }
            entries.push(LegendEntry::text(format!("verdict: {}", p.verdict)));
            draw_legend(larea, &entries, 34)?;
        }
        Ok(())
    }
}

/// The task × stage matrix as an annotated heat map.
pub(crate) struct MatrixChart {
    pub title: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
    /// Per row, the column of its baseline (the stage that learned the task).
    pub baseline_col: Vec<Option<usize>>,
    pub tolerance: f64,
    pub absolute: bool,
}

impl MatrixChart {
    pub fn from_run(run: &RunData) -> Option<Self> {
        let m = run.matrix.as_ref()?;
        let stages = run.epochs.stages();
        // `matrix.csv` does not name the stages' tasks: `epochs.csv` does.
        let cols: Vec<String> = m
            .stages
            .iter()
            .enumerate()
            .map(|(k, task)| {
                let task = Some(task.as_str())
                    .filter(|t| !t.is_empty())
                    .or_else(|| Some(stages.iter().find(|s| s.index == k + 1)?.task.as_str()));
                match task {
                    Some(t) => format!("after stage {} ({t})", k + 1),
                    None => format!("after stage {}", k + 1),
                }
            })
            .collect();
        let rows = m
            .tasks
            .iter()
            .zip(&m.metrics)
            .map(|(t, me)| {
                if me.is_empty() {
                    t.clone()
                } else {
                    format!("{t} · {me}")
                }
            })
            .collect();
        let baseline_col = m
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                run.tasks
                    .iter()
                    .find(|r| &r.task == t)
                    .and_then(|r| r.stage)
                    .map(|s| s - 1)
                    .filter(|c| m.values[i].get(*c).copied().flatten().is_some())
                    .or_else(|| m.values[i].iter().position(|v| v.is_some()))
            })
            .collect();
        Some(Self {
            title: format!("{} — task × stage", run.name),
            rows,
            cols,
            values: m.values.clone(),
            baseline_col,
            tolerance: run.tolerance,
            absolute: run.tolerance_kind == "absolute",
        })
    }

    /// Fill colour of a cell from its value relative to the row's baseline.
    fn cell_colour(&self, v: f64, base: Option<f64>) -> RGBColor {
        let Some(b) = base.filter(|b| *b > 0.0) else {
            return RGBColor(0xDD, 0xE6, 0xF0);
        };
        let ok_at = if self.absolute {
            ((b - self.tolerance) / b).max(0.0)
        } else {
            1.0 - self.tolerance
        };
        let r = v / b;
        // Green at or above the tolerance line; yellow → orange → red below it.
        let stops: [(f64, (u8, u8, u8)); 4] = [
            (0.0, (0xD7, 0x30, 0x27)),
            (0.5, (0xFC, 0x8D, 0x59)),
            (ok_at, (0xFE, 0xE0, 0x8B)),
            (1.0, (0xA6, 0xD9, 0x6A)),
        ];
        if r >= ok_at {
            return RGBColor(0xA6, 0xD9, 0x6A);
        }
        let r = r.clamp(0.0, 1.0);
        for w in stops.windows(2) {
            let ((a, ca), (b2, cb)) = (w[0], w[1]);
            if r <= b2 && b2 > a {
                let t = ((r - a) / (b2 - a)).clamp(0.0, 1.0);
                let lerp = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
                return RGBColor(lerp(ca.0, cb.0), lerp(ca.1, cb.1), lerp(ca.2, cb.2));
            }
        }
        RGBColor(0xFE, 0xE0, 0x8B)
    }
}

impl Chart for MatrixChart {
    fn size(&self) -> (u32, u32) {
        matrix_size(self.rows.len(), self.cols.len())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let area = titled(root, &self.title)?;
        let (w, h) = area.dim_in_pixel();
        let (nr, nc) = (self.rows.len().max(1) as i32, self.cols.len().max(1) as i32);
        let left = 180;
        let top = 36;
        let foot = 58;
        let cell_w = ((w as i32 - left - 20) / nc).min(170);
        let cell_h = ((h as i32 - top - foot) / nr).clamp(30, 64);
        let head = font(13.0).pos(Pos::new(HPos::Center, VPos::Bottom));
        for (j, c) in self.cols.iter().enumerate() {
            let x = left + cell_w * j as i32 + cell_w / 2;
            let label = fit_text(&area, c, &head, cell_w as u32 - 6);
            area.draw(&Text::new(label, (x, top - 8), head.clone()))
                .draw_err()?;
        }
        let row_style = font(14.0).pos(Pos::new(HPos::Right, VPos::Center));
        let value_style = font(15.0).pos(Pos::new(HPos::Center, VPos::Center));
        let small = font(12.0).pos(Pos::new(HPos::Center, VPos::Center));
        for (i, label) in self.rows.iter().enumerate() {
            let y0 = top + cell_h * i as i32;
            let lab = fit_text(&area, label, &row_style, left as u32 - 14);
            area.draw(&Text::new(
                lab,
                (left - 10, y0 + cell_h / 2),
                row_style.clone(),
            ))
            .draw_err()?;
            let base = self.baseline_col[i].and_then(|c| self.values[i].get(c).copied().flatten());
            for j in 0..self.cols.len() {
                let x0 = left + cell_w * j as i32;
                let rect = [(x0 + 1, y0 + 1), (x0 + cell_w - 1, y0 + cell_h - 1)];
                let v = self.values[i].get(j).copied().flatten();
                match v {
                    Some(v) => {
                        let fill = self.cell_colour(v, base);
                        area.draw(&Rectangle::new(rect, fill.filled())).draw_err()?;
                        let lum =
                            0.299 * fill.0 as f64 + 0.587 * fill.1 as f64 + 0.114 * fill.2 as f64;
                        let ink = if lum < 140.0 { WHITE } else { INK };
                        let cx = x0 + cell_w / 2;
                        let is_base = self.baseline_col[i] == Some(j);
                        let sub = if is_base {
                            Some("baseline".to_string())
                        } else {
                            base.filter(|b| *b > 0.0)
                                .map(|b| fmt_drop(Some((b - v) / b)))
                        };
                        let (vy, sy) = match sub {
                            Some(_) if cell_h >= 44 => (y0 + cell_h / 2 - 8, y0 + cell_h / 2 + 11),
                            _ => (y0 + cell_h / 2, 0),
                        };
                        area.draw(&Text::new(
                            format!("{v:.3}"),
                            (cx, vy),
                            value_style.color(&ink),
                        ))
                        .draw_err()?;
                        if let (Some(s), true) = (sub, sy > 0) {
                            area.draw(&Text::new(s, (cx, sy), small.color(&ink)))
                                .draw_err()?;
                        }
                        if is_base {
                            area.draw(&Rectangle::new(rect, INK.stroke_width(2)))
                                .draw_err()?;
                        }
                    }
                    None => {
                        area.draw(&Rectangle::new(rect, RGBColor(0xF2, 0xF2, 0xF2).filled()))
                            .draw_err()?;
                        area.draw(&Text::new(
                            "—",
                            (x0 + cell_w / 2, y0 + cell_h / 2),
                            value_style.color(&GREY),
                        ))
                        .draw_err()?;
                    }
                }
            }
        }
        let note = font(12.0).color(&GREY).pos(Pos::new(HPos::Left, VPos::Top));
        let ty = top + cell_h * nr + 12;
        let tol = if self.absolute {
            format!("baseline − {}", fmt_value(&self.tolerance))
        } else {
            format!("(1 − {}) · baseline", pct(self.tolerance))
        };
        let lines = [
            "Each cell: the task's verdict metric after that stage, and its change from the baseline (outlined).".to_string(),
            format!("Green: at or above {tol}; yellow → red: further below."),
        ];
        for (k, l) in lines.iter().enumerate() {
            let l = fit_text(&area, l, &note, w - 24);
            area.draw(&Text::new(l, (12, ty + 16 * k as i32), note.clone()))
                .draw_err()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Overlays (compare).

/// One line of an overlay: a run, or the mean of a seed group with its ± std band.
pub(crate) struct OverlaySeries {
    pub label: String,
    /// `(global epoch, mean, std)`; std is 0 for a single run.
    pub points: Vec<(f64, f64, f64)>,
    pub band: bool,
}

/// Several runs' values of one metric over global epochs.
pub(crate) struct OverlayChart {
    pub title: String,
    pub y_desc: String,
    pub stages: Vec<Stage>,
    pub last_epoch: usize,
    pub series: Vec<OverlaySeries>,
    /// The metric's chance level, when the runs agree on one.
    pub chance: Option<f64>,
}

impl Chart for OverlayChart {
    fn size(&self) -> (u32, u32) {
        overlay_size()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let area = titled(root, &self.title)?;
        let (w, _) = area.dim_in_pixel();
        let (plot, legend) = area.split_horizontally(w - LEGEND_W);
        let mut vals = Vec::new();
        for s in &self.series {
            for (_, m, sd) in &s.points {
                vals.push(m + sd);
                vals.push(m - sd);
            }
        }
        vals.extend(self.chance);
        let yr = y_range(&vals, 1.15);
        let mut chart = epoch_chart(
            &plot,
            None,
            self.last_epoch,
            yr,
            &self.y_desc,
            Some("global epoch"),
        )?;
        draw_stages(&mut chart, &self.stages, yr, true)?;
        let mut entries = Vec::new();
        for (i, s) in self.series.iter().enumerate() {
            let c = series_colour(i);
            if s.band && s.points.len() > 1 {
                let mut poly: Vec<(f64, f64)> =
                    s.points.iter().map(|(x, m, sd)| (*x, m + sd)).collect();
                poly.extend(s.points.iter().rev().map(|(x, m, sd)| (*x, m - sd)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
                    .draw_err()?;
            }
            let pts: Vec<(f64, f64)> = s.points.iter().map(|(x, m, _)| (*x, *m)).collect();
            draw_line(&mut chart, &pts, c, 2)?;
            entries.push(if s.band {
                LegendEntry {
                    swatch: Swatch::Band(c),
                    label: s.label.clone(),
                }
            } else {
                LegendEntry::line(c, s.label.clone(), markers_fit(&chart))
            });
        }
        if let Some(ch) = self.chance {
            let x = (0.5, self.last_epoch.max(1) as f64 + 0.5);
            draw_hline(&mut chart, ch, x, GREY.stroke_width(1), true)?;
            entries.push(LegendEntry::dashed(GREY, format!("chance {ch:.3}")));
        }
        draw_legend(&legend, &entries, 30)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

/// Draw a run's charts into `<run_dir>/plots/`; returns the written files and the PNG
/// bytes of each chart (for the report), keyed by file stem.
pub(crate) fn draw_run_plots(run: &RunData) -> Result<(Vec<PathBuf>, Pngs)> {
    let dir = run.dir.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let mut pngs = Vec::new();
    let mut emit = |stem: &str, files_now: Vec<PathBuf>| -> Result<()> {
        let png = &files_now[0];
        let bytes = std::fs::read(png).with_context(|| format!("reading {}", png.display()))?;
        pngs.push((stem.to_string(), bytes));
        files.extend(files_now);
        Ok(())
    };
    if let Some(c) = LossChart::from_run(run) {
        emit("loss", save_chart(&c, &dir, "loss")?)?;
    }
    if let Some(c) = MetricsChart::from_run(run) {
        emit("metrics", save_chart(&c, &dir, "metrics")?)?;
    }
    if let Some(c) = MatrixChart::from_run(run) {
        emit("matrix", save_chart(&c, &dir, "matrix")?)?;
    }
    Ok((files, pngs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_labels_are_whole_numbers() {
        assert_eq!(fmt_epoch(&5.0), "5");
        assert_eq!(fmt_epoch(&5.5), "");
    }

    #[test]
    fn the_embedded_font_measures_text() {
        ensure_font();
        let mut buf = vec![0u8; 200 * 50 * 3];
        let root = BitMapBackend::with_buffer(&mut buf, (200, 50)).into_drawing_area();
        let (w, h) = root.estimate_text_size("epoch", &font(14.0)).unwrap();
        assert!(w > 20 && h > 5, "{w}x{h}");
    }
}
