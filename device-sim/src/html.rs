//! `--html FILE.html`: one self-contained page about a fleet run, to look at in any browser
//! without a network: inline CSS and inline SVG charts drawn here (no script, no font, no
//! image, no link to anything), built by a pure function from the [`Report`] and the
//! [`TimeSeries`].
//!
//! Charts: throughput over time, uplink latency over time, devices connected and asleep
//! over time, the uplink and downlink latency distributions (percentile curves from the
//! HDR histograms), and the gateway's gauges over time when its metrics were scraped;
//! then the summary table (the rows of the text table) and the gateway's counters.
//!
//! Every text that comes from outside the simulator (group names from a scenario file,
//! addresses, metric names and errors from a gateway) goes through [`escape`].

use std::fmt::Write as _;

use crate::gateway_metrics::{number, GatewayMetrics};
use crate::report::{GroupReport, Latency, Report, Row};
use crate::timeseries::TimeSeries;

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Line colours, in order (distinguishable, and readable printed in grey).
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Gauge series drawn at most in the gateway chart.
const MAX_GAUGE_LINES: usize = 8;

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 4px; }
h2 { font-size: 1.15em; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1em; margin: 12px 0 4px; }
.meta { color: #555; margin: 2px 0; }
.verdict { display: inline-block; padding: 4px 10px; border-radius: 4px; font-weight: 600; margin: 8px 0; }
.ok { background: #e3f4e1; color: #1b5e20; }
.broken { background: #fde2e1; color: #b71c1c; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 12px 24px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 2px; }
svg.chart { width: 100%; height: auto; background: #fff; border: 1px solid #e4e4e4; }
svg.chart text { font-size: 11px; fill: #444; }
svg.chart .grid line { stroke: #eee; }
svg.chart .axis { stroke: #888; }
svg.chart polyline { fill: none; stroke-width: 1.8; }
svg.chart .marker { stroke: #999; stroke-dasharray: 4 3; }
.legend { font-size: 12px; margin: 2px 0 6px; }
.legend span { margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 10px; border-bottom: 1px solid #eee; }
thead th { text-align: right; border-bottom: 2px solid #ccc; }
tbody th { text-align: left; font-weight: normal; }
td { text-align: right; }
tr.guarantee th { font-weight: 600; }
ul.notes { font-size: 13px; }
.empty { color: #888; font-style: italic; }
";

/// Points per line at most in the charts over time: a day-long soak has 86,400 samples,
/// more than a chart 560 units wide can show.
const MAX_POINTS: usize = 1_500;

/// The whole page.
pub fn page(report: &Report, series: &TimeSeries) -> String {
    let series = &series.thinned(MAX_POINTS);
    let mut out = String::new();
    let title = format!("mqtt-sn-sim run {}", report.run_id);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    let _ = writeln!(out, "<h1>{}</h1>", escape(&title));
    let _ = writeln!(
        out,
        "<p class=\"meta\">gateway <b>{}</b>, broker <b>{}</b>, seed {}</p>",
        escape(&report.gateway),
        escape(&report.broker),
        report.seed
    );
    let t = &report.total.counts;
    let _ = writeln!(
        out,
        "<p class=\"meta\">{} devices, {:.0} s publishing, {:.1} s in all; {} published, {} acknowledged{}</p>",
        t.devices,
        report.duration_s,
        report.elapsed_s,
        t.published,
        t.acknowledged,
        if report.verified {
            format!(", {} arrived at the broker, {} lost", t.arrived, t.lost)
        } else {
            ", not verified at a broker".into()
        }
    );
    if report.ok() {
        out.push_str("<p class=\"verdict ok\">QoS 1/2 guarantees: all held</p>\n");
    } else {
        let _ = writeln!(
            out,
            "<p class=\"verdict broken\">QoS 1/2 guarantees: {} BROKEN</p>",
            report.guarantees_broken
        );
    }

    out.push_str("<h2>Over time</h2>\n<div class=\"grid\">\n");
    out.push_str(&throughput_chart(report, series));
    out.push_str(&latency_over_time_chart(series));
    out.push_str(&devices_chart(series));
    if let Some(m) = &report.gateway_metrics {
        out.push_str(&gauges_chart(m, series));
    }
    out.push_str("</div>\n");

    out.push_str("<h2>Latency distribution</h2>\n<div class=\"grid\">\n");
    out.push_str(&distribution_chart(
        "uplink-distribution",
        "Uplink: device publish to arrival at the broker",
        report,
        |g| &g.uplink_latency,
    ));
    out.push_str(&distribution_chart(
        "downlink-distribution",
        "Downlink: broker publish to arrival at the device (time asleep included)",
        report,
        |g| &g.downlink_latency,
    ));
    out.push_str("</div>\n");

    out.push_str("<h2>Summary</h2>\n");
    out.push_str(&summary_table(report));
    let notes = report.notes();
    if !notes.is_empty() {
        out.push_str("<ul class=\"notes\">\n");
        for n in &notes {
            let _ = writeln!(out, "<li>{}</li>", escape(n.trim()));
        }
        out.push_str("</ul>\n");
    }
    if let Some(m) = &report.gateway_metrics {
        out.push_str(&gateway_tables(m));
    }
    out.push_str("</body>\n</html>\n");
    out
}

fn summary_table(report: &Report) -> String {
    let s = report.summary();
    let mut out = String::from("<table id=\"summary\">\n<thead><tr><th></th>");
    for c in &s.columns {
        let _ = write!(out, "<th scope=\"col\">{}</th>", escape(c));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for Row {
        label: name,
        values: cells,
        guarantee,
    } in &s.rows
    {
        let _ = write!(
            out,
            "<tr{}><th scope=\"row\">{}</th>",
            if *guarantee { " class=\"guarantee\"" } else { "" },
            escape(name.trim())
        );
        for c in cells {
            let _ = write!(out, "<td>{}</td>", escape(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    out
}

fn gateway_tables(m: &GatewayMetrics) -> String {
    let mut out = String::from("<h2>Gateway metrics</h2>\n");
    let _ = writeln!(
        out,
        "<p class=\"meta\">{} scraped: {} scrapes, {} failed{}{}</p>",
        escape(&m.url),
        m.scrapes,
        m.scrape_failures,
        match &m.last_error {
            Some(e) => format!(" (last failure: {})", escape(e)),
            None => String::new(),
        },
        if m.bad_lines > 0 {
            format!("; {} lines skipped that did not parse", m.bad_lines)
        } else {
            String::new()
        }
    );
    if m.scrapes == 0 {
        return out;
    }
    out.push_str("<div class=\"grid\">\n<div>\n<h3>Counters: increase over the run</h3>\n");
    out.push_str(
        "<table id=\"gateway-counters\">\n<thead><tr><th>counter</th><th>increase</th></tr></thead>\n<tbody>\n",
    );
    // The ones that moved first: they are the run's story.
    let mut counters: Vec<(&String, &f64)> = m.counters.iter().collect();
    counters.sort_by_key(|(_, v)| **v == 0.0);
    for (k, v) in counters {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            escape(k),
            number(*v)
        );
    }
    out.push_str("</tbody>\n</table>\n</div>\n<div>\n<h3>Gauges</h3>\n");
    out.push_str("<table id=\"gateway-gauges\">\n<thead><tr><th>gauge</th><th>first</th><th>min</th><th>max</th><th>last</th></tr></thead>\n<tbody>\n");
    for (k, g) in &m.gauges {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(k),
            number(g.first),
            number(g.min),
            number(g.max),
            number(g.last)
        );
    }
    out.push_str("</tbody>\n</table>\n</div>\n</div>\n");
    out
}

fn markers(series: &TimeSeries) -> Vec<(f64, &'static str)> {
    vec![
        (series.ramp_end_s, "ramp end"),
        (series.publish_end_s, "publishing end"),
        (series.drain_end_s, "drain end"),
    ]
}

fn throughput_chart(report: &Report, series: &TimeSeries) -> String {
    let mut lines = vec![Line::new("published / s", series.rate(|s| Some(s.published)))];
    if report.verified {
        lines.push(Line::new("arrived at the broker / s", series.rate(|s| s.arrived)));
    }
    lines.push(Line::new("acknowledged / s", series.rate(|s| Some(s.acknowledged))));
    let mut out = Chart {
        id: "throughput",
        title: "Uplink throughput (messages per second)",
        x_label: "seconds since the start",
        y_label: "msg/s",
        x_axis: XAxis::Time(end(series)),
        lines,
        markers: markers(series),
    }
    .render();
    // Apart: the broker side sends in bursts, every downlink interval, which would flatten
    // the uplink's lines.
    if report.total.counts.downlink_sent > 0 {
        out.push_str(
            &Chart {
                id: "downlink-throughput",
                title: "Downlink throughput (messages per second)",
                x_label: "seconds since the start",
                y_label: "msg/s",
                x_axis: XAxis::Time(end(series)),
                lines: vec![
                    Line::new("downlink sent / s", series.rate(|s| Some(s.downlink_sent))),
                    Line::new("downlink received / s", series.rate(|s| Some(s.downlink_received))),
                ],
                markers: markers(series),
            }
            .render(),
        );
    }
    out
}

/// The time axis' end: the last sample.
fn end(series: &TimeSeries) -> f64 {
    series.samples.last().map_or(1.0, |s| s.elapsed_s)
}

fn latency_over_time_chart(series: &TimeSeries) -> String {
    let pick = |f: fn(&crate::timeseries::Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        series
            .samples
            .iter()
            .map(|s| (s.elapsed_s, f(s).unwrap_or(f64::NAN)))
            .collect()
    };
    Chart {
        id: "latency-over-time",
        title: "Uplink latency over time (of the messages that arrived in each second)",
        x_label: "seconds since the start",
        y_label: "ms",
        x_axis: XAxis::Time(end(series)),
        lines: vec![
            Line::new("p50", pick(|s| s.uplink_p50_ms)),
            Line::new("p90", pick(|s| s.uplink_p90_ms)),
            Line::new("p99", pick(|s| s.uplink_p99_ms)),
        ],
        markers: markers(series),
    }
    .render()
}

fn devices_chart(series: &TimeSeries) -> String {
    let pick = |f: fn(&crate::timeseries::Sample) -> u64| -> Vec<(f64, f64)> {
        series.samples.iter().map(|s| (s.elapsed_s, f(s) as f64)).collect()
    };
    Chart {
        id: "devices",
        title: "Devices connected (awake) and asleep",
        x_label: "seconds since the start",
        y_label: "devices",
        x_axis: XAxis::Time(end(series)),
        lines: vec![
            Line::new("connected", pick(|s| s.connected)),
            Line::new("asleep", pick(|s| s.asleep)),
        ],
        markers: markers(series),
    }
    .render()
}

fn gauges_chart(m: &GatewayMetrics, series: &TimeSeries) -> String {
    // Sessions by state first (what an operator watches), then whatever else moved (a
    // flat line, such as a configuration gauge, says nothing over time; it is in the table).
    let mut keys: Vec<&String> = m
        .gauges
        .iter()
        .filter(|(_, g)| !g.points.is_empty() && g.min != g.max)
        .map(|(k, _)| k)
        .collect();
    keys.sort_by_key(|k| !k.contains("session"));
    let lines = keys
        .into_iter()
        .take(MAX_GAUGE_LINES)
        .filter_map(|k| {
            let g = m.gauges.get(k)?;
            Some(Line::new(k, g.points.iter().map(|p| (p[0], p[1])).collect()))
        })
        .collect();
    Chart {
        id: "gateway-gauges",
        title: "Gateway gauges that moved (scraped)",
        x_label: "seconds since the start",
        y_label: "value",
        x_axis: XAxis::Time(end(series)),
        lines,
        markers: markers(series),
    }
    .render()
}

fn distribution_chart(
    id: &'static str,
    title: &'static str,
    report: &Report,
    f: fn(&GroupReport) -> &Latency,
) -> String {
    let mut groups: Vec<&GroupReport> = report.groups.iter().collect();
    if report.groups.len() > 1 {
        groups.push(&report.total);
    }
    let lines = groups
        .into_iter()
        .filter(|g| f(g).samples > 0)
        .map(|g| {
            let l = f(g);
            let points = l.distribution.iter().map(|p| (nines(p.percentile), p.ms)).collect();
            Line::new(
                &format!("{} ({} samples, max {:.1} ms)", g.name, l.samples, l.max_ms),
                points,
            )
        })
        .collect();
    Chart {
        id,
        title,
        x_label: "percentile",
        y_label: "ms",
        x_axis: XAxis::Nines,
        lines,
        markers: Vec::new(),
    }
    .render()
}

/// A percentile's position on the "number of nines" axis: 0 % at 0, 90 % at 1, 99 % at 2.
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-9);
    -rest.log10()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum XAxis {
    /// Seconds, from 0 to the given end.
    Time(f64),
    /// Percentiles on the nines axis ([`nines`]).
    Nines,
}

struct Line {
    name: String,
    /// (x, y); a NaN y breaks the line.
    points: Vec<(f64, f64)>,
}

impl Line {
    fn new(name: &str, points: Vec<(f64, f64)>) -> Self {
        Line {
            name: name.to_string(),
            points,
        }
    }
}

struct Chart {
    id: &'static str,
    title: &'static str,
    x_label: &'static str,
    y_label: &'static str,
    x_axis: XAxis,
    lines: Vec<Line>,
    markers: Vec<(f64, &'static str)>,
}

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 38.0;

/// A step of 1, 2 or 5 times a power of ten giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let unit = if r < 1.5 {
        1.0
    } else if r < 3.0 {
        2.0
    } else if r < 7.0 {
        5.0
    } else {
        10.0
    };
    unit * mag
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
        format!("{v:.decimals$}")
    }
}

impl Chart {
    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<figure id=\"{}\">\n<figcaption>{}</figcaption>",
            self.id,
            escape(self.title)
        );
        let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
        let all: Vec<(f64, f64)> = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().filter(finite).copied())
            .collect();
        if all.is_empty() {
            let _ = writeln!(out, "<p class=\"empty\">no data</p>\n</figure>");
            return out;
        }
        out.push_str("<div class=\"legend\">");
        for (i, l) in self.lines.iter().enumerate() {
            let _ = write!(
                out,
                "<span><i style=\"background:{}\"></i>{}</span>",
                COLOURS[i % COLOURS.len()],
                escape(&l.name)
            );
        }
        out.push_str("</div>\n");
        let (x_min, x_max) = match self.x_axis {
            XAxis::Time(end) => (0.0, all.iter().map(|p| p.0).fold(end, f64::max).max(1.0)),
            // Rounded first: 99.999 % sits at 5.000000000004.
            XAxis::Nines => (
                0.0,
                ((all.iter().map(|p| p.0).fold(1.0, f64::max) * 1e6).round() / 1e6).ceil(),
            ),
        };
        let y_data = all.iter().map(|p| p.1).fold(0.0, f64::max);
        let y_step = tick_step(y_data);
        let y_max = if y_data > 0.0 {
            (y_data / y_step).ceil() * y_step
        } else {
            1.0
        };
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min).max(f64::MIN_POSITIVE) * plot_w;
        let sy = |y: f64| TOP + plot_h - (y / y_max) * plot_h;
        let _ = writeln!(
            out,
            "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">",
            escape(self.title)
        );
        // Grid and y ticks.
        out.push_str("<g class=\"grid\">");
        let mut y = 0.0;
        while y <= y_max + y_step / 2.0 {
            let py = sy(y);
            let _ = write!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                WIDTH - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                tick_label(y, y_step)
            );
            y += y_step;
        }
        // X ticks.
        match self.x_axis {
            XAxis::Time(_) => {
                let step = tick_step(x_max);
                let mut x = 0.0;
                while x <= x_max + step / 100.0 {
                    let px = sx(x);
                    let _ = write!(
                        out,
                        "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                        TOP + plot_h,
                        TOP + plot_h + 14.0,
                        tick_label(x, step)
                    );
                    x += step;
                }
            }
            XAxis::Nines => {
                let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
                let last = x_max as usize;
                for (k, label) in labels.iter().enumerate().take(last + 1) {
                    let px = sx(k as f64);
                    let anchor = if k == last { "end" } else { "middle" };
                    let _ = write!(
                        out,
                        "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{label}</text>",
                        TOP + plot_h,
                        TOP + plot_h + 14.0
                    );
                }
            }
        }
        out.push_str("</g>\n");
        // Axes and their labels.
        let _ = writeln!(
            out,
            "<path class=\"axis\" d=\"M{LEFT} {TOP} V{:.1} H{:.1}\" fill=\"none\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            TOP + plot_h,
            WIDTH - RIGHT,
            LEFT + plot_w / 2.0,
            HEIGHT - 6.0,
            escape(self.x_label),
            TOP + plot_h / 2.0,
            escape(self.y_label)
        );
        let mut row = 0;
        for (x, label) in &self.markers {
            if x.is_finite() && *x > x_min && *x < x_max {
                let px = sx(*x);
                // Labels near the right edge go to the left of their line; labels of
                // markers close together step down so that they do not overlap.
                let (tx, anchor) = if px > LEFT + plot_w * 0.8 {
                    (px - 3.0, "end")
                } else {
                    (px + 3.0, "start")
                };
                let _ = writeln!(
                    out,
                    "<line class=\"marker\" x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/><text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
                    TOP + plot_h,
                    TOP + 10.0 + 12.0 * row as f64,
                    escape(label)
                );
                row += 1;
            }
        }
        // The data: one polyline per unbroken stretch, a dot for a lone point.
        for (i, l) in self.lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let _ = write!(out, "<g class=\"series\" data-name=\"{}\">", escape(&l.name));
            for run in l.points.split(|p| !(p.0.is_finite() && p.1.is_finite())) {
                match run {
                    [] => {}
                    [(x, y)] => {
                        let _ = write!(
                            out,
                            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                            sx(*x),
                            sy(*y)
                        );
                    }
                    run => {
                        let points: Vec<String> = run
                            .iter()
                            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                            .collect();
                        let _ = write!(
                            out,
                            "<polyline stroke=\"{colour}\" data-points=\"{}\" points=\"{}\"/>",
                            run.len(),
                            points.join(" ")
                        );
                    }
                }
            }
            out.push_str("</g>\n");
        }
        out.push_str("</svg>\n</figure>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway_metrics::GaugeOverTime;
    use crate::report::{Counts, LatencyHistogram};
    use crate::timeseries::Sample;

    fn report(name: &str) -> Report {
        let mut h = LatencyHistogram::new();
        for us in [1_000, 2_000, 5_000, 40_000] {
            h.record(us);
        }
        let g = GroupReport {
            name: name.into(),
            counts: Counts {
                devices: 3,
                published: 1234,
                arrived: 1200,
                lost: 34,
                ..Counts::default()
            },
            uplink_latency: Latency::from_histogram(&h),
            downlink_latency: Latency::default(),
        };
        Report {
            run_id: "0badf00d".into(),
            gateway: "127.0.0.1:10000".into(),
            broker: "<broker>".into(),
            verified: true,
            groups: vec![g.clone()],
            total: GroupReport {
                name: "total".into(),
                ..g
            },
            ..Report::default()
        }
    }

    fn series() -> TimeSeries {
        TimeSeries {
            samples: (0..10u32)
                .map(|i| Sample {
                    elapsed_s: f64::from(i),
                    connected: 3,
                    published: u64::from(i) * 100,
                    arrived: Some(u64::from(i) * 95),
                    uplink_p50_ms: (i % 4 != 2).then_some(1.5),
                    ..Sample::default()
                })
                .collect(),
            ramp_end_s: 1.0,
            publish_end_s: 7.0,
            drain_end_s: 8.0,
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let hostile = "<script>alert(1)</script>";
        let mut r = report(hostile);
        r.gateway_metrics = Some(GatewayMetrics {
            url: "http://gw/metrics\"><img src=x>".into(),
            scrapes: 2,
            last_error: Some("<b>refused</b>".into()),
            counters: [("evil_total{x=\"<i>\"}".to_string(), 3.0)].into_iter().collect(),
            gauges: [(
                "</table>".to_string(),
                GaugeOverTime {
                    points: vec![[0.0, 1.0], [1.0, 2.0]],
                    ..GaugeOverTime::default()
                },
            )]
            .into_iter()
            .collect(),
            ..GatewayMetrics::default()
        });
        let page = page(&r, &series());
        assert!(!page.contains("<script"), "a group name became markup");
        assert!(!page.contains("<img"), "a URL became markup");
        assert!(!page.contains("<b>refused"), "an error became markup");
        assert!(!page.contains("<i>\""), "a label became markup");
        assert!(!page.contains("</table>\"") && page.matches("</table>").count() == 3);
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("&lt;broker&gt;"));
    }

    #[test]
    fn a_page_with_charts_and_the_summary() {
        let r = report("sensors");
        let page = page(&r, &series());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<html").count(), 1);
        assert_eq!(page.matches("</html>").count(), 1);
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
        // Self-contained: nothing to fetch.
        for needle in [
            "http://", "https://", "src=", "href=", "url(", "@import", "<script", "<link",
        ] {
            assert!(!page.contains(needle), "{needle} in the page");
        }
        for id in [
            "throughput",
            "latency-over-time",
            "devices",
            "uplink-distribution",
            "summary",
        ] {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
        // Throughput: 9 rates from 10 samples, published and arrived.
        assert!(page.contains("data-points=\"9\""), "{page}");
        // Latency over time with gaps: stretches split where a second had no sample.
        assert!(page.matches("<polyline").count() >= 6);
        // The uplink percentile curve: 21 points.
        assert!(page.contains("data-points=\"21\""));
        // No downlink: said so, not an empty chart.
        assert!(page.contains("no data"));
        // The summary table has the text table's rows and numbers.
        let summary = r.summary();
        for Row {
            label: name,
            values: cells,
            ..
        } in &summary.rows
        {
            let row = format!(
                "<th scope=\"row\">{}</th><td>{}</td>",
                escape(name.trim()),
                escape(&cells[0])
            );
            assert!(page.contains(&row), "{row}");
        }
        assert!(page.contains("<th scope=\"row\">published</th><td>1234</td>"));
        assert!(page.contains("all held"));
    }

    #[test]
    fn ticks() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(7.0), 1.0);
        assert_eq!(tick_step(0.3), 0.05);
        assert_eq!(tick_step(0.0), 1.0);
        assert_eq!(tick_label(0.05, 0.05), "0.05");
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(0.0), 0.0);
    }
}
