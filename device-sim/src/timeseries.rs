//! The fleet over time: one [`Sample`] per second of a run (ramp, publishing, drain and
//! the verifier's wait for late arrivals), written as CSV by `--timeseries` and drawn by
//! `--html`.

use std::fmt::Write as _;

use serde::Serialize;

/// The CSV header, one name per [`Sample`] field, in order.
pub const CSV_COLUMNS: [&str; 13] = [
    "elapsed_s",
    "connected",
    "asleep",
    "published",
    "acknowledged",
    "arrived",
    "lost",
    "retries",
    "downlink_sent",
    "downlink_received",
    "uplink_p50_ms",
    "uplink_p90_ms",
    "uplink_p99_ms",
];

/// The fleet at one moment. Counts are cumulative since the start of the run unless said
/// otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Devices connected and awake right now (not counting those asleep).
    pub connected: u64,
    /// Devices asleep right now.
    pub asleep: u64,
    /// PUBLISH messages sent so far.
    pub published: u64,
    /// QoS 1/2 publishes acknowledged so far.
    pub acknowledged: u64,
    /// Distinct messages seen at the broker so far (`None` without a verifier: `--echo`).
    pub arrived: Option<u64>,
    /// Published and not seen at the broker so far: `published - arrived`. Mid-run this
    /// includes messages still on their way (radio delay, retransmissions, a sleeping
    /// device's outstanding publish); after the drain it is the report's `lost`.
    pub lost: Option<u64>,
    /// Device retransmissions so far.
    pub retries: u64,
    /// Downlink messages the broker side published so far.
    pub downlink_sent: u64,
    /// Distinct downlink messages devices received so far.
    pub downlink_received: u64,
    /// Uplink latency of the messages that arrived since the previous sample: median,
    /// 90th and 99th percentile (ms); `None` when none arrived.
    pub uplink_p50_ms: Option<f64>,
    /// See `uplink_p50_ms`.
    pub uplink_p90_ms: Option<f64>,
    /// See `uplink_p50_ms`.
    pub uplink_p99_ms: Option<f64>,
}

/// A run's samples and its phases.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimeSeries {
    /// One per second, in time order, and a last one at the end of the run.
    pub samples: Vec<Sample>,
    /// Seconds since the start when the last group's ramp ended (every device started).
    pub ramp_end_s: f64,
    /// When devices stopped publishing.
    pub publish_end_s: f64,
    /// When devices had to be done (the end of the drain); after it the verifier waits
    /// for late arrivals.
    pub drain_end_s: f64,
}

impl TimeSeries {
    /// The samples as CSV: a header row ([`CSV_COLUMNS`]), then one row per sample;
    /// numbers only, an empty field for a value not known (no latency sample in that
    /// second, no verifier).
    pub fn to_csv(&self) -> String {
        let mut out = CSV_COLUMNS.join(",");
        out.push('\n');
        for s in &self.samples {
            let int = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            let ms = |v: Option<f64>| {
                v.filter(|v| v.is_finite())
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_default()
            };
            let _ = writeln!(
                out,
                "{:.3},{},{},{},{},{},{},{},{},{},{},{},{}",
                s.elapsed_s,
                s.connected,
                s.asleep,
                s.published,
                s.acknowledged,
                int(s.arrived),
                int(s.lost),
                s.retries,
                s.downlink_sent,
                s.downlink_received,
                ms(s.uplink_p50_ms),
                ms(s.uplink_p90_ms),
                ms(s.uplink_p99_ms),
            );
        }
        out
    }

    /// At most `max` samples (at least 2), for drawing a long run: consecutive samples are
    /// merged into one per window of `k` (the window's last sample, so cumulative counts
    /// and the devices now stay exact, with the highest latency percentiles of the
    /// window, so that a spike stays visible). The first and the last sample are kept.
    pub fn thinned(&self, max: usize) -> TimeSeries {
        let max = max.max(2);
        let n = self.samples.len();
        if n <= max {
            return self.clone();
        }
        let k = (n - 1).div_ceil(max - 1);
        let highest = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let mut samples = Vec::with_capacity(max);
        samples.extend(self.samples.first().cloned());
        for window in self.samples.get(1..).unwrap_or_default().chunks(k) {
            let Some(last) = window.last() else { continue };
            let mut merged = last.clone();
            for s in window {
                merged.uplink_p50_ms = highest(merged.uplink_p50_ms, s.uplink_p50_ms);
                merged.uplink_p90_ms = highest(merged.uplink_p90_ms, s.uplink_p90_ms);
                merged.uplink_p99_ms = highest(merged.uplink_p99_ms, s.uplink_p99_ms);
            }
            samples.push(merged);
        }
        TimeSeries {
            samples,
            ..self.clone_phases()
        }
    }

    fn clone_phases(&self) -> TimeSeries {
        TimeSeries {
            samples: Vec::new(),
            ramp_end_s: self.ramp_end_s,
            publish_end_s: self.publish_end_s,
            drain_end_s: self.drain_end_s,
        }
    }

    /// Per-second rates between consecutive samples of a cumulative count: `(time, rate)`
    /// at the later sample's time.
    pub fn rate(&self, f: impl Fn(&Sample) -> Option<u64>) -> Vec<(f64, f64)> {
        self.samples
            .windows(2)
            .filter_map(|w| {
                let (a, b) = (w.first()?, w.get(1)?);
                let dt = b.elapsed_s - a.elapsed_s;
                let (va, vb) = (f(a)?, f(b)?);
                (dt > 0.0).then(|| (b.elapsed_s, vb.saturating_sub(va) as f64 / dt))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series() -> TimeSeries {
        TimeSeries {
            samples: vec![
                Sample {
                    elapsed_s: 0.0,
                    arrived: Some(0),
                    lost: Some(0),
                    ..Sample::default()
                },
                Sample {
                    elapsed_s: 1.0,
                    connected: 10,
                    asleep: 2,
                    published: 40,
                    acknowledged: 20,
                    arrived: Some(35),
                    lost: Some(5),
                    retries: 1,
                    downlink_sent: 3,
                    downlink_received: 2,
                    uplink_p50_ms: Some(1.5),
                    uplink_p90_ms: Some(2.25),
                    uplink_p99_ms: Some(10.0),
                },
                Sample {
                    elapsed_s: 1.5,
                    published: 50,
                    arrived: None,
                    ..Sample::default()
                },
            ],
            ..TimeSeries::default()
        }
    }

    #[test]
    fn csv_has_a_header_and_numbers_only() {
        let csv = series().to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4, "{csv}");
        assert_eq!(
            lines[0],
            "elapsed_s,connected,asleep,published,acknowledged,arrived,lost,retries,downlink_sent,downlink_received,uplink_p50_ms,uplink_p90_ms,uplink_p99_ms"
        );
        assert_eq!(lines[1], "0.000,0,0,0,0,0,0,0,0,0,,,");
        assert_eq!(lines[2], "1.000,10,2,40,20,35,5,1,3,2,1.500,2.250,10.000");
        assert_eq!(lines[3], "1.500,0,0,50,0,,,0,0,0,,,");
        for line in &lines[1..] {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), CSV_COLUMNS.len());
            assert!(
                fields.iter().all(|f| f.is_empty() || f.parse::<f64>().is_ok()),
                "{line}"
            );
        }
    }

    #[test]
    fn long_runs_are_thinned_for_drawing() {
        let s = TimeSeries {
            samples: (0..=10_000u32)
                .map(|i| Sample {
                    elapsed_s: f64::from(i),
                    published: u64::from(i) * 10,
                    uplink_p99_ms: (i % 2 == 0).then_some(if i == 5_000 { 900.0 } else { 1.0 }),
                    ..Sample::default()
                })
                .collect(),
            publish_end_s: 9_000.0,
            ..TimeSeries::default()
        };
        let t = s.thinned(1_000);
        assert!(t.samples.len() <= 1_000, "{}", t.samples.len());
        assert!(t.samples.len() > 900, "{}", t.samples.len());
        assert_eq!(t.samples.first(), s.samples.first());
        assert_eq!(t.samples.last().map(|s| s.published), Some(100_000));
        assert_eq!(t.publish_end_s, 9_000.0);
        assert!(t.samples.windows(2).all(|w| w[0].elapsed_s < w[1].elapsed_s));
        // The spike survives, and rates stay averages of what happened.
        assert!(t.samples.iter().any(|s| s.uplink_p99_ms == Some(900.0)));
        assert!(t
            .rate(|s| Some(s.published))
            .iter()
            .all(|(_, r)| (*r - 10.0).abs() < 1e-9));
        // Short series are left alone.
        assert_eq!(series().thinned(1_000), series());
    }

    #[test]
    fn rates_per_second() {
        let s = series();
        assert_eq!(s.rate(|s| Some(s.published)), vec![(1.0, 40.0), (1.5, 20.0)]);
        // A value unknown at one end: no point.
        assert_eq!(s.rate(|s| s.arrived), vec![(1.0, 35.0)]);
    }
}
