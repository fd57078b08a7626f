//! Transparent mode: one MQTT 3.1.1 connection ([`super::conn`], our own lean task) per
//! MQTT-SN client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::conn::{self, ConnEvent, ConnOptions, ConnRequest, EventSink, Gone, NotQueued};
use super::tls::BrokerTls;
use super::{
    BrokerEvent, BrokerLink, ClientKey, Command, ConnectParams, DeliveryId, LogThrottle, Message, MqttQos,
    RejectReason, GATEWAY_KEY,
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
    /// Requests queued per device connection (transparent mode: with `backlog_capacity`,
    /// the bound of one connection's request queue; aggregating mode does not use it, its
    /// shared connections are bounded by `backlog_capacity` and `backlog_bytes`).
    pub request_capacity: usize,
    /// Requests held per connection, in order, beyond `request_capacity` (a device
    /// bursting faster than its broker connection drains): the burst is absorbed and
    /// written as the connection drains, instead of being dropped. Beyond this, QoS 0
    /// publishes are dropped (counted, warned) and QoS 1/2 answered congestion.
    pub backlog_capacity: usize,
    /// Topic and payload octets a connection's queue may hold (a request is always taken
    /// into an empty queue): what bounds the memory one device (or a device at a forged
    /// address) can make the gateway hold.
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
    /// Local addresses the broker connections are made from, one after the other (each
    /// gives its own ~28,000 ephemeral ports toward one broker address); empty: the
    /// kernel's choice.
    pub source_addresses: Vec<IpAddr>,
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
            source_addresses: Vec::new(),
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

/// How often the link logs, at most, that a connection's queue overflowed.
const FULL_WARN_EVERY: Duration = Duration::from_secs(10);

/// The largest packet taken from the broker (its remaining length).
const MAX_PACKET: usize = 256 * 1024;

/// One device's connection as the link holds it: the sending half of its task's request
/// queue. Packet ids and the pairing of acknowledgements are the task's ([`conn`]).
struct Conn {
    requests: conn::Requests,
    /// Which connection of this key this is: a late end of an older one must not remove
    /// it.
    generation: u64,
    broker_id: Arc<str>,
}

/// A connection's task ended (whatever the reason): its table entries can go.
#[derive(Debug)]
struct Ended {
    key: ClientKey,
    generation: u64,
    broker_id: Arc<str>,
}

/// Reports the end of a connection task when dropped, so that every way a task ends
/// (refused, unreachable, closed by the broker, DISCONNECT sent, gateway stopping, even a
/// panic) frees the connection's entries.
struct EndGuard {
    ended: mpsc::UnboundedSender<Ended>,
    key: ClientKey,
    generation: u64,
    broker_id: Arc<str>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let _ = self.ended.send(Ended {
            key: self.key,
            generation: self.generation,
            broker_id: self.broker_id.clone(),
        });
    }
}

/// A device connection's events as the engine takes them: as [`BrokerEvent`]s, with the
/// device's key, on the link's one event channel (awaited: a busy engine holds the
/// connection's reading back).
struct Keyed {
    key: ClientKey,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
}

impl EventSink for Keyed {
    fn send(&mut self, event: ConnEvent) -> impl std::future::Future<Output = Result<(), Gone>> + Send {
        let event = match event {
            ConnEvent::Connected { session_present } => BrokerEvent::Connected { session_present },
            ConnEvent::ConnectFailed { reason, refused } => BrokerEvent::ConnectFailed { reason, refused },
            ConnEvent::Published { tag } => BrokerEvent::Published { token: tag },
            // One filter per SUBSCRIBE here.
            ConnEvent::SubAck { tag, granted } => BrokerEvent::SubAck {
                token: tag,
                granted: granted.first().copied().flatten(),
            },
            ConnEvent::UnsubAck { tag } => BrokerEvent::UnsubAck { token: tag },
            ConnEvent::Message {
                topic,
                payload,
                qos,
                retain,
                pkid,
                dup: _,
            } => BrokerEvent::Message(Message {
                topic,
                payload,
                qos,
                retain,
                delivery: pack_delivery(qos, pkid),
            }),
            ConnEvent::Closed { reason } => BrokerEvent::Closed { reason },
        };
        async move { self.events.send((self.key, event)).await.map_err(|_| Gone) }
    }
}

/// The transparent-mode broker link: a connection per client, each run by its own task
/// ([`conn`]), all reporting to one event channel.
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
    /// Which of `broker.source_addresses` the next connection is made from.
    next_source: usize,
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
            next_source: 0,
        }
    }

    /// The source address of the next connection: `broker.source_addresses` in turn, so
    /// that each gives its own ephemeral ports toward the broker.
    fn next_source(&mut self) -> Option<IpAddr> {
        let sources = &self.cfg.source_addresses;
        let ip = *sources.get(self.next_source % sources.len().max(1))?;
        self.next_source = (self.next_source + 1) % sources.len();
        Some(ip)
    }

    fn options(&mut self, p: &ConnectParams) -> ConnOptions {
        let source = self.next_source();
        let cfg = &self.cfg;
        let tls = cfg.tls.as_ref().map(|tls| match &p.client_identity {
            // A device with its own certificate (device registry) presents it. Validated
            // when the registry was loaded, so this does not fail in practice; if it does,
            // the connection goes without a client certificate rather than with the
            // gateway's.
            Some(identity) => tls.config_for(identity).unwrap_or_else(|e| {
                warn!(client = %p.client_id, error = %e, "the device's TLS client certificate cannot be used");
                tls.config_without_client_auth()
            }),
            None => tls.config(),
        });
        // The device's own login (device registry) replaces the global one.
        let credentials = match (&p.credentials, &cfg.username) {
            (Some(c), _) => Some((c.username.clone(), c.password.clone())),
            (None, Some(u)) => Some((u.clone(), cfg.password.clone().unwrap_or_default())),
            (None, None) => None,
        };
        ConnOptions {
            host: cfg.host.clone(),
            port: cfg.port,
            tls,
            source,
            client_id: format!("{}{}", cfg.client_id_prefix, p.client_id),
            clean_session: p.clean_session,
            keep_alive: Duration::from_secs(u64::from(p.keep_alive)),
            credentials,
            will: p.will.clone(),
            connect_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
            inflight: cfg.inflight.max(1),
            max_packet_size: MAX_PACKET,
        }
    }

    fn connect(&mut self, key: ClientKey, p: ConnectParams) {
        let opts = self.options(&p);
        let broker_id: Arc<str> = opts.client_id.as_str().into();
        let (requests, queue) = conn::queue(
            self.cfg.request_capacity.saturating_add(self.cfg.backlog_capacity),
            self.cfg.backlog_bytes,
        );
        self.next_generation += 1;
        let generation = self.next_generation;
        let guard = EndGuard {
            ended: self.ended_tx.clone(),
            key,
            generation,
            broker_id: broker_id.clone(),
        };
        let previous = self.last_task.remove(&broker_id).map(|(_, t)| t);
        let wait = opts.connect_timeout;
        let sink = Keyed {
            key,
            events: self.events.clone(),
        };
        let task = tokio::spawn(async move {
            let _guard = guard;
            if let Some(previous) = previous {
                // Bounded: a stuck old connection does not keep the device out for good.
                let _ = tokio::time::timeout(wait, previous).await;
            }
            conn::run(opts, queue, sink).await;
        });
        self.last_task.insert(broker_id.clone(), (generation, task));
        let conn = Conn {
            requests,
            generation,
            broker_id,
        };
        if let Some(old) = self.conns.insert(key, conn) {
            let _ = old.requests.send_anyway(ConnRequest::Disconnect);
        }
    }

    /// Queues `request` on `key`'s connection within its queue's bounds; on failure, the
    /// reason for the session.
    fn submit(&mut self, key: ClientKey, request: ConnRequest) -> Result<(), RejectReason> {
        let Some(conn) = self.conns.get(&key) else {
            return Err(RejectReason::Closed);
        };
        match conn.requests.try_send(request) {
            Ok(()) => Ok(()),
            Err(NotQueued::Closed(_)) => Err(RejectReason::Closed),
            Err(NotQueued::Full(_)) => {
                if let Some(held_back) = self.full_warn.allow(Instant::now()) {
                    warn!(
                        key,
                        client = %conn.broker_id,
                        requests = self.cfg.request_capacity.saturating_add(self.cfg.backlog_capacity),
                        backlog_bytes = self.cfg.backlog_bytes,
                        held_back,
                        "broker connection queue full: the device sends faster than the broker takes; \
                         QoS 0 publishes dropped, QoS 1/2 answered congestion"
                    );
                }
                Err(RejectReason::Full)
            }
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
        let (token, outcome) = match command {
            Command::Connect(_) | Command::Expire { .. } => return None,
            Command::Publish {
                token,
                topic,
                payload,
                qos,
                retain,
            } => {
                let request = ConnRequest::Publish {
                    tag: (qos != MqttQos::AtMostOnce).then_some(token),
                    topic,
                    payload,
                    qos,
                    retain,
                };
                (token, self.submit(key, request))
            }
            Command::Subscribe { token, filter, qos } => {
                let request = ConnRequest::Subscribe {
                    tag: token,
                    filters: vec![(Arc::from(filter), qos)],
                };
                (token, self.submit(key, request))
            }
            Command::Unsubscribe { token, filter } => {
                let request = ConnRequest::Unsubscribe {
                    tag: token,
                    filters: vec![Arc::from(filter)],
                };
                (token, self.submit(key, request))
            }
            Command::Ack { delivery } => {
                let (qos, pkid) = unpack_delivery(delivery);
                // Never refused for a full queue: an ack is small, and the broker's
                // messages in flight bound how many there are.
                let sent = self
                    .conns
                    .get(&key)
                    .is_some_and(|c| c.requests.send_anyway(ConnRequest::Ack { pkid, qos }).is_ok());
                if !sent {
                    // Not lost: unacknowledged, the broker delivers it again.
                    debug!(key, pkid, "acknowledgement not queued: the connection is gone");
                }
                return None;
            }
            Command::Disconnect { will } => {
                let conn = self.conns.remove(&key)?;
                // After what the device sent before it went: the will (its QoS 1/2
                // exchange completes before DISCONNECT goes, a QoS 2 publish cut off
                // after PUBREC being never delivered), then DISCONNECT.
                if let Some(w) = will {
                    let _ = conn.requests.send_anyway(ConnRequest::Publish {
                        tag: None,
                        topic: Arc::from(w.topic),
                        payload: w.message,
                        qos: w.qos,
                        retain: w.retain,
                    });
                }
                let _ = conn.requests.send_anyway(ConnRequest::Disconnect);
                return None;
            }
        };
        match outcome {
            Ok(()) => None,
            Err(reason) => {
                debug!(key, ?reason, "request not queued");
                Some(BrokerEvent::Rejected { token, reason })
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
    async fn the_queue_is_bounded_in_octets() {
        // Nothing drains the request queue: the connection never gets its CONNACK.
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
            qos: MqttQos::AtLeastOnce,
            retain: false,
        };
        // Two fit (8,000 octets), the third is over.
        let outcomes: Vec<Option<BrokerEvent>> = (1..=3).map(|t| links.execute(1, publish(t))).collect();
        assert_eq!(outcomes[..2], [None, None], "{outcomes:?}");
        assert_eq!(
            outcomes[2],
            Some(BrokerEvent::Rejected {
                token: 3,
                reason: RejectReason::Full
            })
        );
        // An acknowledgement and the DISCONNECT are taken however full the queue is.
        assert_eq!(
            links.execute(
                1,
                Command::Ack {
                    delivery: pack_delivery(MqttQos::AtLeastOnce, 9)
                }
            ),
            None
        );
        assert_eq!(links.execute(1, Command::Disconnect { will: None }), None);
        assert_eq!(links.active(), 0);
    }

    /// A single request larger than `backlog_bytes` still goes when the queue is empty.
    #[tokio::test]
    async fn a_large_request_fits_an_empty_queue() {
        let port = silent_broker().await;
        let (tx, _rx) = mpsc::channel(16);
        let cfg = BrokerConfig {
            port,
            connect_timeout_secs: 30,
            backlog_bytes: 100,
            ..BrokerConfig::default()
        };
        let mut links = MqttLinks::new(cfg, tx);
        links.execute(1, Command::Connect(params("large")));
        let publish = |token| Command::Publish {
            token,
            topic: Arc::from("t"),
            payload: bytes::Bytes::from(vec![0u8; 1000]),
            qos: MqttQos::AtMostOnce,
            retain: false,
        };
        assert_eq!(links.execute(1, publish(1)), None);
        assert!(matches!(
            links.execute(1, publish(2)),
            Some(BrokerEvent::Rejected {
                reason: RejectReason::Full,
                ..
            })
        ));
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
