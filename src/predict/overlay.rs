//! The overlay picture of one prediction: the image (scaled so that its longer side is
//! between [`MIN_SIDE`] and [`MAX_SIDE`] pixels, so that labels stay readable on tiny images
//! and files stay small for huge ones), masks blended in the VOC palette, boxes with their
//! labels, and a caption strip below the image with one line per legend (wrapped).
//!
//! Text is drawn with the DejaVu font embedded in the binary through the report's glyph
//! layout ([`crate::report::glyphs`]), so no system fonts are needed.

use anyhow::{anyhow, Result};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::FontDesc;

use crate::data::imageio::voc_palette;
use crate::report::glyphs::CrispText;
use crate::report::plot::{ensure_font, series_colour, FONT_FAMILY};
use crate::tasks::Mark;

/// The overlay's longer side is at least this many pixels (small images are scaled up).
pub const MIN_SIDE: u32 = 480;
/// The overlay's longer side is at most this many pixels (large images are scaled down).
pub const MAX_SIDE: u32 = 1280;
/// Opacity of the mask colours over the image.
pub const MASK_ALPHA: f32 = 0.5;

const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);

/// The scale from original-image pixels to overlay pixels for a `w × h` image.
pub fn scale_for(w: u32, h: u32) -> f32 {
    let long = w.max(h).max(1) as f32;
    if long < MIN_SIDE as f32 {
        MIN_SIDE as f32 / long
    } else if long > MAX_SIDE as f32 {
        MAX_SIDE as f32 / long
    } else {
        1.0
    }
}

/// Black or white, whichever reads better on `c`.
fn text_on(c: RGBColor) -> RGBColor {
    let l = 0.299 * c.0 as f32 + 0.587 * c.1 as f32 + 0.114 * c.2 as f32;
    if l > 150.0 {
        BLACK
    } else {
        WHITE
    }
}

/// One element of a caption line: a colour swatch or a run of text.
enum Piece {
    Swatch(RGBColor),
    Text(String, RGBColor),
}

/// Draw `marks` over `img`; returns the overlay picture.
pub fn render(img: &RgbImage, marks: &[Mark]) -> Result<RgbImage> {
    ensure_font();
    let (w, h) = img.dimensions();
    let f = scale_for(w, h);
    let (cw, ch) = (
        ((w as f32 * f).round() as u32).max(1),
        ((h as f32 * f).round() as u32).max(1),
    );
    let mut canvas = if (cw, ch) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, cw, ch, image::imageops::FilterType::Triangle)
    };
    for m in marks {
        if let Mark::Mask {
            width,
            height,
            classes,
        } = m
        {
            blend_mask(&mut canvas, *width, *height, classes)?;
        }
    }

    // Text sizes from the canvas: readable at MIN_SIDE, not huge at MAX_SIDE.
    let font_px = (cw.max(ch) as f64 / 40.0).clamp(13.0, 26.0);
    let font = FontDesc::from((FONT_FAMILY, font_px));
    let measure = |t: &str| -> (i32, i32) {
        font.box_size(t)
            .map(|(a, b)| (a as i32, b as i32))
            .unwrap_or(((t.len() as f64 * font_px * 0.6) as i32, font_px as i32))
    };
    let pad = (font_px * 0.4).round() as i32;
    let line_h = (font_px * 1.5).round() as i32;

    let lines = caption_lines(marks, cw as i32, font_px, pad, &measure);
    let strip = if lines.is_empty() {
        0
    } else {
        lines.len() as i32 * line_h + 2 * pad
    };
    let (ow, oh) = (cw, ch + strip as u32);
    let mut buf = vec![255u8; ow as usize * oh as usize * 3];
    buf[..canvas.as_raw().len()].copy_from_slice(canvas.as_raw());
    {
        let root = CrispText(BitMapBackend::with_buffer(&mut buf, (ow, oh))).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the overlay failed: {e}");
        let thick = ((cw.max(ch) as f32 / 320.0).round() as i32).max(2);
        for m in marks {
            let Mark::Box {
                bbox,
                label,
                colour,
            } = m
            else {
                continue;
            };
            let c = series_colour(*colour);
            let [x0, y0, x1, y1] = bbox.map(|v| (v * f).round() as i32);
            // The outline: four filled bands of `thick` pixels inside the box's edges.
            for r in [
                [(x0, y0), (x1, y0 + thick)],
                [(x0, y1 - thick), (x1, y1)],
                [(x0, y0), (x0 + thick, y1)],
                [(x1 - thick, y0), (x1, y1)],
            ] {
                root.draw(&Rectangle::new(r, c.filled())).map_err(err)?;
            }
            let (tw, _) = measure(label);
            let lh = line_h - pad / 2;
            // Above the box when there is room, else inside its top edge; kept on the canvas.
            let ly = if y0 - lh >= 0 { y0 - lh } else { y0 };
            let lx = x0.min(cw as i32 - tw - pad).max(0);
            root.draw(&Rectangle::new(
                [(lx, ly), (lx + tw + pad, ly + lh)],
                c.filled(),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                label.clone(),
                (lx + pad / 2, ly + (lh - font_px as i32) / 2),
                font.color(&text_on(c)),
            ))
            .map_err(err)?;
        }
        for (i, line) in lines.iter().enumerate() {
            let y = ch as i32 + pad + i as i32 * line_h;
            let ty = y + (line_h - font_px as i32) / 2;
            for (x, piece) in line {
                match piece {
                    Piece::Swatch(c) => {
                        let s = font_px as i32;
                        root.draw(&Rectangle::new([(*x, ty), (x + s, ty + s)], c.filled()))
                            .map_err(err)?;
                        root.draw(&Rectangle::new(
                            [(*x, ty), (x + s, ty + s)],
                            INK.stroke_width(1),
                        ))
                        .map_err(err)?;
                    }
                    Piece::Text(t, c) => {
                        root.draw(&Text::new(t.clone(), (*x, ty), font.color(c)))
                            .map_err(err)?;
                    }
                }
            }
        }
        root.present().map_err(err)?;
    }
    RgbImage::from_raw(ow, oh, buf).ok_or_else(|| anyhow!("overlay buffer of the wrong size"))
}

/// The legends' caption lines, wrapped to `width`: each a list of (x, piece).
fn caption_lines(
    marks: &[Mark],
    width: i32,
    font_px: f64,
    pad: i32,
    measure: &dyn Fn(&str) -> (i32, i32),
) -> Vec<Vec<(i32, Piece)>> {
    let mut lines: Vec<Vec<(i32, Piece)>> = Vec::new();
    for m in marks {
        let Mark::Legend { title, items } = m else {
            continue;
        };
        let mut line: Vec<(i32, Piece)> = Vec::new();
        let mut x = pad;
        let title = format!("{title}:");
        let tw = measure(&title).0;
        line.push((x, Piece::Text(title, INK)));
        x += tw + pad;
        for (text, swatch) in items {
            let sw = if swatch.is_some() {
                font_px as i32 + pad / 2
            } else {
                0
            };
            let need = sw + measure(text).0;
            if x + need > width - pad && line.len() > 1 {
                lines.push(std::mem::take(&mut line));
                x = pad + tw + pad;
            }
            if let Some([r, g, b]) = swatch {
                line.push((x, Piece::Swatch(RGBColor(*r, *g, *b))));
            }
            line.push((x + sw, Piece::Text(text.clone(), INK)));
            x += need + 2 * pad;
        }
        lines.push(line);
    }
    lines
}

/// Blend a `mw × mh` class map over `canvas` (nearest sample per canvas pixel); classes 0
/// (background) and 255 (ignore) are left clear.
fn blend_mask(canvas: &mut RgbImage, mw: u32, mh: u32, classes: &[u8]) -> Result<()> {
    anyhow::ensure!(
        classes.len() == mw as usize * mh as usize && mw > 0 && mh > 0,
        "overlay: mask of {} values is not {mw} × {mh}",
        classes.len()
    );
    let pal = voc_palette();
    let (cw, ch) = canvas.dimensions();
    let xs: Vec<usize> = (0..cw)
        .map(|x| (((2 * x + 1) as u64 * mw as u64 / (2 * cw as u64)) as usize).min(mw as usize - 1))
        .collect();
    for y in 0..ch {
        let my = (((2 * y + 1) as u64 * mh as u64 / (2 * ch as u64)) as usize).min(mh as usize - 1);
        let row = &classes[my * mw as usize..][..mw as usize];
        for (x, &mx) in xs.iter().enumerate() {
            let c = row[mx] as usize;
            if c == 0 || c == 255 {
                continue;
            }
            let p = canvas.get_pixel_mut(x as u32, y);
            for k in 0..3 {
                let v = (1.0 - MASK_ALPHA) * p.0[k] as f32 + MASK_ALPHA * pal[3 * c + k] as f32;
                p.0[k] = v.round() as u8;
            }
        }
    }
    Ok(())
}

/// PNG bytes of an RGB picture.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_draws_mask_boxes_and_caption() {
        // A 40 × 20 grey image, right half class 15 (person), one box, two legends.
        let img = RgbImage::from_pixel(40, 20, image::Rgb([128, 128, 128]));
        let classes: Vec<u8> = (0..40 * 20)
            .map(|i| if i % 40 >= 20 { 15 } else { 0 })
            .collect();
        let marks = vec![
            Mark::Mask {
                width: 40,
                height: 20,
                classes,
            },
            Mark::Box {
                bbox: [2.0, 2.0, 15.0, 18.0],
                label: "dog 0.91".into(),
                colour: 1,
            },
            Mark::Legend {
                title: "seg".into(),
                items: vec![("person 50%".into(), Some([192, 128, 128]))],
            },
            Mark::Legend {
                title: "cls".into(),
                items: vec![("a 80%".into(), None), ("b 15%".into(), None)],
            },
        ];
        let out = render(&img, &marks).unwrap();
        let f = scale_for(40, 20);
        assert_eq!(f, 12.0);
        assert_eq!(out.width(), 480);
        assert!(out.height() > 240, "a caption strip below the image");
        // Left half: grey, untouched (away from the box); right half: blended with the
        // person colour (192, 128, 128) at 50 %.
        assert_eq!(out.get_pixel(220, 200).0, [128, 128, 128]);
        assert_eq!(out.get_pixel(470, 200).0, [160, 128, 128]);
        // The box's left edge in its colour.
        let c = series_colour(1);
        assert_eq!(out.get_pixel(25, 120).0, [c.0, c.1, c.2]);
        // The caption strip has dark text on white.
        let strip: Vec<_> = (240..out.height())
            .flat_map(|y| (0..480).map(move |x| (x, y)))
            .map(|(x, y)| out.get_pixel(x, y).0)
            .collect();
        assert!(strip.iter().any(|p| p[0] < 80));
        assert!(strip.iter().filter(|p| **p == [255, 255, 255]).count() > strip.len() / 2);
        assert!(!encode_png(&out).unwrap().is_empty());
    }
}
