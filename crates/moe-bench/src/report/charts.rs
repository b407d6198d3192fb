//! SVG charts for the reports, drawn with `plotters` (its SVG backend: text stays SVG text, so a
//! chart needs no font files): lines over a numeric x axis (optionally logarithmic) and grouped
//! bars over named groups. Each returns the `<svg>` element as a string.

use plotters::prelude::*;

/// Chart size in pixels.
const SIZE: (u32, u32) = (760, 420);

/// The colour of series `i` (a palette that stays apart in print and for common colour blindness).
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(0, 114, 178),
        RGBColor(230, 159, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(86, 180, 233),
        RGBColor(213, 94, 0),
        RGBColor(120, 120, 120),
        RGBColor(240, 228, 66),
    ];
    PALETTE[i % PALETTE.len()]
}

/// One line of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed, without markers (a ceiling such as a roofline).
    pub ceiling: bool,
}

/// The axes of a line chart.
#[derive(Clone, Debug)]
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-9);
        ((lo - pad).min(0.0), hi + pad)
    }
}

/// A tick label: whole numbers without decimals, small ones with two significant digits.
fn tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// A line chart; markers on measured series, dashes on ceilings, a legend.
pub fn line_chart(axes: &Axes<'_>, series: &[Series]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), axes.log_x);
        let (y0, y1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), axes.log_y);
        let mut builder = ChartBuilder::on(&root);
        builder.caption(axes.title, ("sans-serif", 20)).margin(12).x_label_area_size(44).y_label_area_size(70);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(axes.x)
                    .y_desc(axes.y)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .light_line_style(RGBColor(242, 242, 242))
                    .label_style(("sans-serif", 13))
                    .draw()
                    .map_err(draw_err)?;
                for (i, s) in series.iter().enumerate() {
                    let c = colour(i);
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|p| p.0.is_finite() && p.1.is_finite() && (!axes.log_y || p.1 > 0.0))
                        .collect();
                    if s.ceiling {
                        chart
                            .draw_series(DashedLineSeries::new(pts.clone(), 8, 5, c.stroke_width(2)))
                            .map_err(draw_err)?
                            .label(s.name.clone())
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                    } else {
                        chart
                            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                            .map_err(draw_err)?
                            .label(s.name.clone())
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(draw_err)?;
                    }
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 13))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(draw_err)?;
            }};
        }
        match (axes.log_x, axes.log_y) {
            (true, true) => {
                draw!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(draw_err)?)
            }
            (true, false) => draw!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(draw_err)?),
            (false, true) => draw!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(draw_err)?),
            (false, false) => draw!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(draw_err)?),
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A grouped bar chart: for each group (x label), one bar per series value, with a legend.
pub fn bar_chart(title: &str, y: &str, series: &[String], groups: &[(String, Vec<f64>)]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let top = groups.iter().flat_map(|g| g.1.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        let n = groups.len().max(1);
        let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..n as f64, 0.0..(top * 1.15).max(1e-9))
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.26 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(draw_err)?;
        let k = series.len().max(1) as f64;
        for (s, name) in series.iter().enumerate() {
            let c = colour(s);
            let bars = groups.iter().enumerate().filter_map(|(g, (_, values))| {
                let v = *values.get(s)?;
                v.is_finite().then(|| {
                    let x0 = g as f64 + 0.1 + 0.8 * s as f64 / k;
                    Rectangle::new([(x0, 0.0), (x0 + 0.8 / k * 0.92, v)], c.filled())
                })
            });
            chart
                .draw_series(bars)
                .map_err(draw_err)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_titles_and_legends() {
        let axes = Axes { title: "Decode", x: "batch", y: "tokens/s", log_x: true, log_y: true };
        let s = vec![
            Series { name: "embedded".into(), points: vec![(1.0, 70.0), (16.0, 280.0), (64.0, 440.0)], ceiling: false },
            Series { name: "roofline".into(), points: vec![(1.0, 120.0), (64.0, 7000.0)], ceiling: true },
        ];
        let svg = line_chart(&axes, &s).expect("chart");
        assert!(svg.starts_with("<svg") && svg.contains("Decode") && svg.contains("roofline"));
        assert!(svg.matches("<circle").count() >= 3, "markers on the measured series");
        let bars =
            bar_chart("Prefill", "tokens/s", &["moe".into()], &[("embedded".into(), vec![700.0])]).expect("bars");
        assert!(bars.contains("<rect") && bars.contains("embedded"));
    }
}
