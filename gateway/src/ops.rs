//! Operations: the Prometheus exposition of the engine's counters and gauges, the health
//! verdict, and a minimal HTTP/1.1 server for `GET /metrics` and `GET /healthz`.
//!
//! Everything here reads what the runtime publishes (a [`Stats`] snapshot, the broker
//! connection count, the broker probe's last result, the serial ports' state); the
//! engine is not touched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::broker::mqtt::BrokerConfig;
use crate::engine::{Histogram, Metrics, Stats, LATENCY_BUCKETS};
use crate::transport::serial::SerialStatsReader;

/// Prefix of every metric name.
pub const PREFIX: &str = "mqttsn";

/// Largest request head read (request line and headers); larger requests get 431.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP connections served at once; more wait.
const MAX_CONNECTIONS: usize = 16;

/// The HELP text of each engine counter (the field names of [`Metrics`]). A unit test
/// checks that every counter has one.
pub fn counter_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "datagrams_in" => "Datagrams received from devices",
        "datagrams_out" => "Datagrams sent to devices",
        "malformed" => "Datagrams dropped because they did not decode as MQTT-SN",
        "unknown_peer" => "Session messages dropped because their address has no session",
        "unexpected" => "Messages not valid in their session's current state",
        "publishes_in" => "Device publishes forwarded to the broker (QoS -1 included)",
        "publishes_out" => "Broker messages delivered to devices",
        "qos_minus_one" => "QoS -1 publishes forwarded to the broker",
        "qos_minus_one_dropped" => "QoS -1 publishes dropped (normal topic id, unknown predefined id, or disabled)",
        "invalid_topic" => "Publishes rejected for an unknown topic id",
        "qos0_dropped" => "QoS 0 messages for a device dropped because its held-message buffer was full",
        "undeliverable" => "Broker messages that could not be delivered to a device",
        "retransmissions" => "Retransmissions to devices",
        "connects" => "CONNECTs accepted",
        "connects_refused" => "CONNECTs refused (limits, broker refusal or unreachable broker)",
        "disconnects" => "Clean disconnects",
        "lost" => "Devices lost (keep-alive, sleep deadline or retries exhausted)",
        "broker_closed" => "Sessions ended because their broker connection closed",
        "takeovers" => "Sessions taken over by a new CONNECT with the same client id",
        "sessions_expired" => "Kept topic ids of clean-session-false devices dropped after limits.session_expiry_secs",
        "store_write_errors" => "State store commits that failed (what they held is not durable)",
        "sleeps" => "Times a device went to sleep",
        "wakes" => "Times a device woke",
        "broker_rejected" => "Requests the broker link could not queue (queue full or connection gone)",
        "duplicates_dropped" => "Late copies of completed QoS 2 publishes, not forwarded again",
        "advertisements" => "ADVERTISE messages sent",
        "searchgw" => "SEARCHGW messages answered",
        "links_down" => "Serial links that went away",
        "topic_refused" => "Topic names and filters refused before reaching the broker",
        "qos0_dropped_broker_full" => "QoS 0 publishes dropped because their broker connection's queue was full",
        "qos0_dropped_broker_closed" => "QoS 0 publishes dropped because their broker connection was gone",
        "auth_unknown_client" => "CONNECTs refused in registry mode: no entry names the client id",
        "auth_address_refused" => "CONNECTs and QoS -1 publishes refused: address not in the registry entry",
        "auth_publish_denied" => "REGISTER, PUBLISH and will topics outside the device's publish patterns",
        "auth_subscribe_denied" => "SUBSCRIBEs outside the device's subscribe patterns",
        "auth_dollar_refused" => "REGISTER, PUBLISH and will topics starting with $, refused",
        "auth_takeover_refused" => "CONNECTs with a live session's client id from another address, refused",
        "auth_wake_refused" => "PINGREQs waking a client from another address, refused",
        "auth_identity_refused" => {
            "CONNECTs over DTLS with a client id not bound to the session's PSK identity, refused"
        }
        "mountpoint_refused" => "CONNECTs and QoS -1 publishes refused: the mountpoint cannot be formed",
        "mountpoint_dropped" => "Broker messages outside a device's mountpoint, not delivered",
        _ => return None,
    })
}

/// Every engine counter by name, walked through serde so that a new field of
/// [`Metrics`] is exposed without being listed again.
pub fn counters(metrics: &Metrics) -> Vec<(String, u64)> {
    let Ok(toml::Value::Table(table)) = toml::Value::try_from(metrics) else {
        return Vec::new();
    };
    table
        .into_iter()
        .filter_map(|(name, v)| Some((name, u64::try_from(v.as_integer()?).ok()?)))
        .collect()
}

/// What one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The engine's snapshot.
    pub stats: Stats,
    /// Broker connections held.
    pub broker_links: usize,
    /// Broker connections allowed at once (`usize::MAX`: unbounded).
    pub broker_links_max: usize,
    /// The broker probe's last verdict (`None`: not probed yet).
    pub broker_reachable: Option<bool>,
    /// Serial ports configured, and how many are open.
    pub serial_ports: usize,
    /// Serial ports open now.
    pub serial_open: usize,
    /// A graceful stop has begun.
    pub stopping: bool,
}

/// The Prometheus text exposition (format 0.0.4) of `view`.
pub fn render(view: &View) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    for (name, value) in counters(&view.stats.metrics) {
        let help = counter_help(&name).unwrap_or("Engine counter");
        registry.register(name, help, ConstCounter::new(value));
    }
    let gauge = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
    let s = &view.stats;
    registry.register("sessions", "Client sessions in any state", gauge(s.sessions));
    registry.register("sessions_active", "Sessions connected and awake", gauge(s.active));
    registry.register("sessions_asleep", "Sessions asleep", gauge(s.asleep));
    registry.register(
        "persisted_sessions",
        "Clean-session-false devices not connected whose topic ids are kept",
        gauge(s.persisted_sessions),
    );
    registry.register(
        "held_messages",
        "Messages held for devices (asleep or behind one in flight)",
        gauge(s.held_messages),
    );
    registry.register(
        "broker_connections",
        "MQTT connections to the broker held for sessions",
        gauge(view.broker_links),
    );
    registry.register(
        "broker_connections_max",
        "Broker connections allowed at once (broker.max_connections, or the open-file limit less a reserve)",
        gauge(view.broker_links_max),
    );
    registry.register(
        "broker_reachable",
        "1 when the last probe of the broker (TCP connect; TLS handshake for mqtts://) succeeded, else 0",
        gauge(usize::from(view.broker_reachable == Some(true))),
    );
    registry.register(
        "connack_latency_seconds",
        "New sessions: CONNECT received to CONNACK accepted sent (will handshake and broker connect)",
        ConstHistogram(s.latency.connack.clone()),
    );
    registry.register(
        "publish_ack_latency_seconds",
        "Device QoS 1/2 PUBLISH received to the broker's acknowledgement (PUBACK or PUBREC sent)",
        ConstHistogram(s.latency.publish_ack.clone()),
    );
    let d = &s.dtls;
    let dtls_counters: [(&str, &str, u64); 9] = [
        ("dtls_handshakes_ok", "DTLS handshakes completed", d.handshakes_ok),
        (
            "dtls_handshakes_failed",
            "DTLS handshakes failed (wrong key, unknown identity, bad messages, timeout)",
            d.handshakes_failed,
        ),
        (
            "dtls_handshakes_busy",
            "DTLS ClientHellos with a valid cookie dropped: max_handshakes in progress",
            d.handshakes_busy,
        ),
        (
            "dtls_handshakes_rate_limited",
            "DTLS ClientHellos with a valid cookie dropped: handshake_rate exceeded",
            d.handshakes_rate_limited,
        ),
        ("dtls_cookies_sent", "DTLS HelloVerifyRequests sent", d.cookies_sent),
        (
            "dtls_plaintext_dropped",
            "Datagrams on a DTLS listener that are not DTLS records of a session or a ClientHello, dropped",
            d.plaintext_dropped,
        ),
        ("dtls_idle_closed", "DTLS sessions closed for being idle", d.idle_closed),
        (
            "dtls_certs_rejected",
            "DTLS client certificates refused (another CA, expired, no name for the identity)",
            d.certs_rejected,
        ),
        (
            "dtls_unsent",
            "Datagrams for a DTLS peer without a session (or under another identity), not sent",
            d.unsent,
        ),
    ];
    for (name, help, value) in dtls_counters {
        registry.register(name, help, ConstCounter::new(value));
    }
    let gauge64 = |n: u64| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
    registry.register(
        "dtls_sessions",
        "DTLS sessions held (established or handshaking)",
        gauge64(d.sessions),
    );
    registry.register(
        "dtls_handshaking",
        "DTLS handshakes in progress",
        gauge64(d.handshaking),
    );
    let a = &s.aggregate;
    registry.register(
        "aggregate_queue_dropped",
        "Aggregating mode: messages for devices away with clean session false dropped, their queue full",
        ConstCounter::new(a.queue_dropped),
    );
    registry.register(
        "aggregate_taken_over",
        "Aggregating mode: broker messages acknowledged before every device had them (broker.inflight owed)",
        ConstCounter::new(a.taken_over),
    );
    let aggregate_gauges: [(&str, &str, usize); 4] = [
        (
            "aggregate_filters",
            "Aggregating mode: distinct filters subscribed at the broker",
            a.filters,
        ),
        (
            "aggregate_away_devices",
            "Aggregating mode: devices away with clean session false, their subscriptions kept",
            a.away,
        ),
        (
            "aggregate_queued_messages",
            "Aggregating mode: QoS 1/2 messages kept for devices that are away",
            a.queued,
        ),
        (
            "aggregate_unacked",
            "Aggregating mode: broker QoS 1/2 messages not yet acknowledged to the broker",
            a.unacked,
        ),
    ];
    for (name, help, value) in aggregate_gauges {
        registry.register(name, help, gauge(value));
    }
    registry.register("serial_ports", "Serial ports configured", gauge(view.serial_ports));
    registry.register("serial_ports_open", "Serial ports open now", gauge(view.serial_open));
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// An engine [`Histogram`], encoded as a Prometheus histogram in seconds.
#[derive(Debug)]
struct ConstHistogram(Histogram);

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.buckets.iter().copied())
            .collect();
        // Microseconds to seconds: exact enough for any sum a gateway reaches.
        #[allow(clippy::cast_precision_loss)]
        let sum = h.sum_micros as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The health verdict: `Ok` when every listener is up, the broker is reachable and the
/// gateway is not stopping, else the reason, one line.
pub fn health(view: &View) -> Result<(), String> {
    if view.stopping {
        return Err("stopping".into());
    }
    match view.broker_reachable {
        None => return Err("broker not probed yet".into()),
        Some(false) => return Err("broker unreachable".into()),
        Some(true) => {}
    }
    if view.serial_open < view.serial_ports {
        return Err(format!(
            "{} of {} serial ports not open",
            view.serial_ports - view.serial_open,
            view.serial_ports
        ));
    }
    Ok(())
}

/// Where the HTTP server reads the runtime's state from.
#[derive(Clone)]
pub struct Sources {
    /// The engine's snapshot (refreshed every 100 ms by the engine task).
    pub stats: Arc<Mutex<Stats>>,
    /// Broker connections held.
    pub broker_links: Arc<AtomicUsize>,
    /// Broker connections allowed at once.
    pub broker_links_max: usize,
    /// The broker probe's last verdict.
    pub broker_reachable: Arc<Mutex<Option<bool>>>,
    /// The serial ports' counters.
    pub serial: SerialStatsReader,
    /// Set when a graceful stop begins.
    pub stopping: Arc<AtomicBool>,
}

impl Sources {
    /// A consistent-enough view for one scrape.
    pub fn view(&self) -> View {
        let serial = self.serial.read();
        View {
            stats: self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            broker_links: self.broker_links.load(Ordering::Relaxed),
            broker_links_max: self.broker_links_max,
            broker_reachable: *self.broker_reachable.lock().unwrap_or_else(|e| e.into_inner()),
            serial_ports: serial.len(),
            serial_open: serial.iter().filter(|p| p.open).count(),
            stopping: self.stopping.load(Ordering::Relaxed),
        }
    }
}

/// Whether the broker accepts a connection within `timeout`; why not, if it does not.
/// For `mqtts://` that is a TLS handshake with the link's own configuration (the CA,
/// the server name, the client certificate offered): a broker whose certificate the
/// gateway refuses is as unusable as one that is down. (A broker that refuses the
/// client certificate only after a TLS 1.3 handshake completes is not seen here; the
/// devices' connections see it, and are refused.)
pub async fn reach_broker(broker: &BrokerConfig, timeout: Duration) -> Result<(), String> {
    if let Some(tls) = &broker.tls {
        return tls.handshake(&broker.host, broker.port, timeout).await;
    }
    match tokio::time::timeout(timeout, TcpStream::connect((broker.host.as_str(), broker.port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// Probes the broker ([`reach_broker`]) every `every`, each given `timeout`, and stores
/// the verdict. Runs until aborted.
pub async fn probe_broker(broker: BrokerConfig, every: Duration, timeout: Duration, verdict: Arc<Mutex<Option<bool>>>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let url = broker.url();
    loop {
        tick.tick().await;
        let result = reach_broker(&broker, timeout).await;
        if let Err(reason) = &result {
            debug!(%reason, "broker probe failed");
        }
        let ok = result.is_ok();
        let mut v = verdict.lock().unwrap_or_else(|e| e.into_inner());
        if *v != Some(ok) {
            match &result {
                Ok(()) => tracing::info!(broker = %url, "broker reachable"),
                Err(reason) => warn!(broker = %url, %reason, "broker unreachable"),
            }
        }
        *v = Some(ok);
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until aborted.
pub async fn serve(listener: TcpListener, sources: Sources) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, from)) => {
                let sources = sources.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &sources).await {
                        debug!(from = %from, error = %e, "metrics connection");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A response: status line, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// The whole response, `Connection: close`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let allow = if self.status == 405 { "Allow: GET\r\n" } else { "" };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The answer to a request head (the octets up to the empty line).
pub fn respond(head: &[u8], view: impl FnOnce() -> View) -> Response {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "bad request\n");
    }
    let path = target.split('?').next().unwrap_or_default();
    let known = matches!(path, "/metrics" | "/healthz");
    if method != "GET" {
        return if known {
            Response::text(405, "method not allowed\n")
        } else {
            Response::text(404, "not found\n")
        };
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: prometheus_text::CONTENT_TYPE,
            body: render(&view()),
        },
        "/healthz" => match health(&view()) {
            Ok(()) => Response::text(200, "ok\n"),
            Err(reason) => Response::text(503, format!("{reason}\n")),
        },
        _ => Response::text(404, "not found\n"),
    }
}

async fn handle(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(end));
            }
            if buf.len() > MAX_REQUEST {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    })
    .await;
    let response = match read {
        Ok(Ok(Some(end))) => respond(buf.get(..end).unwrap_or_default(), || sources.view()),
        Ok(Ok(None)) => Response::text(431, "request too large\n"),
        Ok(Err(e)) => return Err(e),
        Err(_) => Response::text(408, "request timeout\n"),
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests;
