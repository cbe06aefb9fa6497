//! A small line chart as SVG: several series over shared x positions
//! (releases, oldest first), a y axis fitted to the values, an optional
//! threshold line, and marked points (breaches, rolled-back releases).

use std::fmt::Write;

use super::format::{escape, number};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 44.0;

pub(crate) struct Series {
    pub(crate) name: String,
    /// One value per x position; `None` where the series has no value.
    pub(crate) values: Vec<Option<f64>>,
}

pub(crate) struct Chart {
    pub(crate) title: String,
    /// A label per x position.
    pub(crate) labels: Vec<String>,
    pub(crate) series: Vec<Series>,
    /// x positions drawn as marked (e.g. releases that were rolled back).
    pub(crate) marked: Vec<usize>,
    pub(crate) threshold: Option<f64>,
}

pub(crate) fn svg(chart: &Chart) -> String {
    let values = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .chain(chart.threshold)
        .filter(|v| v.is_finite());
    let (mut low, mut high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !low.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    if high - low < 1e-9 {
        low -= 0.5;
        high += 0.5;
    }
    let margin = (high - low) * 0.08;
    let (low, high) = (low - margin, high + margin);
    let n = chart.labels.len().max(1);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |i: usize| {
        if n == 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| TOP + plot_h * (1.0 - (v - low) / (high - low));
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label=""#
    );
    escape(&chart.title, &mut out);
    out.push_str(r#""><title>"#);
    escape(&chart.title, &mut out);
    out.push_str("</title>");
    // Enough decimals to tell the ticks apart, no more.
    let decimals = (2.0 - (high - low).log10().floor()).clamp(0.0, 6.0) as usize;
    for tick in 0..=4 {
        let v = low + (high - low) * tick as f64 / 4.0;
        let ty = y(v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{v:.decimals$}</text>"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
        );
    }
    for &i in &chart.marked {
        let mx = x(i);
        let _ = write!(
            out,
            r#"<line class="mark" x1="{mx:.1}" x2="{mx:.1}" y1="{TOP}" y2="{:.1}"/>"#,
            TOP + plot_h
        );
    }
    if let Some(threshold) = chart.threshold {
        let ty = y(threshold);
        let _ = write!(
            out,
            r#"<line class="threshold" x1="{LEFT}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}"><title>threshold {}</title></line>"#,
            WIDTH - RIGHT,
            number(threshold)
        );
    }
    for (i, label) in chart.labels.iter().enumerate() {
        let _ = write!(
            out,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">"#,
            x(i),
            HEIGHT - BOTTOM + 16.0
        );
        escape(label, &mut out);
        out.push_str("</text>");
    }
    for (k, series) in chart.series.iter().enumerate() {
        let class = format!("s{}", k % 6);
        let mut path = String::new();
        let mut pen_up = true;
        for (i, value) in series.values.iter().enumerate() {
            match value.filter(|v| v.is_finite()) {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_up { "M" } else { "L" },
                        x(i),
                        y(v)
                    );
                    pen_up = false;
                }
                None => pen_up = true,
            }
        }
        let _ = write!(
            out,
            r#"<path class="line {class}" d="{}"/>"#,
            path.trim_end()
        );
        for (i, value) in series.values.iter().enumerate() {
            if let Some(v) = value.filter(|v| v.is_finite()) {
                let _ = write!(
                    out,
                    r#"<circle class="dot {class}" cx="{:.1}" cy="{:.1}" r="3.5"><title>"#,
                    x(i),
                    y(v)
                );
                escape(&series.name, &mut out);
                let _ = write!(out, " {} at ", number(v));
                escape(
                    &chart.labels[i.min(chart.labels.len().saturating_sub(1))],
                    &mut out,
                );
                out.push_str("</title></circle>");
            }
        }
        let _ = write!(
            out,
            r#"<text class="legend {class}" x="{:.1}" y="{:.1}">"#,
            LEFT + (k as f64) * 120.0,
            HEIGHT - 8.0
        );
        escape(&series.name, &mut out);
        out.push_str("</text>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_threshold_and_marks_are_drawn() {
        let chart = Chart {
            title: "recall".into(),
            labels: vec!["#1".into(), "#2".into(), "#3".into()],
            series: vec![Series {
                name: "recall".into(),
                values: vec![Some(0.8), None, Some(0.6)],
            }],
            marked: vec![2],
            threshold: Some(0.5),
        };
        let svg = svg(&chart);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(
            svg.matches(" M").count() + svg.matches("\"M").count(),
            2,
            "a gap lifts the pen"
        );
        assert!(svg.contains("class=\"threshold\""));
        assert!(svg.contains("class=\"mark\""));
    }
}
