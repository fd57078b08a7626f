//! Aggregating mode, sans-IO: many devices on one broker connection.
//!
//! What the broker does per client in transparent mode, the gateway does here itself,
//! for the devices of one shared connection:
//! - a subscription index over every device's filters, one broker subscription per
//!   distinct filter (at the highest QoS any device asked), released by UNSUBSCRIBE when
//!   the last device leaves it;
//! - each message to each matching device once, at min(message QoS, the device's highest
//!   granted QoS among its matching filters);
//! - retained messages: every device SUBSCRIBE is passed on to the broker, even for a held
//!   filter, since a broker resends the retained messages on a repeated SUBSCRIBE
//!   (MQTT-3.8.4-3). Those arrive after its SUBACK with RETAIN set, and a compliant broker
//!   sets RETAIN on nothing else (MQTT-3.3.1-9), so they go to the device of the latest
//!   SUBACK only, as a broker would send them to a new subscriber alone;
//! - a broker QoS 1/2 message is acknowledged to the broker only once every device it went
//!   to at QoS 1/2 has acknowledged it (or has gone, or is away with clean session false:
//!   then the gateway keeps it for the device and takes it off the broker's hands);
//! - wills are published by the gateway when a device is lost (the engine says so),
//!   never on a clean DISCONNECT; there is no will at the broker for a device;
//! - clean session false: a device's subscriptions stay in the index while it is away and
//!   QoS 1/2 messages for it are queued (bounded), delivered when it connects again.
//!
//! With a state store ([`Aggregator::durable`]) it also writes what only it knows of each
//! clean-session-false device: its subscriptions, and every QoS 1/2 message it delivers
//! or queues for it (from arrival until the device acknowledges it). Those writes come out
//! as [`Output::Store`], and the shell commits them before it performs anything queued
//! after them: so a broker message is acknowledged to the broker only once it is stored
//! for every device that still needs it, and after a crash [`Aggregator::restore`] puts
//! the devices back, away, with their subscriptions and held messages.
//!
//! [`Aggregator`] is fed the commands of the sessions on its connection and what the
//! connection reports, and queues [`Output`]s: requests for the broker, events for
//! sessions and store writes. It owns no socket and reads no clock; [`super::shared`]
//! drives it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::index::FilterIndex;
use super::{BrokerEvent, ClientKey, Command, ConnectParams, DeliveryId, Message, MqttQos, RejectReason, Token, Will};
use crate::store::{HeldMessage, StoreOp};

/// Names one request to the broker, so that its answer finds its way back. The driving
/// shell pairs it with the packet id the MQTT client library chose.
pub type Tag = u64;

/// A request for the broker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// PUBLISH; `tag` is answered by [`Aggregator::published`] (QoS 1/2 only).
    Publish {
        /// Answer correlation (QoS 1/2).
        tag: Option<Tag>,
        /// Topic name.
        topic: Arc<str>,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: MqttQos,
        /// Retain flag.
        retain: bool,
    },
    /// SUBSCRIBE to one filter; answered by [`Aggregator::subscribed`].
    Subscribe {
        /// Answer correlation.
        tag: Tag,
        /// The filter.
        filter: Arc<str>,
        /// QoS asked.
        qos: MqttQos,
    },
    /// UNSUBSCRIBE from one filter (its answer needs no action).
    Unsubscribe {
        /// The filter.
        filter: Arc<str>,
    },
    /// PUBACK (QoS 1) or PUBREC (QoS 2) for the broker's message `pkid`.
    Ack {
        /// The broker's packet id.
        pkid: u16,
        /// The message's QoS.
        qos: MqttQos,
    },
}

/// What the aggregator wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send to the broker, in this order.
    Broker(Request),
    /// Tell a session.
    Session(ClientKey, BrokerEvent),
    /// Write to the state store; what follows waits until it is durable.
    Store(StoreOp),
}

/// What the aggregator counts (for the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregateStats {
    /// Distinct filters held at the broker.
    pub filters: usize,
    /// Devices connected through this connection.
    pub devices: usize,
    /// Devices away with clean session false, whose subscriptions are kept.
    pub away: usize,
    /// QoS 1/2 messages kept for devices that are away.
    pub queued: usize,
    /// Messages for away devices dropped because their queue was full.
    pub queue_dropped: u64,
    /// Broker QoS 1/2 messages not yet acknowledged to the broker.
    pub unacked: usize,
    /// Broker messages acknowledged before every device had them, the gateway keeping
    /// them instead, because `broker.inflight` were owed already.
    pub taken_over: u64,
    /// State store commits of the shared connections that failed (filled in by the link).
    pub store_errors: u64,
}

/// A device known to this connection: connected now, or away with clean session false.
#[derive(Debug)]
struct Device {
    /// The session now connected with this client id.
    key: Option<ClientKey>,
    clean: bool,
    /// Its filters, with the QoS granted to it.
    subs: HashMap<Arc<str>, MqttQos>,
    /// Messages delivered to the session and not yet acknowledged, by delivery id, each
    /// with its place in the store (0: not stored).
    unacked: HashMap<DeliveryId, (u64, Message)>,
    /// QoS 1/2 messages kept while it is away, each with its place in the store.
    queue: VecDeque<(u64, Message)>,
    /// The next place in the store for a message held for it.
    next_seq: u64,
}

impl Device {
    fn new(clean: bool) -> Device {
        Device {
            key: None,
            clean,
            subs: HashMap::new(),
            unacked: HashMap::new(),
            queue: VecDeque::new(),
            next_seq: 1,
        }
    }
}

/// One distinct filter held at the broker.
#[derive(Debug)]
struct Filter {
    /// The highest QoS asked for it at the broker.
    asked: MqttQos,
    /// Its devices (by client id) and the QoS each was granted.
    devices: HashMap<Arc<str>, MqttQos>,
    /// SUBSCRIBEs for it not yet answered.
    pending: usize,
}

/// A request the broker has still to answer.
#[derive(Debug)]
enum Waiting {
    Publish {
        key: ClientKey,
        token: Token,
    },
    /// A will; once the broker has it, its stored copy goes (unless the device has
    /// written a newer one since).
    Will {
        client: Option<Arc<str>>,
    },
    Subscribe {
        key: ClientKey,
        token: Token,
        client: Arc<str>,
        filter: Arc<str>,
        qos: MqttQos,
    },
    /// Re-established after the connection came back; no device waits.
    Resubscribe {
        filter: Arc<str>,
    },
}

/// A broker QoS 1/2 message still owed an acknowledgement.
#[derive(Debug)]
struct Inbound {
    pkid: u16,
    qos: MqttQos,
    /// Deliveries to devices that have not acknowledged it yet.
    remaining: usize,
}

/// The gateway's own publishes held while the connection is being opened, at most.
const HELD_PUBLISHES: usize = 1024;

/// The devices of one shared broker connection, and what the gateway keeps for them.
#[derive(Debug)]
pub struct Aggregator {
    connected: bool,
    /// A connection attempt is under way: CONNECTs wait for its outcome.
    connecting: bool,
    /// CONNECTs waiting for the connection to come up.
    held: Vec<(ClientKey, ConnectParams)>,
    /// The gateway's own publishes (QoS -1) waiting for it, at most [`HELD_PUBLISHES`].
    held_publishes: VecDeque<Command>,
    /// Why the connection is down, and whether the broker refused it (for CONNECTs).
    down: (String, bool),
    sessions: HashMap<ClientKey, Arc<str>>,
    devices: HashMap<Arc<str>, Device>,
    filters: HashMap<Arc<str>, Filter>,
    index: FilterIndex,
    waiting: HashMap<Tag, Waiting>,
    next_tag: Tag,
    /// Oldest first.
    inbound: BTreeMap<u64, Inbound>,
    next_inbound: u64,
    /// Which broker message each delivery belongs to (QoS 1/2 deliveries only).
    deliveries: HashMap<DeliveryId, u64>,
    next_delivery: u64,
    /// The filters and devices of the latest SUBACK (one SUBSCRIBE may carry several
    /// filters): where messages with RETAIN set go.
    window: Vec<(Arc<str>, Arc<str>)>,
    queue_limit: usize,
    queue_dropped: u64,
    /// Broker messages owed an acknowledgement at once, at most.
    owed_limit: usize,
    taken_over: u64,
    /// Whether clean-session-false devices are written to the state store.
    durable: bool,
    /// Devices whose session's will is in the store (durable only).
    wills_stored: HashSet<Arc<str>>,
    /// Wills read back from the store, published once the connection is first up.
    restored_wills: Vec<(Arc<str>, Will)>,
    /// The filters the broker may hold for this connection's MQTT session: asked for,
    /// and not unsubscribed since. With a persistent session (durable), the broker keeps
    /// them across a lost connection and a gateway restart, so those no device holds any
    /// more are unsubscribed when the session is resumed.
    at_broker: HashSet<Arc<str>>,
    /// This connection's number (its key in the store's `broker_filters`).
    connection: u16,
    out: VecDeque<Output>,
}

impl Aggregator {
    /// An aggregator whose connection is not up yet, keeping at most `queue_limit`
    /// messages for each device that is away, and leaving at most `owed_limit` broker
    /// messages unacknowledged.
    ///
    /// The broker sends a client only so many QoS 1/2 messages before their
    /// acknowledgements (Mosquitto: `max_inflight_messages`, 20): on a shared connection,
    /// a few sleeping devices holding theirs would stop every device's downlink. Beyond
    /// `owed_limit` the oldest is acknowledged to the broker and the gateway keeps it for
    /// its devices (they still get it, and are still asked to acknowledge it).
    pub fn new(queue_limit: usize, owed_limit: usize) -> Self {
        Aggregator {
            connected: false,
            connecting: false,
            held: Vec::new(),
            held_publishes: VecDeque::new(),
            down: ("the broker connection is not up yet".into(), false),
            sessions: HashMap::new(),
            devices: HashMap::new(),
            filters: HashMap::new(),
            index: FilterIndex::new(),
            waiting: HashMap::new(),
            next_tag: 1,
            inbound: BTreeMap::new(),
            next_inbound: 1,
            deliveries: HashMap::new(),
            next_delivery: 1,
            window: Vec::new(),
            queue_limit,
            queue_dropped: 0,
            owed_limit: owed_limit.max(1),
            taken_over: 0,
            durable: false,
            wills_stored: HashSet::new(),
            restored_wills: Vec::new(),
            at_broker: HashSet::new(),
            connection: 0,
            out: VecDeque::new(),
        }
    }

    /// With a state store: what is kept for clean-session-false devices is written to it
    /// ([`Output::Store`]) before the broker is acknowledged.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The connection's number among the shared connections (for its broker filters in
    /// the store).
    pub fn numbered(mut self, connection: u16) -> Self {
        self.connection = connection;
        self
    }

    /// A filter the broker held for this connection's session when the gateway stopped
    /// (read back from the store): unsubscribed once the session is resumed unless a
    /// device holds it.
    pub fn restore_broker_filter(&mut self, filter: &str) {
        self.at_broker.insert(filter.into());
    }

    /// Puts back a clean-session-false device read from the state store after a restart:
    /// away, holding `subs` (subscribed at the broker when the connection is up) and the
    /// `held` messages, in order, for when it connects again.
    pub fn restore(&mut self, client_id: &str, subs: &[(String, u8)], held: Vec<(u64, HeldMessage)>) {
        let id: Arc<str> = client_id.into();
        let mut d = Device::new(false);
        for (filter, qos) in subs {
            let Some(qos) = qos_of(*qos) else { continue };
            let filter: Arc<str> = filter.as_str().into();
            d.subs.insert(filter.clone(), qos);
            let f = self.filters.entry(filter.clone()).or_insert_with(|| Filter {
                asked: qos,
                devices: HashMap::new(),
                pending: 0,
            });
            if f.devices.is_empty() && f.pending == 0 {
                self.index.insert(filter.clone());
            }
            f.asked = f.asked.max(qos);
            f.devices.insert(id.clone(), qos);
            if self.connected {
                f.pending += 1;
                let asked = f.asked;
                let tag = self.tag(Waiting::Resubscribe { filter: filter.clone() });
                self.request(Request::Subscribe {
                    tag,
                    filter,
                    qos: asked,
                });
            }
        }
        for (seq, m) in held {
            let Some(qos) = qos_of(m.qos).filter(|q| *q != MqttQos::AtMostOnce) else {
                continue;
            };
            d.next_seq = d.next_seq.max(seq.saturating_add(1));
            let message = Message {
                topic: m.topic.into(),
                payload: m.payload.into(),
                qos,
                retain: m.retain,
                delivery: DeliveryId(0),
            };
            d.queue.push_back((seq, message));
        }
        self.devices.insert(id, d);
    }

    /// A will read back from the store: its device was connected when the gateway
    /// stopped, so its connection was lost; it is published once the broker connection
    /// is up, as a broker publishes the will of a client whose connection dropped.
    pub fn restore_will(&mut self, client_id: &str, will: HeldMessage) {
        let Some(qos) = qos_of(will.qos) else { return };
        self.restored_wills.push((
            client_id.into(),
            Will {
                topic: will.topic,
                message: will.payload.into(),
                qos,
                retain: will.retain,
            },
        ));
    }

    fn store(&mut self, op: StoreOp) {
        self.out.push_back(Output::Store(op));
    }

    /// Stores `m` for device `id` if it is to be stored; its place (0: not stored).
    fn hold(&mut self, id: &Arc<str>, m: &Message) -> u64 {
        if !self.durable || m.qos == MqttQos::AtMostOnce {
            return 0;
        }
        let Some(d) = self.devices.get_mut(id).filter(|d| !d.clean) else {
            return 0;
        };
        let seq = d.next_seq;
        d.next_seq += 1;
        let message = HeldMessage {
            topic: m.topic.to_string(),
            payload: m.payload.to_vec(),
            qos: m.qos as u8,
            retain: m.retain,
        };
        self.store(StoreOp::PutHeld {
            client_id: id.clone(),
            seq,
            message,
        });
        seq
    }

    /// The message stored at `seq` for `id` is no longer held (delivered or dropped).
    fn unhold(&mut self, id: &Arc<str>, seq: u64) {
        if seq != 0 {
            self.store(StoreOp::RemoveHeld {
                client_id: id.clone(),
                seq,
            });
        }
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Sessions connected through this connection.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// What it holds, for the metrics.
    pub fn stats(&self) -> AggregateStats {
        let away = self.devices.values().filter(|d| d.key.is_none()).count();
        AggregateStats {
            filters: self.filters.len(),
            devices: self.sessions.len(),
            away,
            queued: self.devices.values().map(|d| d.queue.len()).sum(),
            queue_dropped: self.queue_dropped,
            unacked: self.inbound.len(),
            taken_over: self.taken_over,
            store_errors: 0,
        }
    }

    fn tag(&mut self, w: Waiting) -> Tag {
        let t = self.next_tag;
        self.next_tag += 1;
        self.waiting.insert(t, w);
        t
    }

    fn tell(&mut self, key: ClientKey, e: BrokerEvent) {
        self.out.push_back(Output::Session(key, e));
    }

    fn request(&mut self, r: Request) {
        let change = match &r {
            Request::Subscribe { filter, .. } if !self.at_broker.contains(filter) => {
                self.at_broker.insert(filter.clone());
                Some((filter.clone(), true))
            }
            Request::Unsubscribe { filter } if self.at_broker.remove(filter) => Some((filter.clone(), false)),
            _ => None,
        };
        if let (Some((filter, held)), true) = (change, self.durable) {
            // Stored before the SUBSCRIBE leaves: after a crash, the gateway knows every
            // filter the broker may hold for it.
            self.store(StoreOp::BrokerFilter {
                connection: self.connection,
                filter,
                held,
            });
        }
        self.out.push_back(Output::Broker(r));
    }

    /// A command of session `key`.
    pub fn command(&mut self, key: ClientKey, command: Command) {
        match command {
            Command::Connect(p) => {
                if !self.connected {
                    if self.connecting {
                        return self.held.push((key, p));
                    }
                    let (reason, refused) = self.down.clone();
                    return self.tell(key, BrokerEvent::ConnectFailed { reason, refused });
                }
                if p.credentials.is_some() || p.client_identity.is_some() {
                    // A shared connection has one login; a device's own cannot be honoured.
                    return self.tell(
                        key,
                        BrokerEvent::ConnectFailed {
                            reason: "the device has its own broker login or certificate, which aggregating mode \
                                     cannot use (one shared connection)"
                                .into(),
                            refused: true,
                        },
                    );
                }
                let id: Arc<str> = p.client_id.into();
                if self.devices.get(&id).is_some_and(|d| d.key.is_some_and(|k| k != key)) {
                    // Taken over: what the old session had not acknowledged goes to the
                    // new one. The old session stays known until its DISCONNECT, which
                    // may carry its will.
                    self.leave(&id);
                }
                let present = match self.devices.get(&id) {
                    Some(d) if !d.clean && !p.clean_session => true,
                    Some(_) => {
                        self.forget(&id);
                        false
                    }
                    None => false,
                };
                let device = self
                    .devices
                    .entry(id.clone())
                    .or_insert_with(|| Device::new(p.clean_session));
                device.key = Some(key);
                device.clean = p.clean_session;
                let queued = std::mem::take(&mut device.queue);
                if self.durable {
                    let will = p.will.as_ref().map(|w| HeldMessage {
                        topic: w.topic.clone(),
                        payload: w.message.to_vec(),
                        qos: w.qos as u8,
                        retain: w.retain,
                    });
                    let had = if will.is_some() {
                        !self.wills_stored.insert(id.clone())
                    } else {
                        self.wills_stored.remove(&id)
                    };
                    if will.is_some() || had {
                        self.store(StoreOp::Will {
                            client_id: id.clone(),
                            will,
                        });
                    }
                }
                self.sessions.insert(key, id.clone());
                self.tell(
                    key,
                    BrokerEvent::Connected {
                        session_present: present,
                    },
                );
                for (seq, m) in queued {
                    // Already off the broker's hands: no broker message to acknowledge.
                    self.deliver(&id, key, m, None, seq);
                }
            }
            Command::Publish { .. }
                if key == super::GATEWAY_KEY
                    && !self.connected
                    && self.connecting
                    && self.held_publishes.len() < HELD_PUBLISHES =>
            {
                // QoS -1 needs no session: like a connection of its own opened at the
                // first publish, the shared one takes it once it is up.
                self.held_publishes.push_back(command);
            }
            Command::Publish {
                token,
                topic,
                payload,
                qos,
                retain,
            } => {
                if !self.connected {
                    return self.tell(
                        key,
                        BrokerEvent::Rejected {
                            token,
                            reason: RejectReason::Closed,
                        },
                    );
                }
                let tag = (qos != MqttQos::AtMostOnce).then(|| self.tag(Waiting::Publish { key, token }));
                self.request(Request::Publish {
                    tag,
                    topic,
                    payload,
                    qos,
                    retain,
                });
            }
            Command::Subscribe { token, filter, qos } => {
                let Some(client) = self.sessions.get(&key).cloned().filter(|_| self.connected) else {
                    return self.tell(
                        key,
                        BrokerEvent::Rejected {
                            token,
                            reason: RejectReason::Closed,
                        },
                    );
                };
                let filter: Arc<str> = filter.into();
                let f = self.filters.entry(filter.clone()).or_insert_with(|| Filter {
                    asked: qos,
                    devices: HashMap::new(),
                    pending: 0,
                });
                if f.devices.is_empty() && f.pending == 0 {
                    self.index.insert(filter.clone());
                }
                f.asked = f.asked.max(qos);
                f.pending += 1;
                let asked = f.asked;
                let tag = self.tag(Waiting::Subscribe {
                    key,
                    token,
                    client,
                    filter: filter.clone(),
                    qos,
                });
                self.request(Request::Subscribe {
                    tag,
                    filter,
                    qos: asked,
                });
            }
            Command::Unsubscribe { token, filter } => {
                if let Some(client) = self.sessions.get(&key).cloned() {
                    let mut stored = false;
                    if let Some(d) = self.devices.get_mut(&client) {
                        stored = d.subs.remove(filter.as_str()).is_some() && !d.clean;
                    }
                    if stored && self.durable {
                        self.store(StoreOp::Unsubscribe {
                            client_id: client.clone(),
                            filter: filter.as_str().into(),
                        });
                    }
                    self.drop_subscriber(&filter, &client);
                }
                self.tell(key, BrokerEvent::UnsubAck { token });
            }
            Command::Ack { delivery } => {
                if let Some(client) = self.sessions.get(&key).cloned() {
                    let seq = self
                        .devices
                        .get_mut(&client)
                        .and_then(|d| d.unacked.remove(&delivery))
                        .map_or(0, |(seq, _)| seq);
                    self.unhold(&client, seq);
                }
                self.release(delivery);
            }
            Command::Expire { client_id } => {
                if self.devices.get(&client_id).is_some_and(|d| d.key.is_none()) {
                    self.forget(&client_id);
                }
            }
            Command::Disconnect { will } => {
                self.held.retain(|(k, _)| *k != key);
                let Some(id) = self.sessions.remove(&key) else {
                    return;
                };
                // The stored will is this session's unless a newer one took over.
                let current = self.devices.get(&id).is_some_and(|d| d.key == Some(key));
                let stored = current && self.wills_stored.remove(&id);
                match will {
                    Some(w) => self.publish_will(w, stored.then(|| id.clone())),
                    None if stored => self.store(StoreOp::Will {
                        client_id: id.clone(),
                        will: None,
                    }),
                    None => {}
                }
                match self.devices.get(&id) {
                    // Taken over by a newer session: the device is that one's now.
                    Some(d) if d.key != Some(key) => {}
                    Some(d) if !d.clean => self.leave(&id),
                    _ => self.forget(&id),
                }
            }
        }
    }

    /// Publishes a will; `stored` names the device whose stored copy goes once the
    /// broker has it.
    fn publish_will(&mut self, w: Will, stored: Option<Arc<str>>) {
        if !self.connected {
            return;
        }
        if w.qos == MqttQos::AtMostOnce {
            // No answer to wait for: the stored copy goes with the publish.
            if let Some(client) = &stored {
                self.unstore_will(client);
            }
        }
        let tag = (w.qos != MqttQos::AtMostOnce).then(|| self.tag(Waiting::Will { client: stored }));
        self.request(Request::Publish {
            tag,
            topic: w.topic.into(),
            payload: w.message,
            qos: w.qos,
            retain: w.retain,
        });
    }

    /// The stored will of `client` goes, unless its device has written a newer one since.
    fn unstore_will(&mut self, client: &Arc<str>) {
        if !self.wills_stored.contains(client) {
            self.store(StoreOp::Will {
                client_id: client.clone(),
                will: None,
            });
        }
    }

    /// The session of `id` is gone but its device keeps its subscriptions (clean session
    /// false): what it had not acknowledged is kept for it, ahead of anything newer.
    fn leave(&mut self, id: &Arc<str>) {
        let Some(d) = self.devices.get_mut(id) else {
            return;
        };
        d.key = None;
        let mut unacked: Vec<(DeliveryId, (u64, Message))> = d.unacked.drain().collect();
        unacked.sort_by_key(|(delivery, _)| *delivery);
        for (_, held) in unacked.iter().rev() {
            d.queue.push_front(held.clone());
        }
        let mut dropped = Vec::new();
        while d.queue.len() > self.queue_limit {
            if let Some((seq, _)) = d.queue.pop_back() {
                dropped.push(seq);
            }
            self.queue_dropped += 1;
        }
        for seq in dropped {
            self.unhold(id, seq);
        }
        for (delivery, _) in unacked {
            self.release(delivery);
        }
    }

    /// Drops everything of device `id` (clean session): its filters, its deliveries.
    fn forget(&mut self, id: &Arc<str>) {
        let Some(d) = self.devices.remove(id) else {
            return;
        };
        if let Some(key) = d.key {
            self.sessions.remove(&key);
        }
        for filter in d.subs.keys() {
            self.drop_subscriber(filter, id);
        }
        if self.durable && !d.clean {
            // Only what this aggregator wrote goes: the session record and topic ids
            // are the engine's, which may already hold the device's next session.
            for filter in d.subs.keys() {
                self.store(StoreOp::Unsubscribe {
                    client_id: id.clone(),
                    filter: filter.clone(),
                });
            }
            let seqs: Vec<u64> = d.unacked.values().chain(d.queue.iter()).map(|(seq, _)| *seq).collect();
            for seq in seqs {
                self.unhold(id, seq);
            }
        }
        for delivery in d.unacked.into_keys() {
            self.release(delivery);
        }
    }

    /// `client` no longer holds `filter`; the last one out unsubscribes at the broker.
    fn drop_subscriber(&mut self, filter: &str, client: &Arc<str>) {
        let Some(f) = self.filters.get_mut(filter) else {
            return;
        };
        f.devices.remove(client);
        if f.devices.is_empty() && f.pending == 0 {
            if let Some((filter, _)) = self.filters.remove_entry(filter) {
                self.index.remove(&filter);
                if self.connected {
                    self.request(Request::Unsubscribe { filter });
                }
            }
        }
    }

    /// One delivery of a broker message is done (acknowledged, or its device gone).
    fn release(&mut self, delivery: DeliveryId) {
        let Some(id) = self.deliveries.remove(&delivery) else {
            return;
        };
        if let Some(m) = self.inbound.get_mut(&id) {
            m.remaining = m.remaining.saturating_sub(1);
        }
        self.ack_in_order();
    }

    /// Acknowledges, oldest first, the broker messages every device has. Acknowledgements
    /// go in the order the messages came, even when devices answer out of order: MQTT
    /// allows either, but some brokers (rumqttd) drop a connection that acknowledges out
    /// of order. A message still owed holds back those after it, which the owed bound
    /// (`owed_limit`) keeps from stalling the connection.
    fn ack_in_order(&mut self) {
        while let Some(entry) = self.inbound.first_entry() {
            if entry.get().remaining > 0 {
                break;
            }
            let m = entry.remove();
            if self.connected {
                self.request(Request::Ack {
                    pkid: m.pkid,
                    qos: m.qos,
                });
            }
        }
    }

    /// Hands `m` to session `key` of device `id`; `inbound` is the broker message it
    /// belongs to, if that is still owed an acknowledgement.
    /// `seq` is its place in the store (0: not stored).
    fn deliver(&mut self, id: &Arc<str>, key: ClientKey, mut m: Message, inbound: Option<u64>, seq: u64) {
        let delivery = DeliveryId(self.next_delivery);
        self.next_delivery += 1;
        m.delivery = delivery;
        if m.qos != MqttQos::AtMostOnce {
            if let Some(d) = self.devices.get_mut(id) {
                d.unacked.insert(delivery, (seq, m.clone()));
            }
            if let Some(i) = inbound {
                self.deliveries.insert(delivery, i);
            }
        }
        self.tell(key, BrokerEvent::Message(m));
    }

    /// A connection attempt starts: CONNECTs wait for it.
    pub fn connecting(&mut self) {
        self.connecting = true;
    }

    /// The connection is up (CONNACK) with a new MQTT session: see
    /// [`Aggregator::connected_to_session`].
    pub fn connected(&mut self) {
        self.connected_to_session(false);
    }

    /// The connection is up (CONNACK): the filters of away devices are subscribed again,
    /// and the CONNECTs that waited are answered. With `session_present` (a persistent
    /// session the broker kept: durable mode), the broker still holds what was
    /// subscribed: only filters it lacks are subscribed, and those no device holds any
    /// more are unsubscribed. Without, the broker holds nothing: every filter is asked
    /// for again.
    pub fn connected_to_session(&mut self, session_present: bool) {
        self.connected = true;
        self.connecting = false;
        if session_present {
            let mut stale: Vec<Arc<str>> = self
                .at_broker
                .iter()
                .filter(|f| !self.filters.contains_key(*f))
                .cloned()
                .collect();
            stale.sort();
            if !stale.is_empty() {
                tracing::info!(
                    connection = self.connection,
                    filters = stale.len(),
                    "resumed broker session: unsubscribing the filters no device holds any more"
                );
            }
            for filter in stale {
                self.request(Request::Unsubscribe { filter });
            }
        } else {
            let gone: Vec<Arc<str>> = self.at_broker.drain().collect();
            if self.durable {
                for filter in gone {
                    let connection = self.connection;
                    self.store(StoreOp::BrokerFilter {
                        connection,
                        filter,
                        held: false,
                    });
                }
            }
        }
        let held: Vec<(Arc<str>, MqttQos)> = self
            .filters
            .iter()
            .filter(|(f, _)| !(session_present && self.at_broker.contains(*f)))
            .map(|(f, e)| (f.clone(), e.asked))
            .collect();
        for (filter, qos) in held {
            if let Some(f) = self.filters.get_mut(&filter) {
                f.pending += 1;
            }
            let tag = self.tag(Waiting::Resubscribe { filter: filter.clone() });
            self.request(Request::Subscribe { tag, filter, qos });
        }
        for (client, w) in std::mem::take(&mut self.restored_wills) {
            self.publish_will(w, Some(client));
        }
        for (key, p) in std::mem::take(&mut self.held) {
            self.command(key, Command::Connect(p));
        }
        for c in std::mem::take(&mut self.held_publishes) {
            self.command(super::GATEWAY_KEY, c);
        }
    }

    /// The connection could not be opened, or is gone: every session on it is closed
    /// (as each would be in transparent mode); devices with clean session false keep
    /// their subscriptions and what they had not acknowledged.
    pub fn lost(&mut self, reason: &str, refused: bool) {
        self.down = (reason.to_string(), refused);
        self.connecting = false;
        for (key, _) in std::mem::take(&mut self.held) {
            let reason = reason.to_string();
            self.tell(key, BrokerEvent::ConnectFailed { reason, refused });
        }
        for c in std::mem::take(&mut self.held_publishes) {
            if let Command::Publish { token, .. } = c {
                let reason = RejectReason::Closed;
                self.tell(super::GATEWAY_KEY, BrokerEvent::Rejected { token, reason });
            }
        }
        if !self.connected {
            return;
        }
        self.connected = false;
        let sessions: Vec<(ClientKey, Arc<str>)> = self.sessions.drain().collect();
        for (key, id) in sessions {
            self.tell(
                key,
                BrokerEvent::Closed {
                    reason: reason.to_string(),
                },
            );
            match self.devices.get(&id) {
                Some(d) if d.key != Some(key) => {}
                Some(d) if !d.clean => self.leave(&id),
                _ => self.forget(&id),
            }
        }
        self.waiting.clear();
        self.inbound.clear();
        self.deliveries.clear();
        self.window.clear();
        for f in self.filters.values_mut() {
            f.pending = 0;
        }
        // Filters only a pending SUBSCRIBE held are not re-established.
        let index = &mut self.index;
        self.filters.retain(|filter, f| {
            let keep = !f.devices.is_empty();
            if !keep {
                index.remove(filter);
            }
            keep
        });
    }

    /// The broker acknowledged publish `tag` (PUBACK, or PUBREC for QoS 2).
    pub fn published(&mut self, tag: Tag) {
        match self.waiting.remove(&tag) {
            Some(Waiting::Publish { key, token }) => self.tell(key, BrokerEvent::Published { token }),
            Some(Waiting::Will { client: Some(client) }) => self.unstore_will(&client),
            _ => {}
        }
    }

    /// The broker answered one SUBSCRIBE packet: each of its filters' tag with what was
    /// granted (`None`: refused), in the packet's order.
    pub fn subscribed(&mut self, answers: &[(Tag, Option<MqttQos>)]) {
        // What follows this SUBACK with RETAIN set is for these subscriptions alone.
        self.window.clear();
        for (tag, granted) in answers {
            self.subscribed_one(*tag, *granted);
        }
    }

    fn subscribed_one(&mut self, tag: Tag, granted: Option<MqttQos>) {
        let (filter, waiter) = match self.waiting.remove(&tag) {
            Some(Waiting::Subscribe {
                key,
                token,
                client,
                filter,
                qos,
            }) => (filter, Some((key, token, client, qos))),
            Some(Waiting::Resubscribe { filter }) => (filter, None),
            _ => return,
        };
        if let Some(f) = self.filters.get_mut(&filter) {
            f.pending = f.pending.saturating_sub(1);
        }
        if let Some((key, token, client, qos)) = waiter {
            let granted = granted.map(|g| g.min(qos));
            let current = self.devices.get(&client).is_some_and(|d| d.key == Some(key));
            if let (Some(g), true) = (granted, current) {
                let mut stored = false;
                if let Some(d) = self.devices.get_mut(&client) {
                    stored = d.subs.insert(filter.clone(), g) != Some(g) && !d.clean;
                }
                if stored && self.durable {
                    self.store(StoreOp::Subscribe {
                        client_id: client.clone(),
                        filter: filter.clone(),
                        qos: g as u8,
                    });
                }
                if let Some(f) = self.filters.get_mut(&filter) {
                    f.devices.insert(client.clone(), g);
                }
                self.window.push((filter.clone(), client));
            }
            self.tell(key, BrokerEvent::SubAck { token, granted });
        }
        if let Some(f) = self.filters.get(&filter) {
            if f.devices.is_empty() && f.pending == 0 {
                self.filters.remove(&filter);
                self.index.remove(&filter);
                if granted.is_some() && self.connected {
                    self.request(Request::Unsubscribe { filter });
                }
            }
        }
    }

    /// A message from the broker, with its packet id (QoS 1/2).
    pub fn message(&mut self, topic: Arc<str>, payload: Bytes, qos: MqttQos, retain: bool, pkid: u16) {
        // Who gets it, each once, at the highest QoS among its matching filters.
        let mut to: HashMap<Arc<str>, MqttQos> = HashMap::new();
        let replay: Vec<&(Arc<str>, Arc<str>)> = if retain {
            self.window
                .iter()
                .filter(|(f, _)| super::index::filter_matches(f, &topic))
                .collect()
        } else {
            Vec::new()
        };
        if !replay.is_empty() {
            // Sent because of the latest SUBSCRIBE: for its devices alone.
            for (filter, device) in replay {
                if let Some(g) = self.filters.get(filter).and_then(|f| f.devices.get(device)) {
                    let e = to.entry(device.clone()).or_insert(*g);
                    *e = (*e).max(*g);
                }
            }
        } else {
            // A live message (or, from a broker that keeps RETAIN on live messages, one
            // that no new subscription explains): every matching device.
            let filters = &self.filters;
            self.index.matches(&topic, |f| {
                if let Some(entry) = filters.get(f) {
                    for (client, g) in &entry.devices {
                        let e = to.entry(client.clone()).or_insert(*g);
                        *e = (*e).max(*g);
                    }
                }
            });
        }
        let inbound = (qos != MqttQos::AtMostOnce).then(|| {
            let id = self.next_inbound;
            self.next_inbound += 1;
            id
        });
        let mut owed = 0;
        for (client, granted) in to {
            let q = qos.min(granted);
            let m = Message {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: q,
                retain,
                delivery: DeliveryId(0),
            };
            let Some(key) = self.devices.get(&client).map(|d| d.key) else {
                continue;
            };
            match key {
                Some(key) => {
                    let seq = self.hold(&client, &m);
                    // Stored for the device (seq > 0): durably queued, so the broker may
                    // have its acknowledgement once the store has it, without waiting for
                    // the device (a persistent broker session would otherwise deliver it
                    // again after a crash, beside the stored copy).
                    let owes = q != MqttQos::AtMostOnce && seq == 0;
                    if owes {
                        owed += 1;
                    }
                    self.deliver(&client, key, m, inbound.filter(|_| owes), seq);
                }
                None if q != MqttQos::AtMostOnce => {
                    // Away with clean session false: kept by the gateway (QoS 0 is not
                    // kept for an away client, as a broker would not).
                    let seq = self.hold(&client, &m);
                    let mut dropped = None;
                    if let Some(d) = self.devices.get_mut(&client) {
                        if d.queue.len() >= self.queue_limit {
                            dropped = d.queue.pop_front().map(|(seq, _)| seq);
                            self.queue_dropped += 1;
                        }
                        d.queue.push_back((seq, m));
                    }
                    if let Some(old) = dropped {
                        self.unhold(&client, old);
                    }
                }
                None => {}
            }
        }
        if let Some(id) = inbound {
            self.inbound.insert(
                id,
                Inbound {
                    pkid,
                    qos,
                    remaining: owed,
                },
            );
            self.ack_in_order();
            while self.inbound.len() > self.owed_limit {
                let Some((_, oldest)) = self.inbound.pop_first() else {
                    break;
                };
                // Its deliveries stay with their devices; their acknowledgements then
                // find nothing left to release.
                self.taken_over += 1;
                self.request(Request::Ack {
                    pkid: oldest.pkid,
                    qos: oldest.qos,
                });
                self.ack_in_order();
            }
        }
    }
}

/// A stored QoS as [`MqttQos`] (`None`: not one).
fn qos_of(q: u8) -> Option<MqttQos> {
    match q {
        0 => Some(MqttQos::AtMostOnce),
        1 => Some(MqttQos::AtLeastOnce),
        2 => Some(MqttQos::ExactlyOnce),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
