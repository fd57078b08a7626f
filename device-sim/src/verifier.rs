//! The broker-side verifier: an MQTT 3.1.1 subscriber (rumqttc) that records which device
//! messages reached the broker, how often, and how long after they were sent.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::latency::LatencyHistogram;
use crate::payload::Stamp;
use crate::station::now_us;

/// The broker's address, from `mqtt://host:port` (port 1883 by default) or
/// `mqtts://host:port` (TLS, port 8883 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS, for `mqtts://`; `None`: plain TCP.
    pub tls: Option<BrokerTls>,
}

/// TLS to the broker: the broker's certificate must chain to the CA file's certificates
/// (or the system's trusted roots) and name the URL's host (a DNS name, or an IP address
/// in an IP subjectAltName). The *ring* provider, as in the gateway. Compared by the CA
/// file.
#[derive(Clone)]
pub struct BrokerTls {
    ca_file: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTls")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl PartialEq for BrokerTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
    }
}

impl Eq for BrokerTls {}

impl BrokerTls {
    /// Trusts the PEM certificates of `ca_file`, or the system's roots when `None`.
    /// Errors name the file (`--broker-ca`).
    pub fn load(ca_file: Option<&Path>) -> Result<BrokerTls, String> {
        let roots = load_roots(ca_file, "--broker-ca", "mqtts:// without --broker-ca")?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(BrokerTls {
            ca_file: ca_file.map(Path::to_path_buf),
            config: Arc::new(config),
        })
    }
}

/// The trust anchors in the PEM file `ca_file` (errors name the `option`), or the
/// system's roots when `None` (an error, starting with `without`, when it has none).
pub(crate) fn load_roots(ca_file: Option<&Path>, option: &str, without: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{option}: cannot read {}: {e}", path.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{option}: {}: not a PEM file: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{option}: {}: no PEM certificate in it", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{option}: {}: not usable as a CA: {e}", path.display()))?;
            }
        }
        None => {
            let (added, _) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(format!("{without}: the system has no trusted root certificates"));
            }
        }
    }
    Ok(roots)
}

impl BrokerUrl {
    /// Parses `url`; with `ca_file` (`--broker-ca`), an `mqtts://` URL trusts that CA
    /// instead of the system's roots (and a plain URL is an error: TLS was meant).
    pub fn parse_with_ca(url: &str, ca_file: Option<&Path>) -> Result<BrokerUrl, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl", rest)) => (rest, true),
            Some((scheme, _)) => {
                return Err(format!(
                    "{url:?}: unsupported scheme {scheme:?} (use mqtt://host:port, or mqtts://host:port for TLS)"
                ))
            }
            None => (url, false),
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || (h.starts_with('[') && h.ends_with(']')) => {
                (h, p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let tls = match (tls, ca_file) {
            (true, ca) => Some(BrokerTls::load(ca)?),
            (false, Some(_)) => return Err(format!("--broker-ca is for TLS, but {url:?} is not mqtts://")),
            (false, None) => None,
        };
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// MQTT options for `client_id` at this broker, over TLS for `mqtts://` (the
    /// certificate checked against the host).
    pub fn options(&self, client_id: impl Into<String>) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone())));
        }
        o
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    /// [`BrokerUrl::parse_with_ca`] without a CA file (`mqtts://` trusts the system's roots).
    fn from_str(url: &str) -> Result<Self, String> {
        BrokerUrl::parse_with_ca(url, None)
    }
}

/// What arrived for one device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// How many times it arrived (the broker's own redeliveries to the verifier excluded).
    pub count: u32,
    /// Latency of the first arrival, µs.
    pub latency_us: u64,
}

/// Everything the verifier saw.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// By (device, sequence number).
    pub messages: HashMap<(u32, u32), Arrival>,
    /// Messages on the subscribed topics that were not this run's.
    pub foreign: u64,
    /// Will messages (topics `<prefix>/<run>-will/...`) by device.
    pub wills: HashMap<u32, u32>,
    /// Times the verifier reconnected to the broker.
    pub reconnects: u32,
    /// Of those, times the broker no longer had the verifier's session (a broker restarted
    /// without persistence): what it received meanwhile never reached the verifier.
    pub sessions_lost: u32,
    /// Stretches of time (µs, the clock of [`Stamp::sent_us`]) in which the verifier may
    /// have missed messages that did reach the broker: from shortly before a connection
    /// loss to the renewed subscriptions when the broker lost the session, or to the end
    /// when the verifier was still disconnected then.
    pub blind: Vec<(u64, u64)>,
}

impl Arrivals {
    /// Whether a message that was at the broker some time in `from_us..=until_us` could
    /// have been missed by the verifier.
    pub fn blind_during(&self, from_us: u64, until_us: u64) -> bool {
        self.blind.iter().any(|&(a, b)| from_us <= b && a <= until_us)
    }
}

/// Messages the broker had shortly before the verifier noticed the connection loss may
/// still have been on their way to it (and are gone with a lost session).
const IN_FLIGHT_SLACK_US: u64 = 1_000_000;

/// The verifier's connection, as the event loop sees it (shared with [`Verifier::finish`]).
#[derive(Debug, Default)]
struct Link {
    arrivals: Arrivals,
    /// Disconnected since (µs).
    down_since_us: Option<u64>,
    /// The broker lost the session; blind since (µs) until the subscriptions are renewed.
    blind_since_us: Option<u64>,
    /// SUBACKs still expected for renewed subscriptions.
    resubscribing: usize,
    /// Latency of the first arrivals since [`VerifierWatch::take_recent_latency`] last
    /// looked (for the time series).
    recent: LatencyHistogram,
}

/// A look at a running verifier from another task (the time series' sampler).
#[derive(Clone)]
pub struct VerifierWatch {
    link: Arc<Mutex<Link>>,
}

impl VerifierWatch {
    /// Number of distinct messages seen so far.
    pub fn distinct(&self) -> usize {
        lock(&self.link).arrivals.messages.len()
    }

    /// The latency of the messages that arrived (first copies) since the previous call,
    /// which starts the next interval.
    pub fn take_recent_latency(&self) -> LatencyHistogram {
        let mut l = lock(&self.link);
        let h = l.recent.clone();
        l.recent.reset();
        h
    }
}

/// A running verifier.
pub struct Verifier {
    link: Arc<Mutex<Link>>,
    client: AsyncClient,
    task: JoinHandle<()>,
    client_id: String,
    broker: BrokerUrl,
}

/// The verifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The broker could not be reached or did not accept the subscriptions in time.
    #[error("cannot verify at the broker {0}: {1}")]
    NoBroker(String, String),
}

/// How long the verifier waits for the broker at the start.
const START_LIMIT: Duration = Duration::from_secs(10);

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one delivery. The subscriptions are QoS 1: a copy with DUP set is the broker's
/// own redelivery to the verifier (after a reconnect it resends what the verifier may
/// not have acknowledged), not a second message from the gateway, so it counts only if
/// the first copy never arrived. Two messages from the gateway are two deliveries without
/// DUP, whatever their QoS, which is how a duplicated QoS 2 message shows. Returns the
/// latency of a first arrival (µs).
fn record(a: &mut Arrivals, run: u32, p: &rumqttc::Publish) -> Option<u64> {
    let now = now_us();
    match Stamp::decode(&p.payload) {
        Some(s) if s.run == run && p.topic.contains("-will/") => {
            if !p.dup || !a.wills.contains_key(&s.device) {
                *a.wills.entry(s.device).or_insert(0) += 1;
            }
            None
        }
        Some(s) if s.run == run => match a.messages.entry((s.device, s.seq)) {
            Entry::Occupied(_) if p.dup => None,
            Entry::Occupied(mut e) => {
                e.get_mut().count += 1;
                None
            }
            Entry::Vacant(e) => {
                let latency_us = now.saturating_sub(s.sent_us);
                e.insert(Arrival { count: 1, latency_us });
                Some(latency_us)
            }
        },
        _ => {
            a.foreign += 1;
            None
        }
    }
}

impl Verifier {
    /// Connects to the broker with a persistent session, subscribes to `filters` and waits
    /// for the SUBACKs. Fails at once when the broker cannot be reached.
    ///
    /// The session is persistent (clean session off, a client id stable for the run) so
    /// that the broker keeps the subscriptions and queues the QoS 1/2 messages while the
    /// verifier is disconnected (a broker restart, a network cut): after reconnecting it
    /// receives them and nothing is counted lost that the broker delivered.
    /// [`Verifier::finish`] ends the session.
    pub async fn start(broker: &BrokerUrl, run: u32, filters: &[String]) -> Result<Verifier, VerifierError> {
        let client_id = format!("mqtt-sn-sim-verifier-{run:08x}");
        let mut o = broker.options(client_id.clone());
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            // Brokers cap QoS 1/2 messages in flight per client (mosquitto: 20 by default,
            // and it silently drops QoS 2 publishes beyond that from a 3.1.1 client).
            .set_inflight(16)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        let link = Arc::new(Mutex::new(Link::default()));
        let (ready_tx, mut ready_rx) = watch::channel(None::<Result<(), String>>);
        let want = filters.len();
        let shared = link.clone();
        let resubscribe = client.clone();
        let owned_filters = filters.to_vec();
        let address = format!("{}:{}", broker.host, broker.port);
        let task = tokio::spawn(async move {
            let mut subacks = 0;
            let mut ready = false;
            let mut connections = 0u32;
            let mut failures = 0u32;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut l = lock(&shared);
                        if let Some(us) = record(&mut l.arrivals, run, &p) {
                            l.recent.record(us);
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        connections += 1;
                        let mut l = lock(&shared);
                        let down_since = l.down_since_us.take();
                        if connections == 1 {
                            continue;
                        }
                        l.arrivals.reconnects += 1;
                        let down_ms = down_since.map_or(0, |t| now_us().saturating_sub(t) / 1000);
                        if ack.session_present {
                            tracing::info!(
                                broker = %address, down_ms, attempts = failures,
                                "verifier reconnected; the broker kept its session"
                            );
                        } else {
                            // The broker forgot the session (restarted without persistence):
                            // subscribe again, and whatever it received meanwhile is
                            // unknowable to the verifier.
                            l.arrivals.sessions_lost += 1;
                            if l.blind_since_us.is_none() {
                                let since = down_since.unwrap_or_else(now_us);
                                l.blind_since_us = Some(since.saturating_sub(IN_FLIGHT_SLACK_US));
                            }
                            l.resubscribing = owned_filters.len();
                            for f in &owned_filters {
                                let _ = resubscribe.try_subscribe(f.clone(), QoS::AtLeastOnce);
                            }
                            tracing::warn!(
                                broker = %address, down_ms, attempts = failures,
                                "verifier reconnected but the broker lost its session (restarted without persistence?): \
                                 messages it received meanwhile cannot be verified"
                            );
                        }
                        failures = 0;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Some(code) = ack
                            .return_codes
                            .iter()
                            .find(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            if !ready {
                                let _ =
                                    ready_tx.send(Some(Err(format!("the broker refused a subscription ({code:?})"))));
                                return;
                            }
                            tracing::warn!(broker = %address, "the broker refused a renewed subscription of the verifier");
                        }
                        if !ready {
                            subacks += 1;
                            if subacks >= want {
                                ready = true;
                                let _ = ready_tx.send(Some(Ok(())));
                            }
                            continue;
                        }
                        let mut l = lock(&shared);
                        if l.resubscribing > 0 {
                            l.resubscribing -= 1;
                            if l.resubscribing == 0 {
                                if let Some(since) = l.blind_since_us.take() {
                                    l.arrivals.blind.push((since, now_us()));
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !ready {
                            // Fail fast, with one clear error instead of a warning per
                            // attempt: nothing can be verified without the broker.
                            let _ = ready_tx.send(Some(Err(e.to_string())));
                            return;
                        }
                        failures += 1;
                        {
                            let mut l = lock(&shared);
                            if l.down_since_us.is_none() {
                                l.down_since_us = Some(now_us());
                                tracing::warn!(
                                    broker = %address, error = %e,
                                    "verifier lost its broker connection; reconnecting (a broker that keeps its session queues its messages meanwhile)"
                                );
                            } else {
                                tracing::debug!(broker = %address, error = %e, attempts = failures, "verifier still disconnected");
                            }
                        }
                        // rumqttc reconnects on the next poll.
                        let backoff = 100 * u64::from(failures.min(10));
                        tokio::time::sleep(Duration::from_millis(backoff)).await;
                    }
                }
            }
        });
        // QoS 1, not 2: rumqttc forgets the QoS 2 packet ids it received when a connection
        // drops, so the PUBREL a broker resends on the resumed session would be an error
        // (and the connection would drop again). QoS 1 with DUP-aware counting (`record`)
        // verifies as much.
        for f in filters {
            // Queued until the connection is up.
            let _ = client.subscribe(f.clone(), QoS::AtLeastOnce).await;
        }
        let outcome = tokio::time::timeout(START_LIMIT, async {
            loop {
                if let Some(r) = ready_rx.borrow_and_update().clone() {
                    return r;
                }
                if ready_rx.changed().await.is_err() {
                    return Err("the verifier stopped".to_string());
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no subscription acknowledged within {START_LIMIT:?}")));
        if let Err(e) = outcome {
            task.abort();
            return Err(VerifierError::NoBroker(format!("{}:{}", broker.host, broker.port), e));
        }
        Ok(Verifier {
            link,
            client,
            task,
            client_id,
            broker: broker.clone(),
        })
    }

    /// A look at the verifier from another task.
    pub fn watch(&self) -> VerifierWatch {
        VerifierWatch {
            link: self.link.clone(),
        }
    }

    /// A handle to publish on the verifier's broker connection (downlink messages).
    pub fn publisher(&self) -> AsyncClient {
        self.client.clone()
    }

    /// Number of distinct messages seen so far.
    pub fn distinct(&self) -> usize {
        lock(&self.link).arrivals.messages.len()
    }

    /// Whether the verifier is connected to the broker right now.
    pub fn connected(&self) -> bool {
        lock(&self.link).down_since_us.is_none()
    }

    /// Stops, ends the persistent session on the broker and returns what arrived.
    pub async fn finish(self) -> Arrivals {
        self.task.abort();
        let _ = self.task.await;
        drop(self.client);
        let arrivals = {
            let mut l = lock(&self.link);
            let now = now_us();
            // Still disconnected, or the session lost and not yet renewed: whatever the
            // broker holds for the verifier was not seen.
            let down = l.down_since_us.take().map(|t| t.saturating_sub(IN_FLIGHT_SLACK_US));
            if let Some(since) = l.blind_since_us.take().into_iter().chain(down).min() {
                l.arrivals.blind.push((since, now));
            }
            std::mem::take(&mut l.arrivals)
        };
        end_session(&self.broker, &self.client_id).await;
        arrivals
    }
}

/// Connects with a clean session under the verifier's client id and disconnects, so that
/// the broker drops the persistent session (and stops queueing messages for it).
/// Best effort and bounded: the broker may be gone.
async fn end_session(broker: &BrokerUrl, client_id: &str) {
    let mut o = broker.options(client_id);
    o.set_clean_session(true).set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(o, 4);
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        let mut connected = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // The clean CONNECT alone discarded the session.
                    connected = true;
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return true,
                Ok(_) => {}
                Err(_) => return connected,
            }
        }
    })
    .await;
    if ended != Ok(true) {
        tracing::warn!(
            client_id,
            "could not end the verifier's session on the broker; it keeps it until it expires"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(run: u32, device: u32, seq: u32, dup: bool) -> rumqttc::Publish {
        let mut payload = Vec::new();
        Stamp {
            run,
            device,
            seq,
            qos: sn_codec::QoS::ExactlyOnce,
            sent_us: 0,
        }
        .encode(0, &mut payload);
        let mut p = rumqttc::Publish::new("sim/run/g/1", QoS::AtLeastOnce, payload);
        p.dup = dup;
        p
    }

    #[test]
    fn the_brokers_redeliveries_are_not_duplicates() {
        let mut a = Arrivals::default();
        record(&mut a, 7, &delivery(7, 1, 0, false));
        // The broker resends what the verifier may not have acknowledged (DUP set).
        record(&mut a, 7, &delivery(7, 1, 0, true));
        assert_eq!(a.messages.get(&(1, 0)).map(|x| x.count), Some(1));
        // A redelivery whose first copy was lost with the connection is the arrival.
        record(&mut a, 7, &delivery(7, 1, 1, true));
        assert_eq!(a.messages.get(&(1, 1)).map(|x| x.count), Some(1));
        // A second message from the gateway is a second delivery without DUP.
        record(&mut a, 7, &delivery(7, 1, 0, false));
        assert_eq!(a.messages.get(&(1, 0)).map(|x| x.count), Some(2));
        record(&mut a, 7, &delivery(8, 1, 0, false));
        assert_eq!(a.foreign, 1);
    }

    #[test]
    fn blind_windows() {
        let a = Arrivals {
            blind: vec![(100, 200)],
            ..Arrivals::default()
        };
        assert!(a.blind_during(50, 100));
        assert!(a.blind_during(150, 160));
        assert!(a.blind_during(190, 400));
        assert!(!a.blind_during(10, 99));
        assert!(!a.blind_during(201, 300));
    }

    #[test]
    fn broker_urls() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1883".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1883));
        let u: BrokerUrl = "localhost".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("localhost", 1883));
        let u: BrokerUrl = "tcp://broker:1999/".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("broker", 1999));
        assert!("ws://x:1".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:port".parse::<BrokerUrl>().is_err());
    }

    #[test]
    fn tls_broker_urls() {
        // The gateway's throwaway test CA.
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/src/broker/testdata/ca.pem");
        let u = BrokerUrl::parse_with_ca("mqtts://127.0.0.1", Some(&ca)).expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8883));
        assert_eq!(u.tls.as_ref().and_then(|t| t.ca_file.as_deref()), Some(ca.as_path()));
        let u = BrokerUrl::parse_with_ca("ssl://[::1]:18883", Some(&ca)).expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.tls.is_some()), ("::1", 18883, true));
        let e = BrokerUrl::parse_with_ca("mqtt://127.0.0.1", Some(&ca)).expect_err("plain with a CA");
        assert!(e.contains("--broker-ca is for TLS"), "{e}");
        let e = BrokerUrl::parse_with_ca("mqtts://127.0.0.1", Some(Path::new("/nonexistent/ca.pem")))
            .expect_err("no such file");
        assert!(e.starts_with("--broker-ca: cannot read /nonexistent/ca.pem"), "{e}");
        let key = ca.with_file_name("client.key");
        let e = BrokerUrl::parse_with_ca("mqtts://127.0.0.1", Some(&key)).expect_err("a key, no certificate");
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
