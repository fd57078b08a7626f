//! Transparent mode: one MQTT 3.1.1 connection (rumqttc) per MQTT-SN client.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ClientError, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions,
    Outgoing, Publish, Request, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::tls::BrokerTls;
use super::{
    BrokerEvent, BrokerLink, ClientKey, Command, ConnectParams, DeliveryId, LogThrottle, Message, MqttQos,
    RejectReason, Token, GATEWAY_KEY,
};

/// Where and how to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS (`mqtts://`), with the broker's certificate checked against these roots and
    /// `host`; `None`: plain TCP.
    pub tls: Option<BrokerTls>,
    /// User name sent in every CONNECT, if any.
    pub username: Option<String>,
    /// Password sent with the user name.
    pub password: Option<String>,
    /// Prepended to each device's client id on the broker.
    pub client_id_prefix: String,
    /// Requests queued per connection in rumqttc's request channel.
    pub request_capacity: usize,
    /// Requests held per connection, in order, once rumqttc's request channel is full
    /// (a device bursting faster than its broker connection drains): the burst is
    /// absorbed and fed to rumqttc as it drains, instead of being dropped. Beyond this,
    /// QoS 0 publishes are dropped (counted, warned) and QoS 1/2 answered congestion.
    pub backlog_capacity: usize,
    /// Topic and payload octets the backlog may hold per connection: what bounds the
    /// memory one device (or a device at a forged address) can make the gateway hold.
    pub backlog_bytes: usize,
    /// QoS 1/2 publishes per connection awaiting the broker's acknowledgement.
    pub inflight: u16,
    /// Seconds to wait for the TCP connection and CONNACK.
    pub connect_timeout_secs: u64,
    /// Client id of the gateway's own connection, which carries QoS -1 publishes
    /// ([`super::GATEWAY_KEY`]); `client_id_prefix` is prepended like any other.
    pub gateway_client_id: String,
    /// Broker connections held at once (one per device in transparent mode); a CONNECT
    /// beyond gets CONNACK congestion. `None`: derived from the process's open-file
    /// limit at start ([`crate::open_files`]).
    pub max_connections: Option<usize>,
    /// Transparent (a connection per device) or aggregating (shared connections).
    pub mode: LinkMode,
    /// Aggregating mode: the shared connections, devices spread over them by client id.
    pub connections: usize,
    /// Aggregating mode: QoS 1/2 messages kept per device that is away with clean
    /// session false (the oldest goes first beyond).
    pub offline_queue: usize,
    /// Aggregating mode: the shared connections' client id, followed by `-N` (and
    /// preceded by `client_id_prefix`).
    pub aggregate_client_id: String,
}

/// How devices reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// One MQTT connection per device, with its client id, clean-session flag and will.
    #[default]
    Transparent,
    /// A few shared MQTT connections for all devices; the gateway keeps the
    /// subscriptions, sessions and wills (docs/scaling.md).
    Aggregating,
}

impl std::fmt::Display for LinkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkMode::Transparent => "transparent",
            LinkMode::Aggregating => "aggregating",
        })
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            tls: None,
            username: None,
            password: None,
            client_id_prefix: String::new(),
            request_capacity: 256,
            backlog_capacity: 16_384,
            backlog_bytes: 1 << 20,
            inflight: 16,
            connect_timeout_secs: 5,
            max_connections: None,
            gateway_client_id: "mqtt-sn-gw-1-qos-1".into(),
            mode: LinkMode::Transparent,
            connections: 1,
            offline_queue: 1000,
            aggregate_client_id: "mqtt-sn-gw-1".into(),
        }
    }
}

/// A broker URL, parsed: where, and whether over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://` (or `ssl://`): TLS.
    pub tls: bool,
}

impl BrokerConfig {
    /// Parses `mqtt://host:port` (also `tcp://`, or a bare `host:port`; port 1883 when
    /// omitted) and `mqtts://host:port` (also `ssl://`; TLS, port 8883 when omitted).
    pub fn parse_url(url: &str) -> Result<BrokerUrl, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl", rest)) => (rest, true),
            Some((scheme, _)) => {
                return Err(format!(
                    "broker URL {url:?}: unknown scheme {scheme:?} (mqtt:// for TCP, mqtts:// for TLS)"
                ))
            }
            None => (url, false),
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("broker URL {url:?}: bad port {p:?}"))
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            // [IPv6 address], with or without :port.
            match bracketed.split_once(']') {
                Some((h, "")) => (h, default_port),
                Some((h, p)) => match p.strip_prefix(':') {
                    Some(p) => (h, port_of(p)?),
                    None => return Err(format!("broker URL {url:?}: expected :port after ]")),
                },
                None => return Err(format!("broker URL {url:?}: no ] after [")),
            }
        } else {
            match rest.rsplit_once(':') {
                // A bare IPv6 address has more than one colon: no port then.
                Some((h, p)) if !h.contains(':') => (h, port_of(p)?),
                _ => (rest, default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("broker URL {url:?}: no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// `mqtt://host:port` or `mqtts://host:port`, for the log.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

pub(super) fn rumqttc_qos(q: MqttQos) -> rumqttc::QoS {
    match q {
        MqttQos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        MqttQos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        MqttQos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

pub(super) fn our_qos(q: rumqttc::QoS) -> MqttQos {
    match q {
        rumqttc::QoS::AtMostOnce => MqttQos::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => MqttQos::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => MqttQos::ExactlyOnce,
    }
}

/// Tokens of requests handed to rumqttc, in the order rumqttc will report them sent.
/// rumqttc keeps publishes in order among themselves, and other control packets in
/// order among themselves, so one queue per kind pairs each with its packet id.
#[derive(Debug, Default)]
struct Pending {
    publishes: VecDeque<Option<Token>>,
    subscribes: VecDeque<Token>,
    unsubscribes: VecDeque<Token>,
    /// Told when the broker has the will of a lost client (PUBACK for QoS 1, PUBCOMP for
    /// QoS 2), so that DISCONNECT is not sent before: a QoS 2 publish cut off after PUBREC
    /// is never delivered.
    will_done: Option<oneshot::Sender<()>>,
}

/// The token of a lost client's will publish: never a session's token (those count up
/// from 1), and answered by no event.
const WILL_TOKEN: Token = Token::MAX;

/// How often the link logs, at most, that a connection's backlog overflowed.
const FULL_WARN_EVERY: Duration = Duration::from_secs(10);

/// How long a connection that sent DISCONNECT waits for the broker to close its side.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Requests held back for a connection whose rumqttc request channel was full, and the
/// task that feeds them to rumqttc in order as the channel drains (back-pressure in the
/// place of a drop).
struct Backlog {
    tx: mpsc::UnboundedSender<Request>,
    fill: Arc<Fill>,
    task: JoinHandle<()>,
}

/// What a backlog holds: requests sent to it and not yet taken by rumqttc's channel
/// (while not zero, every new request goes to the backlog too, so order is kept), and
/// their topic and payload octets.
#[derive(Default)]
struct Fill {
    requests: AtomicUsize,
    bytes: AtomicUsize,
}

/// The octets a request holds in a backlog (topic and payload; acknowledgements none).
fn request_bytes(r: &Request) -> usize {
    match r {
        Request::Publish(p) => p.topic.len() + p.payload.len(),
        Request::Subscribe(s) => s.filters.iter().map(|f| f.path.len()).sum(),
        Request::Unsubscribe(u) => u.topics.iter().map(String::len).sum(),
        _ => 0,
    }
}

struct Conn {
    client: AsyncClient,
    pending: Arc<Mutex<Pending>>,
    /// Which connection of this key this is: a late end of an older one must not remove
    /// it.
    generation: u64,
    /// Cleared when the connection's drive task ends.
    alive: Arc<AtomicBool>,
    broker_id: Arc<str>,
    backlog: Option<Backlog>,
}

/// A connection's drive task ended (whatever the reason): its table entries can go.
#[derive(Debug)]
struct Ended {
    key: ClientKey,
    generation: u64,
    broker_id: Arc<str>,
}

/// Reports the end of a drive task when dropped, so that every way a task ends (refused,
/// unreachable, closed by the broker, DISCONNECT sent, gateway stopping, even a panic)
/// frees the connection's entries.
struct EndGuard {
    ended: mpsc::UnboundedSender<Ended>,
    alive: Arc<AtomicBool>,
    key: ClientKey,
    generation: u64,
    broker_id: Arc<str>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        let _ = self.ended.send(Ended {
            key: self.key,
            generation: self.generation,
            broker_id: self.broker_id.clone(),
        });
    }
}

/// The transparent-mode broker link: a connection per client, each driven by its own
/// task, all reporting to one event channel.
///
/// A connection's entry goes when the session closes it ([`Command::Disconnect`]) or
/// when its task ends by itself (broker refused or unreachable, connection lost); the
/// latter is learnt by [`MqttLinks::reap`], which the runtime calls every loop turn.
pub struct MqttLinks {
    cfg: Arc<BrokerConfig>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    conns: HashMap<ClientKey, Conn>,
    /// The running connection task of each broker client id, with its generation: a new
    /// connection with the same id waits for the old one to close, so the broker never
    /// sees them overlap. Removed when the task ends.
    last_task: HashMap<Arc<str>, (u64, JoinHandle<()>)>,
    next_generation: u64,
    ended_tx: mpsc::UnboundedSender<Ended>,
    ended_rx: mpsc::UnboundedReceiver<Ended>,
    full_warn: LogThrottle,
    /// Connections allowed at once (`broker.max_connections`, resolved at start).
    max_connections: usize,
    limit_warn: LogThrottle,
}

impl MqttLinks {
    /// A link reporting to `events`.
    pub fn new(cfg: BrokerConfig, events: mpsc::Sender<(ClientKey, BrokerEvent)>) -> Self {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let max_connections = cfg.max_connections.unwrap_or(usize::MAX);
        MqttLinks {
            cfg: Arc::new(cfg),
            events,
            conns: HashMap::new(),
            last_task: HashMap::new(),
            next_generation: 0,
            ended_tx,
            ended_rx,
            full_warn: LogThrottle::new(FULL_WARN_EVERY),
            max_connections,
            limit_warn: LogThrottle::new(FULL_WARN_EVERY),
        }
    }

    fn options(&self, p: &ConnectParams) -> MqttOptions {
        let id = format!("{}{}", self.cfg.client_id_prefix, p.client_id);
        let mut o = MqttOptions::new(id, self.cfg.host.clone(), self.cfg.port);
        o.set_clean_session(p.clean_session)
            .set_keep_alive(Duration::from_secs(u64::from(p.keep_alive)))
            .set_manual_acks(true)
            .set_inflight(self.cfg.inflight.max(1))
            .set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some(tls) = &self.cfg.tls {
            // rumqttc checks the certificate against the host it connects to (an IP
            // address host against the certificate's IP subjectAltNames).
            let config = match &p.client_identity {
                // A device with its own certificate (device registry) presents it.
                // Validated when the registry was loaded, so this does not fail in
                // practice; if it does, the connection goes without a client
                // certificate rather than with the gateway's.
                Some(identity) => tls.config_for(identity).unwrap_or_else(|e| {
                    tracing::warn!(client = %p.client_id, error = %e, "the device's TLS client certificate cannot be used");
                    tls.config_without_client_auth()
                }),
                None => tls.config(),
            };
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
        }
        if let Some(c) = &p.credentials {
            // The device's own login (device registry) replaces the global one.
            o.set_credentials(c.username.clone(), c.password.clone());
        } else if let (Some(u), Some(pw)) = (&self.cfg.username, &self.cfg.password) {
            o.set_credentials(u.clone(), pw.clone());
        } else if let Some(u) = &self.cfg.username {
            o.set_credentials(u.clone(), String::new());
        }
        if let Some(w) = &p.will {
            o.set_last_will(LastWill::new(
                w.topic.clone(),
                w.message.clone(),
                rumqttc_qos(w.qos),
                w.retain,
            ));
        }
        o
    }

    fn connect(&mut self, key: ClientKey, p: ConnectParams) {
        let options = self.options(&p);
        let broker_id: Arc<str> = options.client_id().into();
        let (client, eventloop) = AsyncClient::new(options, self.cfg.request_capacity.max(1));
        let pending = Arc::new(Mutex::new(Pending::default()));
        self.next_generation += 1;
        let generation = self.next_generation;
        let alive = Arc::new(AtomicBool::new(true));
        let guard = EndGuard {
            ended: self.ended_tx.clone(),
            alive: alive.clone(),
            key,
            generation,
            broker_id: broker_id.clone(),
        };
        let previous = self.last_task.remove(&broker_id).map(|(_, t)| t);
        let task = tokio::spawn(drive(
            key,
            eventloop,
            pending.clone(),
            self.events.clone(),
            previous,
            self.cfg.clone(),
            guard,
        ));
        self.last_task.insert(broker_id.clone(), (generation, task));
        let conn = Conn {
            client,
            pending,
            generation,
            alive,
            broker_id,
            backlog: None,
        };
        if let Some(old) = self.conns.insert(key, conn) {
            let _ = old.client.try_disconnect();
        }
    }

    /// Hands one request to rumqttc, or to the connection's backlog when rumqttc's
    /// channel is full (or the backlog already holds something: order is kept).
    fn submit(
        cfg: &BrokerConfig,
        full_warn: &mut LogThrottle,
        key: ClientKey,
        conn: &mut Conn,
        direct: impl FnOnce(&AsyncClient) -> Result<(), ClientError>,
        request: impl FnOnce() -> Request,
    ) -> Result<(), RejectReason> {
        let backlogged = conn
            .backlog
            .as_ref()
            .map_or(0, |b| b.fill.requests.load(Ordering::Acquire));
        let request = if backlogged == 0 {
            match direct(&conn.client) {
                Ok(()) => return Ok(()),
                Err(ClientError::TryRequest(r) | ClientError::Request(r)) => r,
            }
        } else {
            request()
        };
        if !conn.alive.load(Ordering::Acquire) {
            return Err(RejectReason::Closed);
        }
        let size = request_bytes(&request);
        let held_bytes = conn
            .backlog
            .as_ref()
            .map_or(0, |b| b.fill.bytes.load(Ordering::Acquire));
        if backlogged >= cfg.backlog_capacity || held_bytes + size > cfg.backlog_bytes {
            if let Some(held_back) = full_warn.allow(Instant::now()) {
                warn!(
                    key,
                    client = %conn.broker_id,
                    backlog = cfg.backlog_capacity,
                    backlog_bytes = cfg.backlog_bytes,
                    held_back,
                    "broker connection backlog full: the device sends faster than the broker takes; \
                     QoS 0 publishes dropped, QoS 1/2 answered congestion"
                );
            }
            return Err(RejectReason::Full);
        }
        let backlog = conn.backlog.get_or_insert_with(|| {
            debug!(key, client = %conn.broker_id, "request channel full: holding requests in the backlog");
            let (tx, rx) = mpsc::unbounded_channel();
            let fill = Arc::new(Fill::default());
            let task = tokio::spawn(feed_backlog(conn.client.clone(), rx, fill.clone()));
            Backlog { tx, fill, task }
        });
        backlog.fill.requests.fetch_add(1, Ordering::AcqRel);
        backlog.fill.bytes.fetch_add(size, Ordering::AcqRel);
        if backlog.tx.send(request).is_err() {
            backlog.fill.requests.fetch_sub(1, Ordering::AcqRel);
            backlog.fill.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(RejectReason::Closed);
        }
        Ok(())
    }
}

/// Feeds a connection's backlog to rumqttc in order, each request waiting for room in
/// the request channel. Ends when the connection is dropped and the backlog is empty.
async fn feed_backlog(client: AsyncClient, mut rx: mpsc::UnboundedReceiver<Request>, fill: Arc<Fill>) {
    while let Some(request) = rx.recv().await {
        let size = request_bytes(&request);
        let sent = match request {
            Request::Publish(p) => client.publish_bytes(p.topic, p.qos, p.retain, p.payload).await,
            Request::Subscribe(s) => match s.filters.into_iter().next() {
                Some(f) => client.subscribe(f.path, f.qos).await,
                None => Ok(()),
            },
            Request::Unsubscribe(u) => match u.topics.into_iter().next() {
                Some(t) => client.unsubscribe(t).await,
                None => Ok(()),
            },
            Request::PubAck(a) => {
                let mut p = Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = a.pkid;
                client.ack(&p).await
            }
            Request::PubRec(a) => {
                let mut p = Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::new());
                p.pkid = a.pkid;
                client.ack(&p).await
            }
            _ => Ok(()),
        };
        fill.requests.fetch_sub(1, Ordering::AcqRel);
        fill.bytes.fetch_sub(size, Ordering::AcqRel);
        if let Err(e) = sent {
            // The connection's task has ended: its session learns it from the Closed
            // (or ConnectFailed) event; what is left here has nowhere to go.
            debug!(error = %e, "backlogged request not delivered: connection gone");
        }
    }
}

impl BrokerLink for MqttLinks {
    fn execute(&mut self, key: ClientKey, command: Command) -> Option<BrokerEvent> {
        if let Command::Expire { .. } = command {
            // The broker expires the session by its own setting.
            return None;
        }
        if let Command::Connect(p) = command {
            if self.conns.len() >= self.max_connections && !self.conns.contains_key(&key) {
                if let Some(held_back) = self.limit_warn.allow(Instant::now()) {
                    warn!(
                        limit = self.max_connections,
                        held_back,
                        "CONNECT refused with congestion: the broker connection limit is reached. Transparent mode holds one \
                         TCP connection, an open file, per device: raise the open-file limit (LimitNOFILE) or \
                         broker.max_connections, or spread the devices over several gateways (docs/scaling.md)"
                    );
                }
                return Some(BrokerEvent::ConnectFailed {
                    reason: format!("broker connection limit ({}) reached", self.max_connections),
                    refused: false,
                });
            }
            self.connect(key, p);
            return None;
        }
        if key == GATEWAY_KEY && !self.conns.contains_key(&key) {
            // The gateway's own connection: opened by its first publish, and by the
            // next one after it was lost (its entry is freed when it ends).
            let params = ConnectParams {
                client_id: self.cfg.gateway_client_id.clone(),
                clean_session: true,
                keep_alive: 60,
                will: None,
                credentials: None,
                client_identity: None,
            };
            self.connect(key, params);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return match command {
                Command::Publish { token, .. }
                | Command::Subscribe { token, .. }
                | Command::Unsubscribe { token, .. } => Some(BrokerEvent::Rejected {
                    token,
                    reason: RejectReason::Closed,
                }),
                _ => None,
            };
        };
        let cfg = &self.cfg;
        let full_warn = &mut self.full_warn;
        match command {
            Command::Connect(_) | Command::Expire { .. } => None,
            Command::Publish {
                token,
                topic,
                payload,
                qos,
                retain,
            } => {
                let pending = conn.pending.clone();
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                let t = (qos != MqttQos::AtMostOnce).then_some(token);
                pending.publishes.push_back(t);
                let q = rumqttc_qos(qos);
                // Exactly one of the two closures below runs.
                let payload = std::cell::Cell::new(Some(payload));
                let take = || payload.take().unwrap_or_default();
                let result = Self::submit(
                    cfg,
                    full_warn,
                    key,
                    conn,
                    |c| c.try_publish(&*topic, q, retain, Vec::from(take())),
                    || {
                        let mut p = Publish::from_bytes(&*topic, q, take());
                        p.retain = retain;
                        Request::Publish(p)
                    },
                );
                match result {
                    Ok(()) => None,
                    Err(reason) => {
                        pending.publishes.pop_back();
                        debug!(key, ?reason, "publish not queued");
                        Some(BrokerEvent::Rejected { token, reason })
                    }
                }
            }
            Command::Subscribe { token, filter, qos } => {
                let pending = conn.pending.clone();
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.subscribes.push_back(token);
                let q = rumqttc_qos(qos);
                let f2 = filter.clone();
                let result = Self::submit(
                    cfg,
                    full_warn,
                    key,
                    conn,
                    |c| c.try_subscribe(filter, q),
                    || Request::Subscribe(rumqttc::Subscribe::new(f2, q)),
                );
                match result {
                    Ok(()) => None,
                    Err(reason) => {
                        pending.subscribes.pop_back();
                        debug!(key, ?reason, "subscribe not queued");
                        Some(BrokerEvent::Rejected { token, reason })
                    }
                }
            }
            Command::Unsubscribe { token, filter } => {
                let pending = conn.pending.clone();
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.unsubscribes.push_back(token);
                let f2 = filter.clone();
                let result = Self::submit(
                    cfg,
                    full_warn,
                    key,
                    conn,
                    |c| c.try_unsubscribe(filter),
                    || Request::Unsubscribe(rumqttc::Unsubscribe::new(f2)),
                );
                match result {
                    Ok(()) => None,
                    Err(reason) => {
                        pending.unsubscribes.pop_back();
                        debug!(key, ?reason, "unsubscribe not queued");
                        Some(BrokerEvent::Rejected { token, reason })
                    }
                }
            }
            Command::Ack { delivery } => {
                let (qos, pkid) = unpack_delivery(delivery);
                let mut p = Publish::new("", rumqttc_qos(qos), Vec::new());
                p.pkid = pkid;
                let request = || match qos {
                    MqttQos::ExactlyOnce => Request::PubRec(rumqttc::PubRec::new(pkid)),
                    _ => Request::PubAck(rumqttc::PubAck::new(pkid)),
                };
                if let Err(reason) = Self::submit(cfg, full_warn, key, conn, |c| c.try_ack(&p), request) {
                    // Not lost: unacknowledged, the broker delivers it again.
                    warn!(key, pkid, ?reason, "acknowledgement not queued");
                }
                None
            }
            Command::Disconnect { will } => {
                let conn = self.conns.remove(&key)?;
                let mut done = None;
                if let Some(w) = &will {
                    let mut pending = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
                    if w.qos == MqttQos::AtMostOnce {
                        pending.publishes.push_back(None);
                    } else {
                        let (tx, rx) = oneshot::channel();
                        pending.publishes.push_back(Some(WILL_TOKEN));
                        pending.will_done = Some(tx);
                        done = Some(rx);
                    }
                }
                let wait = Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
                // Awaiting in a task keeps the order (backlog, will, then DISCONNECT)
                // even when the request queue is full, without blocking the engine.
                tokio::spawn(async move {
                    if let Some(backlog) = conn.backlog {
                        // What the device sent before it went comes before the DISCONNECT.
                        drop(backlog.tx);
                        let _ = tokio::time::timeout(wait, backlog.task).await;
                    }
                    if let Some(w) = will {
                        let _ = conn
                            .client
                            .publish_bytes(w.topic, rumqttc_qos(w.qos), w.retain, w.message)
                            .await;
                    }
                    if let Some(done) = done {
                        // Bounded: a broker that does not answer does not hold the link open.
                        let _ = tokio::time::timeout(wait, done).await;
                    }
                    let _ = conn.client.disconnect().await;
                });
                None
            }
        }
    }

    fn active(&self) -> usize {
        self.conns.len()
    }

    /// Connections allowed at once.
    fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Frees the entries of connections whose task has ended. Cheap when none has.
    fn reap(&mut self) {
        while let Ok(e) = self.ended_rx.try_recv() {
            if self.conns.get(&e.key).is_some_and(|c| c.generation == e.generation) {
                self.conns.remove(&e.key);
            }
            if self
                .last_task
                .get(&e.broker_id)
                .is_some_and(|(g, _)| *g == e.generation)
            {
                self.last_task.remove(&e.broker_id);
            }
        }
    }

    /// Connection tasks still running (including those closing after their session
    /// ended), after [`BrokerLink::reap`].
    fn tasks(&self) -> usize {
        self.last_task.len()
    }

    /// Closes every connection still open with an MQTT DISCONNECT (no will), after what
    /// is already queued on it. For the gateway's shutdown, once the sessions have closed
    /// theirs.
    fn close_all(&mut self) {
        let keys: Vec<ClientKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.execute(key, Command::Disconnect { will: None });
        }
    }

    /// Waits, until `deadline`, for every connection task to end (for a closed
    /// connection: its DISCONNECT written to the broker). Returns how many did not.
    fn wait_closed(&mut self, deadline: tokio::time::Instant) -> impl std::future::Future<Output = usize> + Send {
        let tasks: Vec<_> = self.last_task.drain().map(|(_, (_, t))| t).collect();
        self.reap();
        async move {
            let mut left = 0;
            for task in tasks {
                if tokio::time::timeout_at(deadline, task).await.is_err() {
                    left += 1;
                }
            }
            left
        }
    }
}

/// A delivery on one connection: its QoS and the broker's packet id, which is all the
/// acknowledgement needs (the connection is the session's own).
fn pack_delivery(qos: MqttQos, pkid: u16) -> DeliveryId {
    DeliveryId((qos as u64) << 16 | u64::from(pkid))
}

/// The QoS and packet id of a [`pack_delivery`] handle.
fn unpack_delivery(d: DeliveryId) -> (MqttQos, u16) {
    let qos = match d.0 >> 16 {
        2 => MqttQos::ExactlyOnce,
        1 => MqttQos::AtLeastOnce,
        _ => MqttQos::AtMostOnce,
    };
    (qos, (d.0 & 0xFFFF) as u16)
}

/// Tells the task closing a lost client's link that the broker has its will.
fn will_delivered(pending: &Mutex<Pending>) {
    if let Some(tx) = pending.lock().unwrap_or_else(|e| e.into_inner()).will_done.take() {
        let _ = tx.send(());
    }
}

/// Whether a connect failure is the broker's answer (it will answer the same again)
/// rather than a transient failure to reach it. "Server unavailable" is transient.
pub(super) fn is_refusal(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized
                | ConnectReturnCode::BadClientId
                | ConnectReturnCode::RefusedProtocolVersion
        )
    )
}

/// Why a connection failed, for the log, and whether it was refused (the broker, or its
/// TLS, will answer the same on every retry) rather than unreachable.
pub(super) fn failure(cfg: &BrokerConfig, e: &ConnectionError) -> (String, bool) {
    // A TLS failure (untrusted or misnamed certificate, client certificate refused) is
    // answered the same on every retry: a refusal.
    let tls = cfg.tls.as_ref().and_then(|_| super::tls::failure(e, &cfg.host));
    let refused = tls.is_some() || is_refusal(e);
    (tls.unwrap_or_else(|| e.to_string()), refused)
}

/// After DISCONNECT: polls until the broker has closed its side (it has then processed
/// the DISCONNECT), at most [`CLOSE_WAIT`], so that a next connection with the same client
/// id never reaches a broker still holding this one.
pub(super) async fn wait_for_close(eventloop: &mut EventLoop) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async { while eventloop.poll().await.is_ok() {} }).await;
}

/// Drives one broker connection until it closes, translating rumqttc's events.
async fn drive(
    key: ClientKey,
    mut eventloop: EventLoop,
    pending: Arc<Mutex<Pending>>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    previous: Option<JoinHandle<()>>,
    cfg: Arc<BrokerConfig>,
    _guard: EndGuard,
) {
    let connect_timeout_secs = cfg.connect_timeout_secs;
    if let Some(previous) = previous {
        let _ = tokio::time::timeout(Duration::from_secs(connect_timeout_secs.max(1)), previous).await;
    }
    eventloop
        .network_options
        .set_connection_timeout(connect_timeout_secs.max(1));
    let mut connected = false;
    let mut publishes: HashMap<u16, Token> = HashMap::new();
    let mut subscribes: HashMap<u16, Token> = HashMap::new();
    let mut unsubscribes: HashMap<u16, Token> = HashMap::new();
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(incoming)) => match incoming {
                Incoming::ConnAck(ack) => {
                    connected = true;
                    Some(BrokerEvent::Connected {
                        session_present: ack.session_present,
                    })
                }
                Incoming::Publish(p) => Some(BrokerEvent::Message(Message {
                    topic: p.topic.into(),
                    payload: p.payload,
                    qos: our_qos(p.qos),
                    retain: p.retain,
                    delivery: pack_delivery(our_qos(p.qos), p.pkid),
                })),
                Incoming::PubAck(a) => match publishes.remove(&a.pkid) {
                    Some(WILL_TOKEN) => {
                        will_delivered(&pending);
                        None
                    }
                    token => token.map(|token| BrokerEvent::Published { token }),
                },
                Incoming::PubRec(a) => match publishes.remove(&a.pkid) {
                    // The will is the broker's once PUBCOMP completes the exchange.
                    Some(WILL_TOKEN) => {
                        publishes.insert(a.pkid, WILL_TOKEN);
                        None
                    }
                    token => token.map(|token| BrokerEvent::Published { token }),
                },
                Incoming::PubComp(a) => {
                    if publishes.get(&a.pkid) == Some(&WILL_TOKEN) {
                        publishes.remove(&a.pkid);
                        will_delivered(&pending);
                    }
                    None
                }
                Incoming::SubAck(a) => subscribes.remove(&a.pkid).map(|token| BrokerEvent::SubAck {
                    token,
                    granted: match a.return_codes.first() {
                        Some(SubscribeReasonCode::Success(q)) => Some(our_qos(*q)),
                        _ => None,
                    },
                }),
                Incoming::UnsubAck(a) => unsubscribes
                    .remove(&a.pkid)
                    .map(|token| BrokerEvent::UnsubAck { token }),
                _ => None,
            },
            Ok(Event::Outgoing(outgoing)) => {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                match outgoing {
                    Outgoing::Publish(pkid) => {
                        if let Some(Some(token)) = p.publishes.pop_front() {
                            publishes.insert(pkid, token);
                        }
                    }
                    Outgoing::Subscribe(pkid) => {
                        if let Some(token) = p.subscribes.pop_front() {
                            subscribes.insert(pkid, token);
                        }
                    }
                    Outgoing::Unsubscribe(pkid) => {
                        if let Some(token) = p.unsubscribes.pop_front() {
                            unsubscribes.insert(pkid, token);
                        }
                    }
                    Outgoing::Disconnect => {
                        drop(p);
                        wait_for_close(&mut eventloop).await;
                        return;
                    }
                    _ => {}
                }
                None
            }
            Err(e) => {
                let (reason, refused) = failure(&cfg, &e);
                let event = if connected {
                    BrokerEvent::Closed { reason }
                } else {
                    BrokerEvent::ConnectFailed { reason, refused }
                };
                let _ = events.send((key, event)).await;
                return;
            }
        };
        if let Some(event) = event {
            if events.send((key, event)).await.is_err() {
                return; // The gateway is shutting down.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn a_delivery_handle_carries_qos_and_packet_id() {
        for (qos, pkid) in [
            (MqttQos::AtLeastOnce, 1),
            (MqttQos::ExactlyOnce, 65_535),
            (MqttQos::AtLeastOnce, 0x1234),
        ] {
            assert_eq!(unpack_delivery(pack_delivery(qos, pkid)), (qos, pkid));
        }
        assert_ne!(
            pack_delivery(MqttQos::AtLeastOnce, 7),
            pack_delivery(MqttQos::ExactlyOnce, 7)
        );
    }

    fn params(id: &str) -> ConnectParams {
        ConnectParams {
            client_id: id.into(),
            clean_session: true,
            keep_alive: 30,
            will: None,
            credentials: None,
            client_identity: None,
        }
    }

    fn links_to(port: u16, connect_timeout_secs: u64) -> (MqttLinks, mpsc::Receiver<(ClientKey, BrokerEvent)>) {
        let (tx, rx) = mpsc::channel(4096);
        let cfg = BrokerConfig {
            port,
            connect_timeout_secs,
            ..BrokerConfig::default()
        };
        (MqttLinks::new(cfg, tx), rx)
    }

    /// A loopback port nobody listens on.
    fn unused_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// A "broker" that reads the CONNECT and answers CONNACK with `code` (or, for
    /// `None`, closes the connection at once).
    async fn fake_broker(code: Option<u8>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    if let Some(code) = code {
                        let mut buf = [0; 512];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(&[0x20, 0x02, 0x00, code]).await;
                        let _ = s.read(&mut buf).await;
                    }
                });
            }
        });
        port
    }

    /// Connects `n` clients, waits for each one's ConnectFailed, and for the link to
    /// free every entry. Returns the failures' `refused` flags.
    async fn connect_and_fail(port: u16, n: u64) -> Vec<bool> {
        // A generous timeout: a loaded machine must not turn a refusal into a timeout.
        let (mut links, mut rx) = links_to(port, 10);
        for key in 1..=n {
            assert_eq!(links.execute(key, Command::Connect(params(&format!("c{key}")))), None);
        }
        assert_eq!(links.active(), n as usize);
        let mut refused = Vec::new();
        while refused.len() < n as usize {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some((_, BrokerEvent::ConnectFailed { refused: r, .. }))) => refused.push(r),
                other => panic!("expected ConnectFailed, got {other:?}"),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            links.reap();
            if links.active() == 0 && links.tasks() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "broker link entries not freed: {} connections, {} tasks",
                links.active(),
                links.tasks()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        refused
    }

    #[tokio::test]
    async fn unreachable_broker_frees_every_link() {
        let refused = connect_and_fail(unused_port(), 200).await;
        assert!(refused.iter().all(|r| !r), "unreachable is not a refusal");
    }

    #[tokio::test]
    async fn broker_closing_at_once_frees_every_link() {
        let refused = connect_and_fail(fake_broker(None).await, 200).await;
        assert!(refused.iter().all(|r| !r));
    }

    #[tokio::test]
    async fn refusing_broker_frees_every_link_and_says_refused() {
        // CONNACK 5: not authorised.
        let refused = connect_and_fail(fake_broker(Some(5)).await, 200).await;
        assert!(refused.iter().all(|r| *r), "CONNACK 5 is a refusal");
        // CONNACK 3: server unavailable is transient.
        let refused = connect_and_fail(fake_broker(Some(3)).await, 3).await;
        assert!(refused.iter().all(|r| !r), "CONNACK 3 is transient");
    }

    /// A broker that accepts connections and never answers (no CONNACK): its port.
    async fn silent_broker() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        port
    }

    #[tokio::test]
    async fn late_end_of_an_old_connection_keeps_the_new_one() {
        // Each attempt ends at the timeout.
        let port = silent_broker().await;
        let (mut links, mut rx) = links_to(port, 1);
        links.execute(1, Command::Connect(params("same")));
        // The same session connects again (a new generation) under another broker id,
        // so that it does not wait for the first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        links.execute(1, Command::Connect(params("other")));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(first, Ok(Some((1, BrokerEvent::ConnectFailed { .. })))),
            "{first:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        links.reap();
        assert_eq!(links.active(), 1, "the old connection's end removed the new one");
        let second = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(second, Ok(Some((1, BrokerEvent::ConnectFailed { .. })))),
            "{second:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        links.reap();
        assert_eq!((links.active(), links.tasks()), (0, 0));
    }

    #[tokio::test]
    async fn the_gateway_connection_opens_at_its_first_publish_and_again_after_a_loss() {
        let (mut links, mut rx) = links_to(unused_port(), 1);
        let publish = || Command::Publish {
            token: 0,
            topic: "ab".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: MqttQos::AtMostOnce,
            retain: false,
        };
        assert_eq!(links.active(), 0, "nothing opened before a QoS -1 publish");
        assert_eq!(links.execute(GATEWAY_KEY, publish()), None);
        assert_eq!(links.active(), 1, "the first publish opens the gateway's connection");
        let failed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(failed, Ok(Some((GATEWAY_KEY, BrokerEvent::ConnectFailed { .. })))),
            "{failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        links.reap();
        assert_eq!(links.active(), 0);
        // The next publish opens it again; a session's key never does.
        links.execute(GATEWAY_KEY, publish());
        assert_eq!(links.active(), 1);
        assert!(matches!(
            links.execute(7, publish()),
            None | Some(BrokerEvent::Rejected { .. })
        ));
        assert_eq!(links.active(), 1);
    }

    /// A device sending large publishes faster than its connection drains is held to
    /// `backlog_bytes`, however few requests that is.
    #[tokio::test]
    async fn the_backlog_is_bounded_in_octets() {
        // Nothing drains the request channel.
        let port = silent_broker().await;
        let (tx, _rx) = mpsc::channel(16);
        let cfg = BrokerConfig {
            port,
            connect_timeout_secs: 30,
            request_capacity: 1,
            backlog_capacity: 1000,
            backlog_bytes: 10_000,
            ..BrokerConfig::default()
        };
        let mut links = MqttLinks::new(cfg, tx);
        links.execute(1, Command::Connect(params("big")));
        let publish = |token| Command::Publish {
            token,
            topic: Arc::from("t"),
            payload: bytes::Bytes::from(vec![0u8; 3999]),
            qos: MqttQos::AtMostOnce,
            retain: false,
        };
        // One in rumqttc's channel, two in the backlog (8,000 octets), the fourth over.
        let outcomes: Vec<Option<BrokerEvent>> = (1..=4).map(|t| links.execute(1, publish(t))).collect();
        assert_eq!(outcomes[..3], [None, None, None], "{outcomes:?}");
        assert_eq!(
            outcomes[3],
            Some(BrokerEvent::Rejected {
                token: 4,
                reason: RejectReason::Full
            })
        );
    }

    #[test]
    fn urls() {
        let url = |host: &str, port, tls| {
            Ok(BrokerUrl {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(
            BrokerConfig::parse_url("mqtt://127.0.0.1:1884"),
            url("127.0.0.1", 1884, false)
        );
        assert_eq!(BrokerConfig::parse_url("tcp://broker"), url("broker", 1883, false));
        assert_eq!(BrokerConfig::parse_url("localhost:99"), url("localhost", 99, false));
        assert_eq!(BrokerConfig::parse_url("mqtt://[::1]:1883"), url("::1", 1883, false));
        assert_eq!(BrokerConfig::parse_url("mqtts://x:1"), url("x", 1, true));
        assert_eq!(BrokerConfig::parse_url("mqtts://broker/"), url("broker", 8883, true));
        assert_eq!(BrokerConfig::parse_url("ssl://[::1]"), url("::1", 8883, true));
        assert!(BrokerConfig::parse_url("ws://x:1").is_err());
        assert!(BrokerConfig::parse_url("mqtt://x:port").is_err());
        assert!(BrokerConfig::parse_url("mqtt://:1").is_err());
        assert!(BrokerConfig::parse_url("mqtts://:1").is_err());
        assert_eq!(BrokerConfig::parse_url("::1"), url("::1", 1883, false));
        assert!(BrokerConfig::parse_url("mqtt://[::1").is_err());
        assert!(BrokerConfig::parse_url("mqtt://[::1]x").is_err());
    }
}
