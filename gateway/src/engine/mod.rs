//! The sans-IO gateway engine.
//!
//! [`Gateway`] owns every client session. It is fed datagrams
//! ([`Gateway::handle_datagram`]), broker events ([`Gateway::handle_broker_event`]) and
//! time ([`Gateway::handle_timeout`]); it queues datagrams to send
//! ([`Gateway::poll_transmit`]) and broker commands ([`Gateway::poll_command`]), and says
//! when it next needs time ([`Gateway::poll_timeout`]). It holds no socket and reads no
//! clock, so every protocol rule is testable with a fake clock.

mod discovery;
mod persisted;
mod qos2;
mod session;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sn_codec::{Packet, QoS};
use tracing::{debug, info, warn};

use crate::auth::{AddressChange, AuthConfig, Denied, Refusal, Registry};
use crate::broker::{BrokerEvent, ClientKey, Command, LogThrottle, MqttQos, RejectReason};
pub use crate::link::{LinkAddr, Peer};
use crate::store::{Presence, StoreOp, StoredSession, UnixMillis};
use crate::topics::{self, Predefined, TopicChange, TopicTable};
use persisted::{Kept, Persisted, Stored};
pub use session::SessionState;
use session::{Ctx, Flow, Session};

/// Whether a session at `old` may move to `new` as far as DTLS goes: a session under a
/// DTLS identity only to the same identity (its own device, at a new address), a
/// session without one only to a link without one.
fn same_identity(old: &Peer, new: &Peer) -> bool {
    match (&old.link, &new.link) {
        (LinkAddr::Dtls(_, _, a), LinkAddr::Dtls(_, _, b)) => a == b,
        (LinkAddr::Dtls(..), _) | (_, LinkAddr::Dtls(..)) => false,
        _ => true,
    }
}

/// A datagram to send to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination (on a forwarder, the message is already encapsulated).
    pub to: LinkAddr,
    /// The encoded message.
    pub data: Vec<u8>,
}

/// Settings of the engine (the protocol side of the configuration).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Gateway id sent in GWINFO and ADVERTISE.
    pub gateway_id: u8,
    /// Tretry: how long to wait for a device's answer before retransmitting.
    pub retry_interval: Duration,
    /// Nretry: retransmissions before the client is declared lost.
    pub max_retries: u32,
    /// A client silent for `keep_alive_factor` x its keep-alive is lost.
    pub keep_alive_factor: f64,
    /// A sleeping client not heard from within `sleep_factor` x its sleep duration is lost.
    pub sleep_factor: f64,
    /// Longest sleep duration accepted; longer requests are shortened to it.
    pub max_sleep: Duration,
    /// How long the will handshake and the broker connect may take.
    pub connect_timeout: Duration,
    /// Maximum number of client sessions (CONNACK congestion beyond).
    pub max_clients: usize,
    /// Maximum normal topic ids per client (REGACK/SUBACK congestion beyond).
    pub max_topics_per_client: usize,
    /// Per-client bound on held messages (QoS 0 beyond it are dropped, oldest first).
    pub max_queued_messages: usize,
    /// Per-client bound on held payload octets (QoS 0 beyond it are dropped, oldest first).
    pub max_queued_bytes: usize,
    /// Clean-session-false clients whose topic ids are kept after they go.
    pub max_persisted_sessions: usize,
    /// How long the topic ids of a clean-session-false client that went are kept
    /// (`None`: until it comes back, within `max_persisted_sessions`).
    pub session_expiry: Option<Duration>,
    /// Predefined topic ids.
    pub predefined: Arc<Predefined>,
    /// Accept QoS -1 publishes from any address.
    pub qos_minus_one: bool,
    /// Tadv (spec 6.1): the period of ADVERTISE broadcasts, also sent as their duration
    /// field (so at most 65535 s). `None`: the gateway never advertises.
    pub advertise_interval: Option<Duration>,
    /// The UDP broadcast or multicast address that ADVERTISE, and GWINFO answers to
    /// SEARCHGW received over UDP, are sent to, from UDP listener 0. `None`: discovery
    /// over UDP is unicast answers only.
    pub udp_broadcast: Option<SocketAddr>,
    /// Who may connect, from where, and to which topics (see [`crate::auth`]).
    pub auth: AuthConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            gateway_id: 1,
            retry_interval: Duration::from_secs(10),
            max_retries: 5,
            keep_alive_factor: 1.5,
            sleep_factor: 1.5,
            max_sleep: Duration::from_secs(u64::from(u16::MAX)),
            connect_timeout: Duration::from_secs(30),
            max_clients: 100_000,
            max_topics_per_client: 1_000,
            max_queued_messages: 100,
            max_queued_bytes: 64 * 1024,
            max_persisted_sessions: 100_000,
            session_expiry: None,
            predefined: Arc::new(Predefined::default()),
            qos_minus_one: true,
            advertise_interval: Some(Duration::from_secs(900)),
            udp_broadcast: None,
            auth: AuthConfig::default(),
        }
    }
}

/// Counters kept by the engine. Gauges (clients by state, held messages) are computed on
/// request by [`Gateway::stats`]. Displayed as `name=value` pairs of the counters that are
/// not zero, for the statistics line.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Metrics {
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Datagrams that did not decode.
    pub malformed: u64,
    /// Session messages from addresses with no session.
    pub unknown_peer: u64,
    /// Messages not valid in the session's current state.
    pub unexpected: u64,
    /// Device publishes forwarded to the broker (QoS -1 included).
    pub publishes_in: u64,
    /// Kept topic ids of clean-session-false devices dropped after `session_expiry`.
    pub sessions_expired: u64,
    /// State store commits that failed (disk full, I/O error): what they held is not
    /// durable, and is lost if the gateway dies before a later commit succeeds.
    pub store_write_errors: u64,
    /// Broker messages delivered to devices.
    pub publishes_out: u64,
    /// QoS -1 publishes forwarded.
    pub qos_minus_one: u64,
    /// QoS -1 publishes dropped (normal topic id, unknown predefined id, or disabled).
    pub qos_minus_one_dropped: u64,
    /// Publishes rejected for an unknown topic id.
    pub invalid_topic: u64,
    /// QoS 0 messages dropped because a client's buffer was full.
    pub qos0_dropped: u64,
    /// Messages that could not be delivered (topic table full, too long to encode,
    /// rejected by the device).
    pub undeliverable: u64,
    /// Retransmissions to devices.
    pub retransmissions: u64,
    /// Clients connected (CONNACK accepted).
    pub connects: u64,
    /// CONNECTs refused (limits, broker refusal).
    pub connects_refused: u64,
    /// Clean disconnects.
    pub disconnects: u64,
    /// Clients lost (keep-alive, sleep deadline, retries).
    pub lost: u64,
    /// Sessions ended because their broker connection closed.
    pub broker_closed: u64,
    /// Sessions taken over by a new CONNECT with the same client id.
    pub takeovers: u64,
    /// Times a client went to sleep.
    pub sleeps: u64,
    /// Times a client woke (PINGREQ with client id).
    pub wakes: u64,
    /// Requests the broker link could not queue (its request channel was full or the
    /// connection was gone); QoS 1/2 publishes among them were answered with congestion.
    pub broker_rejected: u64,
    /// Late copies of completed QoS 2 publishes, not forwarded again.
    pub duplicates_dropped: u64,
    /// ADVERTISE messages sent (one per link).
    pub advertisements: u64,
    /// SEARCHGW messages answered with GWINFO.
    pub searchgw: u64,
    /// Links (serial ports) that went away; their sessions are counted in `lost`.
    pub links_down: u64,
    /// Topic names and filters refused before reaching the broker (control characters,
    /// wildcards in a name, malformed filters, empty, too long, not UTF-8; see
    /// [`topics::check_topic_name`]): in REGISTER, PUBLISH to a short name (QoS -1
    /// included), SUBSCRIBE, UNSUBSCRIBE and will topics. Answered with return code 0x03
    /// where the message has one.
    pub topic_refused: u64,
    /// QoS 0 publishes (device and QoS -1) dropped because their broker connection's
    /// queue and backlog were full (also counted in `broker_rejected`).
    pub qos0_dropped_broker_full: u64,
    /// QoS 0 publishes dropped because their broker connection was gone (also counted
    /// in `broker_rejected`).
    pub qos0_dropped_broker_closed: u64,
    /// CONNECTs refused in registry mode: no entry names the client id (also counted
    /// in `connects_refused`).
    pub auth_unknown_client: u64,
    /// CONNECTs (and QoS -1 publishes) refused in registry mode: the address is
    /// not among the entry's `addresses` (CONNECTs also in `connects_refused`).
    pub auth_address_refused: u64,
    /// REGISTER, PUBLISH (QoS -1 included) and will topics outside the device's
    /// `publish` patterns.
    pub auth_publish_denied: u64,
    /// SUBSCRIBEs outside the device's `subscribe` patterns.
    pub auth_subscribe_denied: u64,
    /// REGISTER, PUBLISH (QoS -1 included) and will topics starting with `$`, refused
    /// in every mode.
    pub auth_dollar_refused: u64,
    /// CONNECTs with a live session's client id from another address, refused
    /// (`address_change = "deny"`; also counted in `connects_refused`).
    pub auth_takeover_refused: u64,
    /// PINGREQs with a sleeping (or awake) client's id from another address, refused
    /// (`address_change = "deny"`, or an address outside its registry entry).
    pub auth_wake_refused: u64,
    /// CONNECTs over DTLS whose client id the registry does not bind to the session's
    /// PSK identity, and CONNECTs of a `dtls_only` device not over DTLS (also counted in
    /// `connects_refused`).
    pub auth_identity_refused: u64,
    /// CONNECTs refused because the mountpoint cannot be formed for the device (also
    /// counted in `connects_refused`), and QoS -1 publishes dropped for that reason.
    pub mountpoint_refused: u64,
    /// Broker messages outside a device's mountpoint, not delivered.
    pub mountpoint_dropped: u64,
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Through serde, so that a new counter is shown without being listed here.
        let Ok(toml::Value::Table(counters)) = toml::Value::try_from(self) else {
            return write!(f, "{self:?}");
        };
        let mut first = true;
        for (name, value) in counters.iter().filter(|(_, v)| v.as_integer() != Some(0)) {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Counts a topic refused to a device, by reason.
    pub(crate) fn count_denied(&mut self, denied: Denied) {
        match denied {
            Denied::Dollar => self.auth_dollar_refused += 1,
            Denied::Acl => self.auth_publish_denied += 1,
        }
    }

    /// Counts a QoS 0 publish the broker link could not take, by reason.
    pub(crate) fn qos0_dropped_by_link(&mut self, reason: RejectReason) {
        match reason {
            RejectReason::Full => self.qos0_dropped_broker_full += 1,
            RejectReason::Closed => self.qos0_dropped_broker_closed += 1,
        }
    }
}

/// A snapshot of gauges and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions in any state.
    pub sessions: usize,
    /// Sessions connected and awake (active or delivering after a wake).
    pub active: usize,
    /// Sessions asleep.
    pub asleep: usize,
    /// Messages held for devices (asleep or behind one in flight).
    pub held_messages: usize,
    /// Clean-session-false devices not connected whose topic ids are kept.
    pub persisted_sessions: usize,
    /// Counters.
    pub metrics: Metrics,
    /// Latency histograms.
    pub latency: Latencies,
    /// The DTLS listeners' counters, totalled (filled in by the runtime; the engine
    /// sees only decrypted datagrams).
    pub dtls: crate::transport::dtls::DtlsCounters,
    /// Aggregating mode's shared connections, totalled (filled in by the runtime).
    pub aggregate: crate::broker::aggregate::AggregateStats,
}

/// Upper bounds, in seconds, of the buckets of every latency [`Histogram`].
pub const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram of durations over [`LATENCY_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative): `buckets[i]` counts those above
    /// bucket `i - 1`'s bound and up to bucket `i`'s; the last counts those above every
    /// bound.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Observations.
    pub count: u64,
    /// Sum of the observations, microseconds.
    pub sum_micros: u64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }
}

/// Latencies the engine measures (with the time it is given, so testable like the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latencies {
    /// A new session's CONNECT received to its CONNACK (accepted) sent: the will
    /// handshake and the broker's MQTT connect.
    pub connack: Histogram,
    /// A device's QoS 1/2 PUBLISH received to its acknowledgement from the broker (PUBACK
    /// or PUBREC sent to the device).
    pub publish_ack: Histogram,
}

/// The engine's queued outputs.
#[derive(Debug, Default)]
pub(crate) struct Output {
    transmits: VecDeque<Transmit>,
    commands: VecDeque<(ClientKey, Command)>,
}

impl Output {
    /// Encodes `packet` for `to`, encapsulating it for a forwarder when needed. Returns
    /// false when it cannot be encoded (too long).
    pub(crate) fn send(&mut self, to: &Peer, packet: &Packet<'_>) -> bool {
        self.send_with_radius(to, 0, packet)
    }

    /// [`Output::send`], with the broadcast `radius` a forwarder is asked to use (the
    /// Ctrl octet of the encapsulation, spec 5.5; ignored for direct peers).
    pub(crate) fn send_with_radius(&mut self, to: &Peer, radius: u8, packet: &Packet<'_>) -> bool {
        let len = packet.encoded_len();
        let result = match &to.node {
            None => {
                let mut data = vec![0; len];
                packet.encode(&mut data).map(|n| {
                    data.truncate(n);
                    data
                })
            }
            Some(node) => {
                let mut data = vec![0; len + node.len() + 3];
                sn_codec::encode_encapsulated(radius, node, packet, &mut data).map(|n| {
                    data.truncate(n);
                    data
                })
            }
        };
        match result {
            Ok(data) => {
                self.transmits.push_back(Transmit {
                    to: to.link.clone(),
                    data,
                });
                true
            }
            Err(e) => {
                warn!(peer = %to, error = %e, "cannot encode {:?}", packet.msg_type());
                false
            }
        }
    }

    pub(crate) fn command(&mut self, client: ClientKey, command: Command) {
        self.commands.push_back((client, command));
    }
}

/// The key QoS -1 publishes are sent with: the gateway's own ([`crate::broker::GATEWAY_KEY`]),
/// no session's. The link decides which connection carries them.
pub const QOS_MINUS_ONE_KEY: ClientKey = crate::broker::GATEWAY_KEY;

/// The gateway engine: every session, and the tables that find them.
#[derive(Debug)]
pub struct Gateway {
    cfg: Arc<EngineConfig>,
    sessions: HashMap<ClientKey, Session>,
    by_peer: HashMap<Peer, ClientKey>,
    by_client_id: HashMap<Arc<str>, ClientKey>,
    persisted: Persisted,
    timers: BTreeSet<(Instant, ClientKey)>,
    next_key: ClientKey,
    out: Output,
    metrics: Metrics,
    latency: Latencies,
    /// When the next periodic ADVERTISE is due (set by [`Gateway::start`]).
    next_advertise: Option<Instant>,
    /// Broadcast links that are up (serial ports): ADVERTISE goes to each.
    up_links: BTreeSet<LinkAddr>,
    /// Set by [`Gateway::shutdown`]: whether wills are published on the way out.
    stopping: Option<bool>,
    /// Rate limits of the log lines for brokers refusing or unreachable.
    refused_log: LogThrottle,
    unreachable_log: LogThrottle,
    /// Rate limit of the INFO lines for requests the access rules refuse.
    auth_log: LogThrottle,
    /// With a state store: the writes queued for it (see [`Gateway::restore`]).
    store: Option<StoreQueue>,
}

/// The engine's side of the state store: the writes queued for the runtime to commit.
#[derive(Debug)]
struct StoreQueue {
    ops: Vec<StoreOp>,
    /// A write is queued or being committed: datagrams wait until it is durable (a
    /// REGACK must not leave before the registration it acknowledges is stored).
    unsettled: bool,
    /// The wall-clock time of one instant: the store keeps wall-clock deadlines, the
    /// engine is given `Instant`s.
    anchor: (Instant, UnixMillis),
}

impl StoreQueue {
    fn push(&mut self, op: StoreOp) {
        self.ops.push(op);
        self.unsettled = true;
    }

    /// `at` in wall-clock time.
    fn wall(&self, at: Instant) -> UnixMillis {
        let (i, ms) = self.anchor;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match at.checked_duration_since(i) {
            Some(d) => ms.saturating_add(millis(d)),
            None => ms.saturating_sub(millis(i - at)),
        }
    }

    /// The store's record of a clean-session-false session's topic changes.
    fn topics(&mut self, client_id: &Arc<str>, changes: Vec<TopicChange>) {
        for c in changes {
            self.push(match c {
                TopicChange::Assigned(id, name) => StoreOp::Topic {
                    client_id: client_id.clone(),
                    id,
                    name,
                },
                TopicChange::Removed(id) => StoreOp::Untopic {
                    client_id: client_id.clone(),
                    id,
                },
            });
        }
    }

    /// The store's record of a clean-session-false session's QoS 2 deliveries.
    fn qos2(&mut self, client_id: &Arc<str>, changes: Vec<(u16, Option<crate::store::Qos2State>)>) {
        for (msg_id, state) in changes {
            self.push(StoreOp::Qos2 {
                client_id: client_id.clone(),
                msg_id,
                state,
            });
        }
    }
}

/// What [`Gateway::restore`] did with the stored sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Kept: their devices get their topic ids back when they connect.
    pub kept: usize,
    /// Dropped: their expiry passed while the gateway was down.
    pub expired: usize,
    /// Dropped: beyond `limits.max_persisted_sessions`.
    pub over_limit: usize,
    /// Of those kept, asleep again as they were (their PINGREQ wakes them).
    pub asleep: usize,
}

/// At most one INFO line per this period for refusals by the access rules (an attacker
/// sending CONNECTs as fast as it can must not drown the log); the others go to debug,
/// and the next INFO line says how many were held back. Every refusal is counted.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(1);

/// Logs one refusal by the access rules: INFO when the throttle allows, else debug.
macro_rules! refusal {
    ($gw:expr, $now:expr, $($field:tt)*) => {
        match $gw.auth_log.allow($now) {
            Some(held_back) => info!(held_back, $($field)*),
            None => debug!($($field)*),
        }
    };
}

/// At most one warning per this period for broker connect failures of each kind.
const CONNECT_FAILED_LOG_EVERY: Duration = Duration::from_secs(10);

impl Gateway {
    /// A gateway with no sessions.
    pub fn new(cfg: EngineConfig) -> Self {
        Gateway {
            persisted: Persisted::new(cfg.max_persisted_sessions, cfg.session_expiry),
            cfg: Arc::new(cfg),
            sessions: HashMap::new(),
            by_peer: HashMap::new(),
            by_client_id: HashMap::new(),
            timers: BTreeSet::new(),
            next_key: QOS_MINUS_ONE_KEY + 1,
            out: Output::default(),
            metrics: Metrics::default(),
            latency: Latencies::default(),
            next_advertise: None,
            up_links: BTreeSet::new(),
            stopping: None,
            refused_log: LogThrottle::new(CONNECT_FAILED_LOG_EVERY),
            unreachable_log: LogThrottle::new(CONNECT_FAILED_LOG_EVERY),
            auth_log: LogThrottle::new(AUTH_LOG_EVERY),
            store: None,
        }
    }

    /// Turns the state store on, with what it holds (`stored`, read at start; `wall` is
    /// the wall-clock time at `now`). From here on the engine queues every change to
    /// what it keeps of clean-session-false devices as [`StoreOp`]s
    /// ([`Gateway::take_store_ops`]), and [`Gateway::poll_transmit`] holds datagrams back
    /// while a write is not yet durable ([`Gateway::store_committed`]).
    ///
    /// A session stored asleep is held asleep again at its address, its broker
    /// connection reopened (without a will: the broker, or in aggregating mode the
    /// restarted gateway, published the crashed session's), when the configuration in
    /// force still admits it there. Every other stored session becomes a kept topic
    /// table, as if its device had just gone:
    /// one whose expiry (wall-clock) passed while the gateway was down is dropped; one
    /// whose device was connected when the gateway stopped starts its expiry now (the
    /// gateway cannot know when the device went silent). The expiry in force bounds a
    /// stored one (`session_expiry` lowered since: the new one counts from now; turned
    /// off: none).
    pub fn restore(&mut self, now: Instant, wall: SystemTime, stored: Vec<StoredSession>) -> Restored {
        let mut queue = StoreQueue {
            ops: Vec::new(),
            unsettled: false,
            anchor: (now, crate::store::unix_millis(wall)),
        };
        let mut done = Restored::default();
        let now_ms = queue.wall(now);
        for s in stored {
            let client_id: Arc<str> = s.client_id.into();
            let table = Kept {
                topics: TopicTable::from_entries(s.topics.into_iter().map(|(id, name)| (id, Arc::from(name)))),
                qos2: qos2::Qos2Ledger::from_entries(s.qos2),
            };
            // The expiry in force now bounds what was stored (it may have been lowered,
            // or turned off, since): a session connected at the stop gets all of it.
            let limit = self
                .persisted
                .expiry()
                .map(|d| now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
            let expires = match (s.presence, limit) {
                (Presence::Away { expires: Some(at) }, Some(limit)) => Some(at.min(limit)),
                (_, limit) => limit,
            };
            if expires.is_some_and(|at| at <= now_ms) {
                done.expired += 1;
                self.metrics.sessions_expired += 1;
                queue.push(StoreOp::Forget { client_id });
                continue;
            }
            let table = match s.sleeper {
                Some(sleeper) => match self.restore_asleep(now, client_id.clone(), sleeper, table) {
                    None => {
                        done.kept += 1;
                        done.asleep += 1;
                        continue;
                    }
                    Some(table) => table,
                },
                None => table,
            };
            let at = expires.and_then(|ms| now.checked_add(Duration::from_millis(ms - now_ms)));
            match self.persisted.keep(client_id.clone(), table, at) {
                Stored::Kept => {
                    done.kept += 1;
                    if s.presence != (Presence::Away { expires }) {
                        queue.push(StoreOp::Away { client_id, expires });
                    }
                }
                Stored::Full => {
                    done.over_limit += 1;
                    queue.push(StoreOp::Forget { client_id });
                }
            }
        }
        self.store = Some(queue);
        done
    }

    /// A session asleep when the gateway stopped, asleep again at the same address (see
    /// [`Session::restore_asleep`]), if its registry entry (as configured now) still
    /// admits it there and the client limit allows; otherwise its topic table is handed
    /// back, to be kept like any gone session's.
    fn restore_asleep(
        &mut self,
        now: Instant,
        client_id: Arc<str>,
        sleeper: crate::store::Sleeper,
        mut topics: Kept,
    ) -> Option<Kept> {
        let peer = &sleeper.peer;
        let bound = match &peer.link {
            LinkAddr::Dtls(_, _, identity) => self.bound_to(&client_id, identity),
            _ => !self.dtls_only(&client_id),
        };
        if !bound || self.sessions.len() >= self.cfg.max_clients || self.by_peer.contains_key(peer) {
            return Some(topics);
        }
        let Ok(admission) = self.cfg.auth.admit(&client_id, peer) else {
            return Some(topics);
        };
        let key = self.next_key;
        self.next_key += 1;
        let peer = peer.clone();
        // Its changes from now on are written, as a connected session's are.
        topics.topics.record(true);
        topics.qos2.record(true);
        let mut ctx = Ctx {
            cfg: &self.cfg,
            out: &mut self.out,
            metrics: &mut self.metrics,
            latency: &mut self.latency,
            now,
        };
        let session = Session::restore_asleep(&mut ctx, key, client_id.clone(), sleeper, topics, admission);
        debug!(client = %client_id, peer = %peer, "sleeping session restored");
        self.add_session(key, peer, client_id, session);
        None
    }

    /// Makes `session` the one of `peer` and `client_id`.
    fn add_session(&mut self, key: ClientKey, peer: Peer, client_id: Arc<str>, session: Session) {
        self.sessions.insert(key, session);
        self.by_peer.insert(peer, key);
        self.by_client_id.insert(client_id, key);
        self.reschedule(key);
    }

    /// The state store writes queued since the last call, in order: the runtime commits
    /// them in one transaction, then calls [`Gateway::store_committed`]. Empty without a
    /// store.
    pub fn take_store_ops(&mut self) -> Vec<StoreOp> {
        self.store
            .as_mut()
            .map(|q| std::mem::take(&mut q.ops))
            .unwrap_or_default()
    }

    /// Whether a clean-session-false session of `client_id` is kept (restored from the
    /// store, or away), so that what the broker link stored for it is put back too.
    pub fn keeps_session(&self, client_id: &str) -> bool {
        self.persisted.contains(client_id) || self.by_client_id.contains_key(client_id)
    }

    /// The writes taken by [`Gateway::take_store_ops`] are durable (`ok`), or failed
    /// (counted in `store_write_errors`; the gateway keeps serving from memory): the
    /// datagrams held back behind them may go.
    pub fn store_committed(&mut self, ok: bool) {
        if !ok {
            self.metrics.store_write_errors += 1;
        }
        if let Some(q) = &mut self.store {
            q.unsettled = !q.ops.is_empty();
        }
    }

    /// Whether store writes are queued or not yet committed (datagrams wait for them).
    pub fn store_pending(&self) -> bool {
        self.store.as_ref().is_some_and(|q| q.unsettled)
    }

    fn store_op(&mut self, op: StoreOp) {
        if let Some(q) = &mut self.store {
            q.push(op);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Replaces the predefined topic ids (a configuration reload, SIGHUP). The table is
    /// read where a message needs it, never copied into a session, so the new one holds
    /// from the next message on, for every session alike:
    ///
    /// - A PUBLISH (QoS 0, 1, 2) by predefined id is resolved with the new table: an id
    ///   added works at once, an id no longer defined is answered PUBACK "invalid topic
    ///   id" (0x02), an id given a new name publishes to the new name. A QoS -1 PUBLISH
    ///   to an id no longer defined is dropped (and counted), as for any unknown id.
    /// - SUBSCRIBE and UNSUBSCRIBE by predefined id use the new table. A subscription
    ///   made earlier keeps the topic it was made with: the broker holds it by name, so
    ///   an UNSUBSCRIBE by an id since given another name unsubscribes the new name, and
    ///   the old subscription stays until the device unsubscribes it by name or
    ///   reconnects with a clean session.
    /// - Delivery to a device refers to a topic by the device's normal id for it if it
    ///   has one, else by its predefined id in the new table, else (a name that is no
    ///   longer predefined) the gateway REGISTERs a normal id first, as for any other
    ///   name. Held messages (asleep devices) follow the same rule when they go out.
    /// - Work in flight is not touched: a device PUBLISH already forwarded, a delivery
    ///   already sent with a predefined id (its retransmissions keep that id).
    /// - Normal ids already assigned are kept even when one equals a new predefined id
    ///   (the id type on the wire tells them apart); new assignments skip the new ids.
    pub fn set_predefined(&mut self, predefined: Arc<Predefined>) {
        Arc::make_mut(&mut self.cfg).predefined = predefined;
        let global = &self.cfg.predefined;
        for s in self.sessions.values_mut() {
            s.set_predefined(global);
        }
    }

    /// Replaces the device registry (a reload, SIGHUP) of an engine in registry mode
    /// (in open mode it changes nothing: the mode needs a restart). Sessions are not
    /// dropped: each keeps running, and its next REGISTER, PUBLISH and SUBSCRIBE are
    /// checked against the patterns of the entry that names it now; a session whose
    /// entry is gone may publish and subscribe to nothing (what it subscribed to before
    /// stays until it unsubscribes or reconnects), and its next CONNECT is refused.
    /// Addresses and broker logins are checked at CONNECT, so a change to them applies
    /// from the device's next CONNECT; the mountpoint is the one it connected with.
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        if self.cfg.auth.registry.is_none() {
            warn!("set_registry on an engine in open mode: ignored");
            return;
        }
        Arc::make_mut(&mut self.cfg).auth.registry = Some(registry);
        let (auth, global) = (&self.cfg.auth, &self.cfg.predefined);
        for s in self.sessions.values_mut() {
            s.regrant(auth, global);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.store_pending() {
            // The durability rule: nothing goes out before what it answers is stored.
            return None;
        }
        let t = self.out.transmits.pop_front();
        if t.is_some() {
            self.metrics.datagrams_out += 1;
        }
        t
    }

    /// The next command for a broker connection.
    pub fn poll_command(&mut self) -> Option<(ClientKey, Command)> {
        self.out.commands.pop_front()
    }

    /// When [`Gateway::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let session = self.timers.first().map(|(t, _)| *t);
        [session, self.next_advertise, self.persisted.next_expiry()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Gauges and counters.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            sessions: self.sessions.len(),
            persisted_sessions: self.persisted.len(),
            metrics: self.metrics.clone(),
            latency: self.latency.clone(),
            ..Stats::default()
        };
        for s in self.sessions.values() {
            match s.state() {
                SessionState::Active | SessionState::Awake => stats.active += 1,
                SessionState::Asleep => stats.asleep += 1,
                _ => {}
            }
            stats.held_messages += s.held();
        }
        stats
    }

    /// Whether a client reached directly at `link` has a session (connected, asleep, or
    /// connecting).
    pub fn has_session_at(&self, link: &LinkAddr) -> bool {
        self.by_peer.contains_key(&Peer::direct(link.clone()))
    }

    /// The state of the session of `client_id`, if there is one.
    pub fn session_state(&self, client_id: &str) -> Option<SessionState> {
        let key = self.by_client_id.get(client_id)?;
        self.sessions.get(key).map(Session::state)
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: LinkAddr, data: &[u8]) {
        self.metrics.datagrams_in += 1;
        let (peer, decoded) = match Packet::decode(data) {
            Ok(Packet::Encapsulated(enc)) => {
                let peer = Peer {
                    link: from,
                    node: Some(enc.node_id.into()),
                };
                match Packet::decode(enc.inner) {
                    Ok(Packet::Encapsulated(_)) => {
                        self.metrics.malformed += 1;
                        debug!(peer = %peer, "nested encapsulation dropped");
                        return;
                    }
                    inner => (peer, inner),
                }
            }
            outer => (Peer::direct(from), outer),
        };
        match decoded {
            Ok(packet) => self.handle_packet(now, peer, packet),
            // Well framed, but asking for something not supported: answer 0x03, so the
            // device stops retrying (the Paho gateway answers these too).
            Err(sn_codec::Error::Unsupported { request, reason }) => {
                debug!(peer = %peer, request = request.name(), %reason, "unsupported request refused");
                if reason == sn_codec::Reason::NotUtf8 && request != sn_codec::Request::Connect {
                    self.metrics.topic_refused += 1;
                }
                self.refuse_request(now, peer, request);
            }
            Err(e) => {
                self.metrics.malformed += 1;
                debug!(peer = %peer, error = %e, len = data.len(), "malformed datagram dropped");
                if let sn_codec::Error::UnsupportedProtocol(_) = e {
                    // A CONNECT for another protocol version: say so rather than stay silent.
                    let refusal = Packet::ConnAck(sn_codec::ReturnCode::NotSupported);
                    self.out.send(&peer, &refusal);
                }
            }
        }
    }

    /// Answers a request the decoder refused ([`sn_codec::Error::Unsupported`]) with
    /// return code 0x03: CONNECT here, session requests by their session (an address
    /// with none is told to connect), a QoS -1 PUBLISH by nobody.
    fn refuse_request(&mut self, now: Instant, peer: Peer, request: sn_codec::Request) {
        use sn_codec::Request as R;
        match request {
            R::Connect => {
                self.metrics.connects_refused += 1;
                self.out
                    .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
            }
            R::Publish { qos: QoS::MinusOne, .. } => self.metrics.qos_minus_one_dropped += 1,
            _ => match self.by_peer.get(&peer).copied() {
                Some(key) => self.with_session(now, key, |s, ctx| s.refuse(ctx, request)),
                None => {
                    self.metrics.unknown_peer += 1;
                    self.out.send(&peer, &Packet::Disconnect(None));
                }
            },
        }
    }

    fn handle_packet(&mut self, now: Instant, peer: Peer, packet: Packet<'_>) {
        match packet {
            Packet::SearchGw { radius } => self.answer_searchgw(&peer, radius),
            // Other gateways' announcements, and answers from clients on their behalf.
            Packet::Advertise(_) | Packet::GwInfo(_) => {}
            Packet::Connect(c) => self.handle_connect(now, peer, c),
            Packet::Publish(p) if p.qos == QoS::MinusOne => self.handle_qos_minus_one(now, peer, p),
            Packet::PingReq(Some(client_id)) => {
                let key = self.by_client_id.get(client_id).copied();
                match key {
                    Some(key) => {
                        if let Err(why) = self.may_move(key, &peer) {
                            self.metrics.auth_wake_refused += 1;
                            refusal!(self, now, client = %client_id, peer = %peer, "PINGREQ refused: {why}");
                            self.out.send(&peer, &Packet::Disconnect(None));
                            return;
                        }
                        self.rebind(now, key, &peer);
                        self.with_session(now, key, |s, ctx| s.handle_packet(ctx, packet));
                    }
                    None => self.unknown_peer(&peer, &packet),
                }
            }
            _ => match self.by_peer.get(&peer).copied() {
                Some(key) => self.with_session(now, key, |s, ctx| s.handle_packet(ctx, packet)),
                None => self.unknown_peer(&peer, &packet),
            },
        }
    }

    /// Whether the session `key` may be reached from `peer` (a wake): its own address,
    /// or, with `address_change = "allow"`, any address its registry entry admits.
    fn may_move(&self, key: ClientKey, peer: &Peer) -> Result<(), &'static str> {
        let Some(session) = self.sessions.get(&key) else {
            return Ok(());
        };
        if session.peer() == peer {
            return Ok(());
        }
        if !same_identity(session.peer(), peer) {
            return Err("the client's session is under another DTLS identity (or none)");
        }
        let auth = &self.cfg.auth;
        if auth.address_change == AddressChange::Deny {
            return Err("the client's session is at another address (address_change = deny)");
        }
        if let Some(registry) = &auth.registry {
            let admitted = registry
                .lookup(session.client_id())
                .is_some_and(|d| d.admits(peer, &auth.serial_paths));
            if !admitted {
                return Err("the address is not among its registry entry's addresses");
            }
        }
        Ok(())
    }

    /// Whether the registry binds `client_id` to the DTLS PSK `identity`: the entry for
    /// the client id names that identity.
    fn bound_to(&self, client_id: &str, identity: &str) -> bool {
        self.cfg
            .auth
            .registry
            .as_ref()
            .and_then(|r| r.lookup(client_id))
            .is_some_and(|d| d.binds_dtls(client_id, identity))
    }

    /// Whether the registry entry of `client_id` allows DTLS sessions only.
    fn dtls_only(&self, client_id: &str) -> bool {
        self.cfg
            .auth
            .registry
            .as_ref()
            .and_then(|r| r.lookup(client_id))
            .is_some_and(|d| d.dtls_only)
    }

    /// A session message from an address with no session: counted, and answered with
    /// DISCONNECT when it expects an answer, so that a device the gateway no longer
    /// knows (gateway restarted, session lost) learns it must connect again.
    fn unknown_peer(&mut self, peer: &Peer, packet: &Packet<'_>) {
        self.metrics.unknown_peer += 1;
        debug!(peer = %peer, kind = ?packet.msg_type(), "message from unknown client dropped");
        let answer = matches!(
            packet,
            Packet::Publish(_)
                | Packet::Register(_)
                | Packet::Subscribe(_)
                | Packet::Unsubscribe(_)
                | Packet::PingReq(_)
                | Packet::PubRel(_)
                | Packet::WillTopicUpd(_)
                | Packet::WillMsgUpd(_)
                // Our answer to its DISCONNECT was lost and the session is gone: answer
                // again, or the device retries until it declares the gateway lost.
                | Packet::Disconnect(_)
        );
        if answer {
            self.out.send(peer, &Packet::Disconnect(None));
        }
    }

    /// Moves a session to a new address (NAT rebinding, a sleeping device waking
    /// elsewhere). Any other session on that address is ended: the address belongs to
    /// whoever spoke last.
    fn rebind(&mut self, now: Instant, key: ClientKey, peer: &Peer) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if session.peer() == peer {
            return;
        }
        debug!(client = %session.client_id(), from = %session.peer(), to = %peer, "client changed address");
        let old = session.peer().clone();
        session.set_peer(peer.clone());
        if self.by_peer.get(&old) == Some(&key) {
            self.by_peer.remove(&old);
        }
        if let Some(other) = self.by_peer.insert(peer.clone(), key) {
            if other != key {
                self.end_quietly(now, other, "address taken over by another client");
            }
        }
    }

    fn handle_connect(&mut self, now: Instant, peer: Peer, c: sn_codec::Connect<'_>) {
        if self.stopping.is_some() {
            // No new sessions while stopping; congestion says "try again later", by
            // when a restarted gateway answers.
            self.metrics.connects_refused += 1;
            debug!(client = %c.client_id, peer = %peer, "CONNECT refused: the gateway is stopping");
            self.out.send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::Congestion));
            return;
        }
        if c.client_id.is_empty() {
            self.metrics.connects_refused += 1;
            debug!(peer = %peer, "CONNECT without client id refused");
            self.out
                .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
            return;
        }
        // Before anything is touched: a refused CONNECT leaves every session as it was.
        if let LinkAddr::Dtls(_, _, identity) = &peer.link {
            if !self.bound_to(c.client_id, identity) {
                self.metrics.connects_refused += 1;
                self.metrics.auth_identity_refused += 1;
                refusal!(self, now, client = %c.client_id, peer = %peer, "CONNECT refused: the registry does not bind the client id to the DTLS identity");
                self.out
                    .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
                return;
            }
        } else if self.dtls_only(c.client_id) {
            self.metrics.connects_refused += 1;
            self.metrics.auth_identity_refused += 1;
            refusal!(self, now, client = %c.client_id, peer = %peer, "CONNECT refused: its registry entry says dtls_only and this is not a DTLS session");
            self.out
                .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
            return;
        }
        let admission = match self.cfg.auth.admit(c.client_id, &peer) {
            Ok(a) => a,
            Err(refusal) => {
                self.metrics.connects_refused += 1;
                let why = match refusal {
                    Refusal::UnknownClient => {
                        self.metrics.auth_unknown_client += 1;
                        "no registry entry names the client id"
                    }
                    Refusal::Address => {
                        self.metrics.auth_address_refused += 1;
                        "the address is not among its registry entry's addresses"
                    }
                    Refusal::Mountpoint => {
                        self.metrics.mountpoint_refused += 1;
                        "the mountpoint cannot be formed from its client id or user name"
                    }
                };
                refusal!(self, now, client = %c.client_id, peer = %peer, "CONNECT refused: {why}");
                self.out
                    .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
                return;
            }
        };
        let existing = self.by_client_id.get(c.client_id).copied();
        if let Some(old_peer) = existing.and_then(|k| self.sessions.get(&k)).map(|s| s.peer().clone()) {
            if !same_identity(&old_peer, &peer) {
                self.metrics.connects_refused += 1;
                self.metrics.auth_takeover_refused += 1;
                refusal!(self, now, client = %c.client_id, peer = %peer, session = %old_peer, "CONNECT refused: the client id has a session under another DTLS identity (or none)");
                self.out
                    .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
                return;
            }
            if old_peer != peer && self.cfg.auth.address_change == AddressChange::Deny {
                self.metrics.connects_refused += 1;
                self.metrics.auth_takeover_refused += 1;
                refusal!(self, now, client = %c.client_id, peer = %peer, session = %old_peer, "CONNECT refused: the client id has a session at another address (address_change = deny)");
                self.out
                    .send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::NotSupported));
                return;
            }
        }
        if let Some(key) = existing {
            let state = self.sessions.get(&key).map(Session::state);
            match state {
                // A retransmitted CONNECT while the handshake runs: answer where we are.
                Some(s) if s.is_connecting() && self.sessions.get(&key).is_some_and(|s| *s.peer() == peer) => {
                    self.with_session(now, key, |s, ctx| s.handle_connect_retry(ctx, c));
                    return;
                }
                // CONNECT from asleep resumes the session (spec 6.14).
                Some(SessionState::Asleep | SessionState::Awake) => {
                    self.rebind(now, key, &peer);
                    self.with_session(now, key, |s, ctx| s.resume(ctx, c));
                    return;
                }
                _ => {}
            }
        }
        // Anything else on this address, or with this client id, is taken over.
        let mut topics = None;
        // Whether the store holds something for this client id that a clean session drops.
        let mut stored = false;
        if let Some(key) = existing {
            if let Some(old) = self.remove_session(key) {
                self.metrics.takeovers += 1;
                debug!(client = %c.client_id, from = %old.peer(), to = %peer, "session taken over");
                stored = !old.clean_session();
                let table = old.take_over(&mut self.out);
                if !c.clean_session {
                    topics = Some(table);
                }
            }
        }
        if let Some(key) = self.by_peer.get(&peer).copied() {
            self.end_quietly(now, key, "address reused by a new CONNECT");
        }
        if c.clean_session {
            stored |= self.persisted.take(c.client_id).is_some();
            if stored {
                self.store_op(StoreOp::Forget {
                    client_id: c.client_id.into(),
                });
            }
        } else if topics.is_none() {
            topics = self.persisted.take(c.client_id);
        }
        let client_id: Arc<str> = c.client_id.into();
        if self.sessions.len() >= self.cfg.max_clients {
            self.metrics.connects_refused += 1;
            warn!(client = %c.client_id, peer = %peer, limit = self.cfg.max_clients, "CONNECT refused: client limit reached");
            self.out.send(&peer, &Packet::ConnAck(sn_codec::ReturnCode::Congestion));
            if let Some(table) = topics.filter(|_| !c.clean_session) {
                // Kept for its next try, as if it had just gone.
                self.store_persisted(now, client_id, table);
            }
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        let mut kept = topics.unwrap_or_default();
        if let (Some(q), false) = (&mut self.store, c.clean_session) {
            kept.topics.record(true);
            kept.qos2.record(true);
            q.push(StoreOp::Connected {
                client_id: client_id.clone(),
                topics: kept.topics.entries().map(|(id, name)| (id, name.clone())).collect(),
            });
        }
        let mut ctx = Ctx {
            cfg: &self.cfg,
            out: &mut self.out,
            metrics: &mut self.metrics,
            latency: &mut self.latency,
            now,
        };
        let session = Session::new(&mut ctx, key, client_id.clone(), peer.clone(), c, kept, admission);
        self.add_session(key, peer, client_id, session);
    }

    fn handle_qos_minus_one(&mut self, now: Instant, peer: Peer, p: sn_codec::Publish<'_>) {
        // Who it is (registry mode: by address) decides which predefined ids it has too.
        let Some(grants) = self.cfg.auth.qos_minus_one(&peer) else {
            self.metrics.qos_minus_one_dropped += 1;
            if self.cfg.auth.registry.is_some() {
                self.metrics.auth_address_refused += 1;
                refusal!(self, now, peer = %peer, "QoS -1 publish dropped: no registry entry with addresses admits the sender");
            } else {
                self.metrics.mountpoint_refused += 1;
                debug!(peer = %peer, "QoS -1 publish dropped: the mountpoint needs a client id");
            }
            return;
        };
        let topic = match p.topic {
            sn_codec::TopicRef::Normal(_) => Err(topics::Unresolved::UnknownId),
            t => topics::resolve(t, &grants.predefined(&self.cfg.predefined), &TopicTable::default()),
        };
        // The QoS -1 connection is shared by every QoS -1 sender: nothing the broker
        // would refuse may go on it (mosquitto closes it on a control character).
        let topic: Arc<str> = match topic {
            Ok(topic) if self.cfg.qos_minus_one => topic,
            Err(topics::Unresolved::Invalid(why)) => {
                self.metrics.topic_refused += 1;
                self.metrics.qos_minus_one_dropped += 1;
                debug!(peer = %peer, topic = ?p.topic, %why, "QoS -1 publish to an invalid topic dropped");
                return;
            }
            _ => {
                self.metrics.qos_minus_one_dropped += 1;
                debug!(peer = %peer, topic = ?p.topic, "QoS -1 publish dropped");
                return;
            }
        };
        if let Err(denied) = grants.may_publish(&topic) {
            self.metrics.qos_minus_one_dropped += 1;
            self.metrics.count_denied(denied);
            debug!(peer = %peer, %topic, ?denied, "QoS -1 publish refused");
            return;
        }
        let topic = if grants.mountpoint.is_some() {
            grants.mount(&topic).into()
        } else {
            topic
        };
        self.metrics.qos_minus_one += 1;
        self.metrics.publishes_in += 1;
        self.out.command(
            QOS_MINUS_ONE_KEY,
            Command::Publish {
                token: 0,
                topic,
                payload: bytes::Bytes::copy_from_slice(p.data),
                qos: MqttQos::AtMostOnce,
                retain: p.retain,
            },
        );
    }

    /// Feeds an event from the broker connection of `client`.
    pub fn handle_broker_event(&mut self, now: Instant, client: ClientKey, event: BrokerEvent) {
        if client == QOS_MINUS_ONE_KEY {
            match &event {
                BrokerEvent::Closed { reason } | BrokerEvent::ConnectFailed { reason, .. } => {
                    warn!(%reason, "QoS -1 broker connection closed; reconnecting on next QoS -1 publish");
                }
                BrokerEvent::Rejected { reason, .. } => {
                    self.metrics.broker_rejected += 1;
                    self.metrics.qos0_dropped_by_link(*reason);
                }
                _ => {}
            }
            return;
        }
        let Some(session) = self.sessions.get(&client) else {
            // The session ended before its link did: nothing to do.
            return;
        };
        if let BrokerEvent::ConnectFailed { reason, refused } = &event {
            // Thousands of devices may fail at once (broker down, credentials changed):
            // one line per period, saying how many were held back.
            let (log, what) = if *refused {
                (
                    &mut self.refused_log,
                    "broker refused a device's connection; CONNACK rejected sent",
                )
            } else {
                (
                    &mut self.unreachable_log,
                    "broker unreachable for a device's connection; CONNACK congestion sent",
                )
            };
            if let Some(held_back) = log.allow(now) {
                warn!(client = %session.client_id(), %reason, held_back, "{what}");
            }
        }
        self.with_session(now, client, |s, ctx| s.handle_broker_event(ctx, event));
    }

    /// Handles every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advertise_if_due(now);
        for client_id in self.persisted.expire(now) {
            debug!(client = %client_id, "persisted session expired; topic ids dropped");
            self.metrics.sessions_expired += 1;
            self.store_op(StoreOp::Forget {
                client_id: client_id.clone(),
            });
            self.out
                .command(crate::broker::GATEWAY_KEY, Command::Expire { client_id });
        }
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, key));
            if let Some(s) = self.sessions.get_mut(&key) {
                s.set_timer(None);
            }
            self.with_session(now, key, |s, ctx| s.handle_timeout(ctx));
        }
    }

    fn with_session(&mut self, now: Instant, key: ClientKey, f: impl FnOnce(&mut Session, &mut Ctx<'_>) -> Flow) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let mut ctx = Ctx {
            cfg: &self.cfg,
            out: &mut self.out,
            metrics: &mut self.metrics,
            latency: &mut self.latency,
            now,
        };
        let mut flow = f(session, &mut ctx);
        if let (Flow::Continue, Some(publish_wills)) = (flow, self.stopping) {
            // Stopping: the session goes as soon as nothing of it is in flight.
            flow = session.stop(&mut ctx, publish_wills, false);
        }
        if let Some(q) = &mut self.store {
            let changes = session.take_topic_changes();
            if !changes.is_empty() {
                q.topics(session.client_id(), changes);
            }
            let changes = session.take_qos2_changes();
            q.qos2(session.client_id(), changes);
            if let (Flow::Continue, Some(sleeper)) = (flow, session.take_sleep_change()) {
                q.push(StoreOp::Sleep {
                    client_id: session.client_id().clone(),
                    sleeper: Some(sleeper),
                });
            }
        }
        match flow {
            Flow::Continue => self.reschedule(key),
            Flow::End => {
                if let Some(session) = self.remove_session(key) {
                    self.persist(now, session);
                }
            }
        }
    }

    /// Starts a graceful stop. No new session is accepted (CONNECT is answered
    /// congestion), ADVERTISE stops, and each session is ended as follows:
    ///
    /// - Awake devices (active, or woken and being delivered to) get DISCONNECT once
    ///   nothing of theirs is in flight: a QoS 1/2 PUBLISH (or SUBSCRIBE/UNSUBSCRIBE)
    ///   from the device still awaiting the broker's answer gets it first, and its
    ///   PUBACK/PUBREC (SUBACK/UNSUBACK) goes to the device; a QoS 2 exchange waits for
    ///   the device's PUBREL. Then their broker connection is closed with an MQTT
    ///   DISCONNECT, so the broker does not publish their will.
    /// - Sleeping devices cannot hear a DISCONNECT: their broker connection is closed
    ///   the same way, and they learn the gateway lost them when they next wake (PINGREQ
    ///   or a publish is answered DISCONNECT by the restarted gateway, and they connect
    ///   again). The messages the gateway held for them are lost to the gateway: QoS 0
    ///   ones are gone; QoS 1/2 ones were not acknowledged to the broker (that happens
    ///   only once the device has them), so for a clean-session-false device the
    ///   broker keeps them in its session and delivers them again when the device
    ///   reconnects; for a clean-session device the broker drops the session anyway.
    /// - Devices still in the connect handshake get CONNACK congestion (try again) and
    ///   any broker connection being opened for them is closed.
    /// - Broker messages in flight to an awake device (sent, not yet acknowledged) are
    ///   not waited for: unacknowledged at the broker, they are redelivered to a
    ///   clean-session-false device.
    ///
    /// With `publish_wills`, each device's will (if it has one) is published before its
    /// broker connection closes, as if every device were lost (for operators whose
    /// subscribers watch wills to learn a device is unreachable).
    ///
    /// Whatever is still in flight when the caller's patience runs out is ended by
    /// [`Gateway::finish_shutdown`]. [`Gateway::is_shut_down`] tells when all is done.
    pub fn shutdown(&mut self, now: Instant, publish_wills: bool) {
        if self.stopping.is_some() {
            return;
        }
        info!(
            sessions = self.sessions.len(),
            publish_wills, "stopping: disconnecting every client"
        );
        self.stopping = Some(publish_wills);
        self.next_advertise = None;
        // The QoS -1 connection is the link's: the runtime closes it with the others.
        let keys: Vec<ClientKey> = self.sessions.keys().copied().collect();
        for key in keys {
            // with_session calls Session::stop for each.
            self.with_session(now, key, |_, _| Flow::Continue);
        }
    }

    /// Ends every session still waiting for something in flight (the shutdown's time is
    /// up): awake devices get DISCONNECT, broker connections are closed.
    pub fn finish_shutdown(&mut self, now: Instant) {
        let publish_wills = self.stopping.unwrap_or(false);
        self.stopping = Some(publish_wills);
        let keys: Vec<ClientKey> = self.sessions.keys().copied().collect();
        if !keys.is_empty() {
            warn!(
                sessions = keys.len(),
                "shutdown timeout: ending sessions with exchanges still in flight"
            );
        }
        for key in keys {
            self.with_session(now, key, |s, ctx| s.stop(ctx, publish_wills, true));
        }
    }

    /// Whether [`Gateway::shutdown`] was called and every session has ended.
    pub fn is_shut_down(&self) -> bool {
        self.stopping.is_some() && self.sessions.is_empty()
    }

    fn reschedule(&mut self, key: ClientKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let next = session.poll_timeout(&self.cfg);
        if next == session.timer() {
            return;
        }
        if let Some(old) = session.timer() {
            self.timers.remove(&(old, key));
        }
        session.set_timer(next);
        if let Some(at) = next {
            self.timers.insert((at, key));
        }
    }

    fn remove_session(&mut self, key: ClientKey) -> Option<Session> {
        let session = self.sessions.remove(&key)?;
        if let Some(at) = session.timer() {
            self.timers.remove(&(at, key));
        }
        if self.by_peer.get(session.peer()) == Some(&key) {
            self.by_peer.remove(session.peer());
        }
        if self.by_client_id.get(session.client_id()) == Some(&key) {
            self.by_client_id.remove(session.client_id());
        }
        Some(session)
    }

    /// Ends a session without a will (its address or id went to someone else).
    fn end_quietly(&mut self, now: Instant, key: ClientKey, why: &str) {
        if let Some(old) = self.remove_session(key) {
            debug!(client = %old.client_id(), peer = %old.peer(), "session ended: {why}");
            self.metrics.takeovers += 1;
            let clean = old.clean_session();
            let client_id = old.client_id().clone();
            let table = old.take_over(&mut self.out);
            if !clean {
                self.store_persisted(now, client_id, table);
            }
        }
    }

    /// Keeps the topic ids of a clean-session-false client for its next CONNECT.
    fn persist(&mut self, now: Instant, session: Session) {
        if !session.clean_session() {
            let client_id = session.client_id().clone();
            self.store_persisted(now, client_id, session.into_kept());
        }
    }

    fn store_persisted(&mut self, now: Instant, client_id: Arc<str>, mut table: Kept) {
        if let Some(q) = &mut self.store {
            // A session ended by a takeover was not through with_session: its last
            // changes are written here.
            q.topics(&client_id, table.topics.take_changes());
            q.qos2(&client_id, table.qos2.take_changes());
        }
        table.topics.record(false);
        table.qos2.record(false);
        let kept = self.persisted.store(now, client_id.clone(), table);
        if kept == Stored::Full {
            debug!(client = %client_id, "persisted-session limit reached; topic ids not kept");
        }
        let expiry = self.persisted.expiry();
        if let Some(q) = &mut self.store {
            let op = match kept {
                Stored::Kept => StoreOp::Away {
                    expires: expiry.map(|d| {
                        q.wall(now)
                            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    }),
                    client_id,
                },
                Stored::Full => StoreOp::Forget { client_id },
            };
            q.push(op);
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_auth;
#[cfg(test)]
mod tests_dtls;
#[cfg(test)]
mod tests_link;
#[cfg(test)]
mod tests_reload;
#[cfg(test)]
mod tests_shutdown;
#[cfg(test)]
mod tests_store;
