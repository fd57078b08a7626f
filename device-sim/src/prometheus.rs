//! A parser of the Prometheus text exposition format (version 0.0.4, and the OpenMetrics
//! text that is compatible with it), for `--gateway-metrics`.
//!
//! Hand-written rather than a crate: the simulator needs names, labels and values of one
//! scrape, nothing of the rest of a Prometheus client, and a line that does not parse must
//! be counted and skipped, not fail the whole scrape (the gateway under test may be any
//! gateway, with any exporter). The grammar is small: `# HELP` / `# TYPE` lines, other
//! comments, and samples `name{label="value",...} value [timestamp]`.

use std::collections::HashMap;

/// A metric family's type, from its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only ever goes up (resets to 0 when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// `_bucket`, `_sum` and `_count` samples.
    Histogram,
    /// Quantiles, `_sum` and `_count`.
    Summary,
    /// No `# TYPE` line, or `untyped` / `unknown`.
    Untyped,
}

/// A sample's labels, name and value, in the order given.
pub type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with its suffix: `_total`, `_bucket`, ...).
    pub name: String,
    /// Labels in the order given.
    pub labels: Labels,
    /// The value (`NaN`, `+Inf` and `-Inf` included).
    pub value: f64,
}

impl Sample {
    /// The series' name as Prometheus shows it: `name` or `name{a="x",b="y"}`, label
    /// values escaped as in the text format.
    pub fn key(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| {
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                format!("{k}=\"{v}\"")
            })
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// What one scrape said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Family name -> type, from `# TYPE` lines.
    pub types: HashMap<String, MetricType>,
    /// Lines that did not parse (skipped).
    pub bad_lines: u64,
    /// The first line that did not parse, with its line number (1-based) and why.
    pub first_bad_line: Option<(usize, String)>,
}

/// How a sample's value behaves over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Cumulative: a counter, or a histogram's or summary's `_sum` and `_count`.
    Cumulative,
    /// A level: a gauge or an untyped sample.
    Level,
    /// Neither a counter nor a level worth following: buckets, quantiles, `_created`.
    Other,
}

impl Exposition {
    /// Whether a sample is a counter (cumulative) or a gauge, by its family's declared type
    /// and, without one, by the naming conventions (`_total` is a counter).
    pub fn kind(&self, s: &Sample) -> Kind {
        let family = |suffix: &str| s.name.strip_suffix(suffix).and_then(|f| self.types.get(f).copied());
        if let Some(t) = self.types.get(&s.name) {
            return match t {
                MetricType::Counter => Kind::Cumulative,
                MetricType::Gauge => Kind::Level,
                MetricType::Untyped if s.name.ends_with("_total") => Kind::Cumulative,
                MetricType::Untyped => Kind::Level,
                // A summary's quantile samples carry the family name.
                MetricType::Histogram | MetricType::Summary => Kind::Other,
            };
        }
        if s.name.ends_with("_created") {
            return Kind::Other;
        }
        for suffix in ["_sum", "_count"] {
            if matches!(family(suffix), Some(MetricType::Histogram | MetricType::Summary)) {
                return Kind::Cumulative;
            }
        }
        if matches!(family("_bucket"), Some(MetricType::Histogram)) {
            return Kind::Other;
        }
        // OpenMetrics declares a counter by its family name without `_total`.
        if matches!(family("_total"), Some(MetricType::Counter)) || s.name.ends_with("_total") {
            return Kind::Cumulative;
        }
        Kind::Level
    }
}

/// Parses a scrape. Never fails: lines that do not parse are counted in
/// [`Exposition::bad_lines`] and skipped.
pub fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() {
            continue;
        }
        let result = if let Some(comment) = line.strip_prefix('#') {
            parse_comment(comment, &mut out.types)
        } else {
            parse_sample(line).map(|s| out.samples.push(s))
        };
        if let Err(why) = result {
            out.bad_lines += 1;
            if out.first_bad_line.is_none() {
                out.first_bad_line = Some((i + 1, why));
            }
        }
    }
    out
}

fn parse_comment(comment: &str, types: &mut HashMap<String, MetricType>) -> Result<(), String> {
    let mut words = comment.split_whitespace();
    if words.next() != Some("TYPE") {
        // HELP, EOF, or any other comment: nothing the simulator needs.
        return Ok(());
    }
    let name = words.next().ok_or("TYPE without a metric name")?;
    if !valid_name(name) {
        return Err(format!("TYPE of an invalid metric name {name:?}"));
    }
    let t = match words.next() {
        Some("counter") => MetricType::Counter,
        Some("gauge") => MetricType::Gauge,
        Some("histogram" | "gaugehistogram") => MetricType::Histogram,
        Some("summary") => MetricType::Summary,
        Some("untyped" | "unknown" | "info" | "stateset") => MetricType::Untyped,
        Some(other) => return Err(format!("unknown metric type {other:?}")),
        None => return Err(format!("TYPE of {name} without a type")),
    };
    types.insert(name.to_string(), t);
    Ok(())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("a sample without a value")?;
    let (name, mut rest) = line.split_at(name_end);
    if !valid_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("a sample without a value")?;
    let value = parse_value(value).ok_or_else(|| format!("invalid value {value:?}"))?;
    if let Some(ts) = fields.next() {
        // A timestamp (ms since the epoch; OpenMetrics allows fractional seconds): the
        // simulator uses its own clock, so it only has to be a number.
        if ts.parse::<f64>().is_err() {
            return Err(format!("invalid timestamp {ts:?}"));
        }
    }
    if let Some(extra) = fields.next() {
        // OpenMetrics exemplars (`# {trace_id="..."} 1`) follow a sample; anything else is
        // not the format.
        if !extra.starts_with('#') {
            return Err(format!("unexpected {extra:?} after the value"));
        }
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` (after the opening brace); returns the labels and what follows.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let (key, rest) = s.split_at(eq);
        let key = key.trim();
        if !valid_name(key) || key.contains(':') {
            return Err(format!("invalid label name {key:?}"));
        }
        let rest = rest[1..].trim_start();
        let mut chars = rest.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {key}: value not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    Some(other) => {
                        // Not an escape the format defines: kept as written.
                        value.push('\\');
                        value.push(other);
                    }
                    None => return Err(format!("label {key}: unterminated value")),
                },
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("label {key}: unterminated value"))?;
        labels.push((key.to_string(), value));
        s = rest[end..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("after label {key}: expected ',' or '}}'"));
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        // Rust's parser also takes "infinity" and friends; the format's are above.
        _ if v.chars().any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') => None,
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "\
# HELP mqttsn_datagrams_in Datagrams received from devices.
# TYPE mqttsn_datagrams_in counter
mqttsn_datagrams_in_total 1027
# TYPE mqttsn_sessions gauge
mqttsn_sessions 12
# TYPE mqttsn_connack_latency_seconds histogram
mqttsn_connack_latency_seconds_sum 0.5
mqttsn_connack_latency_seconds_count 3
mqttsn_connack_latency_seconds_bucket{le=\"0.005\"} 1
mqttsn_connack_latency_seconds_bucket{le=\"+Inf\"} 3
# EOF
";

    #[test]
    fn a_gateway_scrape() {
        let e = parse(GATEWAY);
        assert_eq!(e.bad_lines, 0, "{:?}", e.first_bad_line);
        assert_eq!(e.samples.len(), 6);
        let s = |name: &str| e.samples.iter().find(|s| s.name == name).cloned().expect("sample");
        assert_eq!(s("mqttsn_datagrams_in_total").value, 1027.0);
        // OpenMetrics-style family name without `_total`: still a counter.
        assert_eq!(e.kind(&s("mqttsn_datagrams_in_total")), Kind::Cumulative);
        assert_eq!(e.kind(&s("mqttsn_sessions")), Kind::Level);
        assert_eq!(e.kind(&s("mqttsn_connack_latency_seconds_count")), Kind::Cumulative);
        assert_eq!(e.kind(&s("mqttsn_connack_latency_seconds_sum")), Kind::Cumulative);
        let inf = e
            .samples
            .iter()
            .find(|s| s.labels == [("le".to_string(), "+Inf".to_string())])
            .expect("+Inf bucket");
        assert_eq!(e.kind(inf), Kind::Other);
        assert_eq!(inf.key(), "mqttsn_connack_latency_seconds_bucket{le=\"+Inf\"}");
    }

    #[test]
    fn labels_escapes_values_and_timestamps() {
        let e = parse(
            "drops_total{reason=\"queue \\\"full\\\"\",path=\"C:\\\\x\",n=\"a\\nb\",} 3 1700000000000\n\
             temp{ room = \"hall\" } -1.5e2\n\
             up NaN\n\
             x_total +Inf\n\
             y -Inf\n",
        );
        assert_eq!(e.bad_lines, 0, "{:?}", e.first_bad_line);
        let d = &e.samples[0];
        assert_eq!(d.name, "drops_total");
        assert_eq!(
            d.labels,
            [
                ("reason".to_string(), "queue \"full\"".to_string()),
                ("path".to_string(), "C:\\x".to_string()),
                ("n".to_string(), "a\nb".to_string()),
            ]
        );
        assert_eq!(d.value, 3.0);
        assert_eq!(e.kind(d), Kind::Cumulative);
        // The key escapes again, so that it reads as Prometheus shows it.
        assert_eq!(
            d.key(),
            "drops_total{reason=\"queue \\\"full\\\"\",path=\"C:\\\\x\",n=\"a\\nb\"}"
        );
        assert_eq!(e.samples[1].labels, [("room".to_string(), "hall".to_string())]);
        assert_eq!(e.samples[1].value, -150.0);
        assert!(e.samples[2].value.is_nan());
        assert_eq!(e.samples[3].value, f64::INFINITY);
        assert_eq!(e.samples[4].value, f64::NEG_INFINITY);
    }

    #[test]
    fn bad_lines_are_counted_and_skipped() {
        let e = parse(
            "ok_total 1\n\
             <html><body>not metrics</body></html>\n\
             no_value\n\
             1bad 2\n\
             v{a=\"unterminated} 1\n\
             v{a=unquoted} 1\n\
             v 12abc\n\
             v infinity\n\
             v 1 notatime\n\
             # TYPE v sometype\n\
             # TYPE\n\
             good 2\n",
        );
        assert_eq!(e.samples.len(), 2, "{:?}", e.samples);
        assert_eq!(e.bad_lines, 10);
        assert_eq!(e.first_bad_line.as_ref().map(|(n, _)| *n), Some(2));
        // Garbage never panics, whatever the bytes.
        for junk in [
            "{",
            "a{",
            "a{b",
            "a{b=",
            "a{b=\"",
            "a{b=\"\\",
            "a{b=\"c\"",
            "a{b=\"c\" 1",
            "#",
            "# TYPE a",
        ] {
            let _ = parse(junk);
        }
    }

    #[test]
    fn untyped_samples_by_their_names() {
        let e = parse("requests_total 5\nqueue_depth 3\nthing_created 1.7e9\n");
        let kinds: Vec<Kind> = e.samples.iter().map(|s| e.kind(s)).collect();
        assert_eq!(kinds, [Kind::Cumulative, Kind::Level, Kind::Other]);
    }
}
