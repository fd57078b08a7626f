//! `--gateway-metrics URL`: the gateway's own view of a fleet run, from its Prometheus
//! endpoint (ours: `GET /metrics`, see docs/operations.md).
//!
//! The fleet scrapes the endpoint before the devices start, every second while they run,
//! and once more at the end; [`Collector`] turns the scrapes into the report's
//! [`GatewayMetrics`]: how much every counter went up over the run (restarts of the
//! gateway's counters are followed, as Prometheus's `increase()` does) and each gauge over
//! time. A scrape that fails (connection refused, timeout, an HTTP error, a body that is not
//! the text format) is counted and reported; it never ends the run.
//!
//! The HTTP side is one plain HTTP/1.1 GET over a tokio TCP stream (`Connection: close`,
//! `Content-Length`, chunked or close-delimited bodies): a metrics endpoint needs no more,
//! and the simulator no HTTP client stack.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::prometheus::{self, Kind};

/// How long one scrape may take (connect, request, whole response).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Time between scrapes while the fleet runs.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// The largest response accepted (a metrics page is a few KB; this bounds a wrong URL).
pub const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// Gauges followed over time (the first seen, in the endpoint's order); the others are
/// summed up (first, min, max, last) without their points, so that an exporter with
/// thousands of gauges cannot make the report huge.
pub const MAX_GAUGES_OVER_TIME: usize = 32;

/// Points kept per gauge at most (an hour of scrapes): a longer run keeps every 2nd, then
/// every 4th ... scrape's value, so that a day-long soak's report stays small.
pub const MAX_POINTS_PER_GAUGE: usize = 3_600;

/// A metrics endpoint: `http://HOST[:PORT][/PATH]` (port 80; path `/metrics` when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl std::fmt::Display for MetricsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

impl std::str::FromStr for MetricsUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!("{url:?}: unsupported scheme {scheme:?} (plain http:// only)"));
            }
            None => url,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" {
            "/metrics"
        } else {
            path
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: spaces or control characters in the path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
                None if after.is_empty() => 80,
                None => return Err(format!("{url:?}: unexpected {after:?} after the address")),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?),
                None => (authority, 80),
            }
        };
        if host.is_empty() || host.contains('@') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: no usable host"));
        }
        Ok(MetricsUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No TCP connection, or it broke.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No complete answer within [`SCRAPE_TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not HTTP, or too large.
    #[error("bad HTTP response: {0}")]
    Http(String),
    /// An HTTP status other than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// A body with no sample in the Prometheus text format.
    #[error("not the Prometheus text format ({0})")]
    NotMetrics(String),
}

/// One GET of the endpoint: the body of a 200 answer.
pub async fn fetch(url: &MetricsUrl, timeout: Duration) -> Result<String, ScrapeError> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
        let host = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mqtt-sn-sim\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            url.path
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if raw.len() > MAX_RESPONSE {
                return Err(ScrapeError::Http(format!("larger than {MAX_RESPONSE} bytes")));
            }
            // A server that keeps the connection open despite `Connection: close`: stop
            // once the announced body is complete.
            if response_complete(&raw) {
                break;
            }
        }
        let body = parse_response(&raw)?;
        String::from_utf8(body).map_err(|_| ScrapeError::Http("the body is not UTF-8".into()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ScrapeError::Timeout(timeout)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A response's status line and headers.
struct Head {
    status: u16,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    /// Where the body starts.
    body_start: usize,
}

fn split_head(raw: &[u8]) -> Option<Head> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(raw.get(..end)?).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head {
        status,
        headers,
        body_start: end + 4,
    })
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn response_complete(raw: &[u8]) -> bool {
    let Some(Head {
        headers,
        body_start: start,
        ..
    }) = split_head(raw)
    else {
        return false;
    };
    let body = raw.get(start..).unwrap_or_default();
    if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    if header(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return dechunk(body).is_ok();
    }
    false
}

/// The body of a complete HTTP/1.x response, or why there is none.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, ScrapeError> {
    let Head {
        status,
        headers,
        body_start: start,
    } = split_head(raw).ok_or_else(|| {
        let shown: String = String::from_utf8_lossy(raw.get(..raw.len().min(40)).unwrap_or_default())
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        ScrapeError::Http(format!("no HTTP/1.x status line and headers (got {shown:?})"))
    })?;
    if status != 200 {
        return Err(ScrapeError::Status(status));
    }
    let body = raw.get(start..).unwrap_or_default();
    if header(&headers, "content-encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return Err(ScrapeError::Http("a compressed body (asked for none)".into()));
    }
    if header(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return dechunk(body).map_err(ScrapeError::Http);
    }
    match header(&headers, "content-length") {
        Some(v) => {
            let n: usize = v
                .parse()
                .map_err(|_| ScrapeError::Http(format!("bad Content-Length {v:?}")))?;
            body.get(..n)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| ScrapeError::Http(format!("body cut short: {} of {n} bytes", body.len())))
        }
        // Close-delimited.
        None => Ok(body.to_vec()),
    }
}

/// Decodes a chunked body (RFC 9112, 7.1); trailers are ignored.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n").ok_or("chunked body cut short")?;
        let size_line = std::str::from_utf8(body.get(..line_end).unwrap_or_default()).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        body = body.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        let data = body.get(..size).ok_or("chunked body cut short")?;
        out.extend_from_slice(data);
        body = body
            .get(size..)
            .and_then(|b| b.strip_prefix(b"\r\n"))
            .ok_or("chunk not followed by CRLF")?;
    }
}

/// A gauge over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GaugeOverTime {
    /// First value seen.
    pub first: f64,
    /// Smallest value seen.
    pub min: f64,
    /// Largest value seen.
    pub max: f64,
    /// Last value seen.
    pub last: f64,
    /// `[elapsed seconds, value]` at each scrape (empty beyond [`MAX_GAUGES_OVER_TIME`]
    /// gauges).
    pub points: Vec<[f64; 2]>,
}

/// The gateway's metrics over a fleet run, in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GatewayMetrics {
    /// The endpoint scraped.
    pub url: String,
    /// Successful scrapes.
    pub scrapes: u64,
    /// Failed scrapes (counted, never an error of the run).
    pub scrape_failures: u64,
    /// Why the last failed scrape failed.
    pub last_error: Option<String>,
    /// Lines of the scrapes that did not parse (skipped).
    pub bad_lines: u64,
    /// Seconds since the run started of the first and the last successful scrape: the
    /// stretch the counters cover.
    pub first_scrape_s: Option<f64>,
    /// See `first_scrape_s`.
    pub last_scrape_s: Option<f64>,
    /// How much each counter (and each histogram's `_sum` and `_count`) went up between
    /// the first and the last successful scrape, by series (`name{labels}`).
    pub counters: BTreeMap<String, f64>,
    /// Each gauge over the run, by series.
    pub gauges: BTreeMap<String, GaugeOverTime>,
}

/// Counters shown in the text table at most; the rest are in the JSON report and the page.
const TABLE_COUNTERS: usize = 16;

impl GatewayMetrics {
    /// The lines under the text table: scrapes, the counters that moved, the gauges.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "gateway metrics ({}): {} scrapes, {} failed",
            self.url, self.scrapes, self.scrape_failures
        )];
        if let Some(e) = &self.last_error {
            out.push(format!("  last failure: {e}"));
        }
        let short = |k: &str| k.strip_prefix("mqttsn_").unwrap_or(k).replace("_total", "");
        let moved: Vec<String> = self
            .counters
            .iter()
            .filter(|(k, v)| **v != 0.0 && !k.ends_with("_sum") && !k.ends_with("_count"))
            .map(|(k, v)| format!("{} {}", short(k), number(*v)))
            .collect();
        if self.scrapes > 0 {
            if moved.is_empty() {
                out.push("  counters over the run: none moved".into());
            }
            let more = moved.len().saturating_sub(TABLE_COUNTERS);
            let mut shown: Vec<String> = moved.into_iter().take(TABLE_COUNTERS).collect();
            if more > 0 {
                shown.push(format!("... {more} more in the JSON report"));
            }
            for (i, chunk) in shown.chunks(6).enumerate() {
                let lead = if i == 0 { "  counters over the run: " } else { "    " };
                out.push(format!("{lead}{}", chunk.join(", ")));
            }
            let gauges: Vec<String> = self
                .gauges
                .iter()
                .take(TABLE_COUNTERS)
                .map(|(k, g)| format!("{} {}/{}", short(k), number(g.max), number(g.last)))
                .collect();
            for (i, chunk) in gauges.chunks(6).enumerate() {
                let lead = if i == 0 { "  gauges (max/last): " } else { "    " };
                out.push(format!("{lead}{}", chunk.join(", ")));
            }
        }
        out
    }
}

/// A number as a person reads it: integers without a fraction.
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let mut s = String::new();
        let _ = write!(s, "{v:.3}");
        s
    }
}

/// Turns scrapes into [`GatewayMetrics`].
#[derive(Debug, Default)]
pub struct Collector {
    report: GatewayMetrics,
    /// Last value of each cumulative series.
    previous: HashMap<String, f64>,
    /// Gauge points are kept for every `stride`-th successful scrape.
    stride: u64,
}

impl Collector {
    /// A collector for `url`.
    pub fn new(url: &MetricsUrl) -> Self {
        Collector {
            report: GatewayMetrics {
                url: url.to_string(),
                ..GatewayMetrics::default()
            },
            previous: HashMap::new(),
            stride: 1,
        }
    }

    /// Takes one scrape's outcome, `elapsed_s` seconds into the run.
    pub fn observe(&mut self, elapsed_s: f64, scrape: Result<String, ScrapeError>) {
        let parsed = scrape.and_then(|body| {
            let e = prometheus::parse(&body);
            if e.samples.is_empty() {
                let why = match &e.first_bad_line {
                    Some((n, why)) => format!("line {n}: {why}"),
                    None => "no samples".into(),
                };
                return Err(ScrapeError::NotMetrics(why));
            }
            Ok(e)
        });
        let e = match parsed {
            Ok(e) => e,
            Err(err) => {
                if self.report.scrape_failures == 0 {
                    tracing::warn!(url = %self.report.url, error = %err, "cannot scrape the gateway's metrics (further failures are counted in the report)");
                } else {
                    tracing::debug!(url = %self.report.url, error = %err, "cannot scrape the gateway's metrics");
                }
                self.report.scrape_failures += 1;
                self.report.last_error = Some(err.to_string());
                return;
            }
        };
        let r = &mut self.report;
        let baseline = r.scrapes == 0;
        let keep_point = r.scrapes % self.stride.max(1) == 0;
        r.scrapes += 1;
        r.bad_lines += e.bad_lines;
        r.first_scrape_s.get_or_insert(elapsed_s);
        r.last_scrape_s = Some(elapsed_s);
        for s in &e.samples {
            if !s.value.is_finite() {
                continue;
            }
            match e.kind(s) {
                Kind::Cumulative => {
                    let key = s.key();
                    let increase = match self.previous.get(&key) {
                        Some(&prev) if s.value >= prev => s.value - prev,
                        // Lower than before: the gateway restarted and its counters began
                        // again from zero.
                        Some(_) => s.value,
                        // First seen after the baseline: it began during the run.
                        None if !baseline => s.value,
                        None => 0.0,
                    };
                    *r.counters.entry(key.clone()).or_insert(0.0) += increase;
                    self.previous.insert(key, s.value);
                }
                Kind::Level => {
                    let key = s.key();
                    let followed = r.gauges.len();
                    match r.gauges.get_mut(&key) {
                        Some(g) => {
                            g.min = g.min.min(s.value);
                            g.max = g.max.max(s.value);
                            g.last = s.value;
                            if !g.points.is_empty() && keep_point {
                                g.points.push([elapsed_s, s.value]);
                            }
                        }
                        None => {
                            let points = if followed < MAX_GAUGES_OVER_TIME {
                                vec![[elapsed_s, s.value]]
                            } else {
                                Vec::new()
                            };
                            r.gauges.insert(
                                key,
                                GaugeOverTime {
                                    first: s.value,
                                    min: s.value,
                                    max: s.value,
                                    last: s.value,
                                    points,
                                },
                            );
                        }
                    }
                }
                Kind::Other => {}
            }
        }
        if r.gauges.values().any(|g| g.points.len() > MAX_POINTS_PER_GAUGE) {
            self.stride = self.stride.saturating_mul(2);
            for g in r.gauges.values_mut() {
                let mut i = 0;
                g.points.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
            }
        }
    }

    /// What the scrapes add up to.
    pub fn report(&self) -> GatewayMetrics {
        self.report.clone()
    }
}

/// Scrapes `url` once and hands the outcome to `collector`.
pub async fn scrape_into(url: &MetricsUrl, collector: &std::sync::Mutex<Collector>, elapsed_s: impl Fn() -> f64) {
    let outcome = fetch(url, SCRAPE_TIMEOUT).await;
    let t = elapsed_s();
    collector.lock().unwrap_or_else(|e| e.into_inner()).observe(t, outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: MetricsUrl = "http://127.0.0.1:9100/metrics".parse().expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9100, "/metrics")
        );
        assert_eq!(u.to_string(), "http://127.0.0.1:9100/metrics");
        let u: MetricsUrl = "localhost:9100".parse().expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("localhost", 9100, "/metrics")
        );
        let u: MetricsUrl = "http://[::1]:9/m?x=1".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 9, "/m?x=1"));
        assert_eq!(u.to_string(), "http://[::1]:9/m?x=1");
        let u: MetricsUrl = "http://gw/".parse().expect("valid");
        assert_eq!((u.port, u.path.as_str()), (80, "/metrics"));
        for bad in [
            "https://x/metrics",
            "http://:9/",
            "http://x:port/",
            "http://x/a b",
            "http://u@x/",
            "http://[::1/",
        ] {
            assert!(bad.parse::<MetricsUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(ok).expect("body"), b"hello");
        assert!(response_complete(ok));
        assert!(!response_complete(&ok[..ok.len() - 1]));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).expect("body"), b"Wikipedia ");
        assert!(response_complete(chunked));
        let closed = b"HTTP/1.0 200 OK\r\n\r\nup 1\n";
        assert_eq!(parse_response(closed).expect("body"), b"up 1\n");
        assert!(matches!(
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            Err(ScrapeError::Status(404))
        ));
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n"),
            Err(ScrapeError::Http(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            Err(ScrapeError::Http(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(ScrapeError::Http(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n\x1f\x8b"),
            Err(ScrapeError::Http(_))
        ));
    }

    fn scrape(text: &str) -> Result<String, ScrapeError> {
        Ok(text.to_string())
    }

    #[test]
    fn counters_increase_and_gauges_over_time() {
        let url: MetricsUrl = "http://127.0.0.1:9100/metrics".parse().expect("valid");
        let mut c = Collector::new(&url);
        c.observe(
            0.0,
            scrape("# TYPE a counter\na_total 100\ndrops_total{reason=\"x\"} 5\nsessions 0\n"),
        );
        c.observe(1.0, Err(ScrapeError::Timeout(SCRAPE_TIMEOUT)));
        c.observe(
            2.0,
            scrape("a_total 160\ndrops_total{reason=\"x\"} 5\nsessions 7\nnew_total 3\n"),
        );
        // The gateway restarted: its counters began again.
        c.observe(
            3.0,
            scrape("a_total 10\ndrops_total{reason=\"x\"} 6\nsessions 2\nnew_total 4\n"),
        );
        c.observe(4.0, scrape("<html>oops</html>\n"));
        let r = c.report();
        assert_eq!((r.scrapes, r.scrape_failures), (3, 2));
        assert!(
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("not the Prometheus")),
            "{r:?}"
        );
        assert_eq!(r.counters.get("a_total"), Some(&70.0));
        assert_eq!(r.counters.get("drops_total{reason=\"x\"}"), Some(&1.0));
        assert_eq!(r.counters.get("new_total"), Some(&4.0));
        let s = r.gauges.get("sessions").expect("gauge");
        assert_eq!((s.first, s.min, s.max, s.last), (0.0, 0.0, 7.0, 2.0));
        assert_eq!(s.points, vec![[0.0, 0.0], [2.0, 7.0], [3.0, 2.0]]);
        assert_eq!((r.first_scrape_s, r.last_scrape_s), (Some(0.0), Some(3.0)));
        let lines = r.lines().join("\n");
        assert!(lines.contains("3 scrapes, 2 failed"), "{lines}");
        assert!(lines.contains("a 70"), "{lines}");
        assert!(lines.contains("sessions 7/2"), "{lines}");
    }

    #[test]
    fn a_long_run_keeps_fewer_points() {
        let url: MetricsUrl = "http://x:1/".parse().expect("valid");
        let mut c = Collector::new(&url);
        for i in 0..3 * MAX_POINTS_PER_GAUGE {
            c.observe(i as f64, Ok(format!("g {i}\n")));
        }
        let r = c.report();
        let g = r.gauges.get("g").expect("gauge");
        assert!(
            g.points.len() <= MAX_POINTS_PER_GAUGE && g.points.len() > MAX_POINTS_PER_GAUGE / 4,
            "{}",
            g.points.len()
        );
        assert!(g.points.windows(2).all(|w| w[0][0] < w[1][0]));
        assert_eq!(g.points.first(), Some(&[0.0, 0.0]));
        assert_eq!(g.last, (3 * MAX_POINTS_PER_GAUGE - 1) as f64);
    }

    #[test]
    fn many_gauges_are_summed_up_without_points() {
        let url: MetricsUrl = "http://x:1/".parse().expect("valid");
        let mut c = Collector::new(&url);
        let page: String = (0..100).map(|i| format!("g{i:03} {i}\n")).collect();
        c.observe(0.0, Ok(page.clone()));
        c.observe(1.0, Ok(page));
        let r = c.report();
        assert_eq!(r.gauges.len(), 100);
        assert_eq!(
            r.gauges.values().filter(|g| !g.points.is_empty()).count(),
            MAX_GAUGES_OVER_TIME
        );
    }
}
