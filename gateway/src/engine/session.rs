//! One MQTT-SN client's session: the connect handshake, topic ids, publishes both ways,
//! subscriptions, keep-alive, retransmission and the sleep cycle.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sn_codec::{Packet, PubAck, QoS, RegAck, Register, ReturnCode, SubAck, TopicFilter, TopicRef};
use tracing::{debug, info};

use super::persisted::Kept;
use super::qos2::{self, Qos2Ledger};
use super::{EngineConfig, Latencies, Metrics, Output, Peer};
use crate::auth::{Admission, AuthConfig, Grants};
use crate::broker::{BrokerEvent, ClientKey, Command, ConnectParams, Credentials, Message, MqttQos, Token, Will};
use crate::store::Sleeper;
use crate::topics::{self, Predefined, TopicTable};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// CONNECT with the will flag received, WILLTOPICREQ sent.
    WillTopic,
    /// WILLTOPIC received, WILLMSGREQ sent.
    WillMsg,
    /// Waiting for the broker to accept the connection.
    Connecting,
    /// Connected and awake.
    Active,
    /// Asleep: messages are held.
    Asleep,
    /// Woken by PINGREQ: held messages are being delivered, PINGRESP follows.
    Awake,
}

impl SessionState {
    /// Whether the connect handshake is still running.
    pub fn is_connecting(self) -> bool {
        matches!(
            self,
            SessionState::WillTopic | SessionState::WillMsg | SessionState::Connecting
        )
    }
}

/// What the engine must do with a session after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Flow {
    Continue,
    /// The session is over (its broker link has been told already).
    End,
}

/// What a session handler needs from the engine.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a EngineConfig,
    pub out: &'a mut Output,
    pub metrics: &'a mut Metrics,
    pub latency: &'a mut Latencies,
    pub now: Instant,
}

/// A device publish waiting for the broker's acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Uplink {
    msg_id: u16,
    topic_id: u16,
    qos: MqttQos,
    /// When the device's PUBLISH arrived.
    at: Instant,
}

/// A SUBSCRIBE waiting for the broker's SUBACK.
#[derive(Debug, Clone, Copy)]
struct PendingSub {
    msg_id: u16,
    topic_id: u16,
}

/// A broker message held for the device.
#[derive(Debug, Clone)]
struct Held {
    msg: Message,
    /// Sent to the device before (the next send carries DUP).
    sent: bool,
}

/// The one gateway-to-device exchange in flight.
#[derive(Debug, Clone, Copy)]
enum InflightKind {
    /// REGISTER for the topic of the message at the queue's front.
    Register { msg_id: u16, topic_id: u16 },
    /// PUBLISH (QoS 1 or 2) of the message at the queue's front.
    Publish { msg_id: u16, topic: TopicRef },
    /// PUBREL of a QoS 2 message already off the queue.
    PubRel { msg_id: u16 },
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    kind: InflightKind,
    sent_at: Instant,
    retries: u32,
}

/// One client session.
#[derive(Debug)]
pub(crate) struct Session {
    key: ClientKey,
    client_id: Arc<str>,
    peer: Peer,
    state: SessionState,
    clean_session: bool,
    keep_alive: u16,
    last_heard: Instant,
    /// Set when the handshake is a CONNECT from asleep: no new broker connection.
    resuming: bool,
    will_topic: Option<(String, MqttQos, bool)>,
    will_message: Bytes,
    topics: TopicTable,
    next_token: Token,
    uplink: HashMap<Token, Uplink>,
    /// QoS 2 message ids from the device published to the broker: `true` once PUBREC was
    /// sent to the device (awaiting PUBREL), `false` while the broker has not answered.
    qos2_in: HashMap<u16, bool>,
    /// QoS 2 publishes completed (PUBREL answered) recently: message id, digest of topic
    /// and payload, and when. A late copy of such a PUBLISH (a radio that duplicates and
    /// reorders) must not reach the broker twice, while a new message reusing the id
    /// (allowed once PUBCOMP is sent) must. Kept for Tretry x (Nretry + 1), at most
    /// [`QOS2_DONE_KEPT`] entries.
    qos2_done: VecDeque<(u16, u64, Instant)>,
    /// Digests of the QoS 2 publishes in `qos2_in`, moved to `qos2_done` on PUBREL.
    qos2_digest: HashMap<u16, u64>,
    subs: HashMap<Token, PendingSub>,
    unsubs: HashMap<Token, u16>,
    queue: VecDeque<Held>,
    queued_bytes: usize,
    inflight: Option<Inflight>,
    next_msg_id: u16,
    /// While awake: messages still to deliver before PINGRESP.
    wake_remaining: usize,
    sleep_since: Instant,
    sleep_duration: Duration,
    timer: Option<Instant>,
    /// When the CONNECT that created the session arrived, until its CONNACK.
    connect_started: Option<Instant>,
    /// What it may publish and subscribe to, and its mountpoint.
    grants: Grants,
    /// Its own broker login (device registry), if any.
    credentials: Option<Credentials>,
    client_identity: Option<std::sync::Arc<crate::broker::tls::ClientIdentity>>,
    /// The predefined topics it sees: the global ones with its own (registry) on top.
    predefined: Arc<Predefined>,
    /// Asleep as the state store last heard (clean-session-false sessions): a change is
    /// written ([`Session::take_sleep_change`]), so that a restarted gateway knows it.
    stored_sleep: Option<Sleeper>,
    /// Restored asleep after a restart, its broker connection not yet open again: a
    /// wake waits for it before PINGRESP (what the broker kept for it comes then).
    reopening: bool,
    /// Its QoS 2 deliveries in progress, kept across its sessions (see [`qos2`]).
    qos2_out: Qos2Ledger,
    /// Restored asleep after a restart and not connected since: a request other than a
    /// wake (the device was awake after all) is answered DISCONNECT, so it connects.
    restored: bool,
}

/// Completed QoS 2 publishes remembered per client.
const QOS2_DONE_KEPT: usize = 16;

/// A digest of what a PUBLISH carries (topic and payload), to tell a late copy from a
/// new message reusing a message id.
fn digest(p: &sn_codec::Publish<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.topic.hash(&mut h);
    p.data.hash(&mut h);
    h.finish()
}

fn mqtt_qos(q: QoS) -> MqttQos {
    match q {
        QoS::AtLeastOnce => MqttQos::AtLeastOnce,
        QoS::ExactlyOnce => MqttQos::ExactlyOnce,
        QoS::AtMostOnce | QoS::MinusOne => MqttQos::AtMostOnce,
    }
}

fn sn_qos(q: MqttQos) -> QoS {
    match q {
        MqttQos::AtMostOnce => QoS::AtMostOnce,
        MqttQos::AtLeastOnce => QoS::AtLeastOnce,
        MqttQos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn scaled(secs: u16, factor: f64) -> Duration {
    Duration::from_secs_f64(f64::from(secs) * factor)
}

impl Session {
    /// Starts a session for a CONNECT: the will handshake, or straight to the broker.
    pub(crate) fn new(
        ctx: &mut Ctx<'_>,
        key: ClientKey,
        client_id: Arc<str>,
        peer: Peer,
        c: sn_codec::Connect<'_>,
        kept: Kept,
        admission: Admission,
    ) -> Session {
        let mut s = Session::blank(ctx, key, client_id, peer, c.clean_session, c.duration, kept, admission);
        s.connect_started = Some(ctx.now);
        s.start_handshake(ctx, c.will);
        s
    }

    /// A clean-session-false session found asleep in the state store after a restart:
    /// asleep again at once, as it was (its sleep duration counted from now), while its
    /// broker connection is opened again (without a will: the broker, or in aggregating
    /// mode the restarted gateway, has published the one of the crashed session). Its
    /// PINGREQ is a wake like any other.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore_asleep(
        ctx: &mut Ctx<'_>,
        key: ClientKey,
        client_id: Arc<str>,
        sleeper: Sleeper,
        kept: Kept,
        admission: Admission,
    ) -> Session {
        let mut s = Session::blank(
            ctx,
            key,
            client_id,
            sleeper.peer.clone(),
            false,
            sleeper.keep_alive,
            kept,
            admission,
        );
        s.state = SessionState::Asleep;
        s.sleep_duration = Duration::from_secs(u64::from(sleeper.duration_secs)).min(ctx.cfg.max_sleep);
        s.reopening = true;
        s.restored = true;
        s.stored_sleep = Some(sleeper);
        ctx.out.command(
            s.key,
            Command::Connect(ConnectParams {
                client_id: s.client_id.to_string(),
                clean_session: false,
                keep_alive: s.keep_alive,
                will: None,
                credentials: s.credentials.clone(),
                client_identity: s.client_identity.clone(),
            }),
        );
        s
    }

    #[allow(clippy::too_many_arguments)]
    fn blank(
        ctx: &mut Ctx<'_>,
        key: ClientKey,
        client_id: Arc<str>,
        peer: Peer,
        clean_session: bool,
        keep_alive: u16,
        kept: Kept,
        admission: Admission,
    ) -> Session {
        Session {
            key,
            client_id,
            peer,
            state: SessionState::Connecting,
            clean_session,
            keep_alive,
            last_heard: ctx.now,
            resuming: false,
            will_topic: None,
            will_message: Bytes::new(),
            topics: kept.topics,
            qos2_out: kept.qos2,
            next_token: 1,
            uplink: HashMap::new(),
            qos2_in: HashMap::new(),
            qos2_done: VecDeque::new(),
            qos2_digest: HashMap::new(),
            subs: HashMap::new(),
            unsubs: HashMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight: None,
            next_msg_id: 0,
            wake_remaining: 0,
            sleep_since: ctx.now,
            sleep_duration: Duration::ZERO,
            timer: None,
            connect_started: None,
            predefined: admission.grants.predefined(&ctx.cfg.predefined),
            grants: admission.grants,
            credentials: admission.credentials,
            client_identity: admission.client_identity,
            stored_sleep: None,
            reopening: false,
            restored: false,
        }
    }

    /// What the state store must learn of this session's sleep since the last call:
    /// `Some(_)` it went to sleep (or sleeps elsewhere, or for another duration); `None`:
    /// nothing new. Always `None` for a clean session, which the store does not hold. A
    /// wake by PINGREQ is not a change (the device sleeps on after it), and neither is a
    /// CONNECT from sleep: a sleepy device connects to publish and sleeps again, and one
    /// write per cycle would cost a commit each time. The record goes when the session
    /// ends; a device found asleep after a crash that was in fact awake is told to
    /// connect again at its first request (see [`Session::restore_asleep`]).
    pub(crate) fn take_sleep_change(&mut self) -> Option<Sleeper> {
        if self.clean_session {
            return None;
        }
        let asleep = matches!(self.state, SessionState::Asleep | SessionState::Awake);
        if !asleep {
            return None;
        }
        let secs = u32::try_from(self.sleep_duration.as_secs()).unwrap_or(u32::MAX);
        let same = self
            .stored_sleep
            .as_ref()
            .is_some_and(|s| s.peer == self.peer && s.keep_alive == self.keep_alive && s.duration_secs == secs);
        if same {
            return None;
        }
        let now = Sleeper {
            peer: self.peer.clone(),
            keep_alive: self.keep_alive,
            duration_secs: secs,
        };
        self.stored_sleep = Some(now.clone());
        Some(now)
    }

    fn start_handshake(&mut self, ctx: &mut Ctx<'_>, will: bool) {
        if will {
            self.state = SessionState::WillTopic;
            ctx.out.send(&self.peer, &Packet::WillTopicReq);
        } else {
            self.will_topic = None;
            self.will_message = Bytes::new();
            self.finish_handshake(ctx);
        }
    }

    fn finish_handshake(&mut self, ctx: &mut Ctx<'_>) {
        if self.resuming {
            self.resuming = false;
            self.become_active(ctx);
            return;
        }
        self.state = SessionState::Connecting;
        ctx.out.command(
            self.key,
            Command::Connect(ConnectParams {
                client_id: self.client_id.to_string(),
                clean_session: self.clean_session,
                keep_alive: self.keep_alive,
                will: self.will(),
                credentials: self.credentials.clone(),
                client_identity: self.client_identity.clone(),
            }),
        );
    }

    fn become_active(&mut self, ctx: &mut Ctx<'_>) {
        self.state = SessionState::Active;
        ctx.metrics.connects += 1;
        if let Some(at) = self.connect_started.take() {
            ctx.latency.connack.observe(ctx.now.saturating_duration_since(at));
        }
        debug!(client = %self.client_id, peer = %self.peer, keep_alive = self.keep_alive, clean = self.clean_session, "client connected");
        ctx.out.send(&self.peer, &Packet::ConnAck(ReturnCode::Accepted));
        // Whatever was in flight when the client slept is sent again now.
        self.retransmit_inflight(ctx);
        self.pump(ctx);
    }

    pub(crate) fn state(&self) -> SessionState {
        self.state
    }

    pub(crate) fn held(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn peer(&self) -> &Peer {
        &self.peer
    }

    pub(crate) fn set_peer(&mut self, peer: Peer) {
        self.peer = peer;
    }

    pub(crate) fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    pub(crate) fn clean_session(&self) -> bool {
        self.clean_session
    }

    pub(crate) fn timer(&self) -> Option<Instant> {
        self.timer
    }

    pub(crate) fn set_timer(&mut self, at: Option<Instant>) {
        self.timer = at;
    }

    /// What a clean-session-false device keeps when the session ends.
    pub(crate) fn into_kept(self) -> Kept {
        Kept {
            topics: self.topics,
            qos2: self.qos2_out,
        }
    }

    /// The changes to its topic table since the last call (recorded only for a
    /// clean-session-false session with a state store).
    pub(crate) fn take_topic_changes(&mut self) -> Vec<crate::topics::TopicChange> {
        self.topics.take_changes()
    }

    /// The changes to its QoS 2 deliveries in progress since the last call (recorded
    /// as the topic table's are).
    pub(crate) fn take_qos2_changes(&mut self) -> Vec<(u16, Option<crate::store::Qos2State>)> {
        self.qos2_out.take_changes()
    }

    /// Applies the registry in force now (a reload) to this session's rights.
    pub(crate) fn regrant(&mut self, auth: &AuthConfig, global: &Arc<Predefined>) {
        self.grants = auth.regrant(
            &self.client_id,
            self.credentials.as_ref(),
            self.grants.mountpoint.clone(),
        );
        self.predefined = self.grants.predefined(global);
    }

    /// The global predefined topics changed (a reload).
    pub(crate) fn set_predefined(&mut self, global: &Arc<Predefined>) {
        self.predefined = self.grants.predefined(global);
    }

    /// Whether the device may publish to `topic` (and name it as its will); counts and
    /// logs a refusal.
    fn may_publish(&self, ctx: &mut Ctx<'_>, topic: &str, what: &str) -> bool {
        match self.grants.may_publish(topic) {
            Ok(()) => true,
            Err(denied) => {
                ctx.metrics.count_denied(denied);
                // Counted; at debug, as a flood of them must not drown the log.
                debug!(client = %self.client_id, peer = %self.peer, topic, ?denied, "{what} refused: topic not allowed");
                false
            }
        }
    }

    /// The broker's name for one of the device's topics (the mountpoint prepended).
    fn mounted(&self, topic: Arc<str>) -> Arc<str> {
        if self.grants.mountpoint.is_some() {
            self.grants.mount(&topic).into()
        } else {
            topic
        }
    }

    fn will(&self) -> Option<Will> {
        self.will_topic.as_ref().map(|(topic, qos, retain)| Will {
            topic: self.grants.mount(topic),
            message: self.will_message.clone(),
            qos: *qos,
            retain: *retain,
        })
    }

    /// The session is replaced by a new CONNECT with the same client id or address:
    /// close its broker connection cleanly (no will: the client is not lost).
    pub(crate) fn take_over(self, out: &mut Output) -> Kept {
        out.command(self.key, Command::Disconnect { will: None });
        self.into_kept()
    }

    /// A CONNECT again from the same address while the handshake runs: the device did
    /// not hear our answer. Start the handshake over if it changed its mind about the
    /// will; otherwise repeat the current step.
    pub(crate) fn handle_connect_retry(&mut self, ctx: &mut Ctx<'_>, c: sn_codec::Connect<'_>) -> Flow {
        self.last_heard = ctx.now;
        match self.state {
            SessionState::WillTopic | SessionState::WillMsg if c.will => {
                self.state = SessionState::WillTopic;
                ctx.out.send(&self.peer, &Packet::WillTopicReq);
            }
            // Waiting for the broker: CONNACK comes when it answers.
            _ => {}
        }
        Flow::Continue
    }

    /// CONNECT from asleep: active again, held messages delivered (spec 6.14).
    pub(crate) fn resume(&mut self, ctx: &mut Ctx<'_>, c: sn_codec::Connect<'_>) -> Flow {
        self.last_heard = ctx.now;
        self.keep_alive = c.duration;
        self.resuming = true;
        self.restored = false;
        debug!(client = %self.client_id, "client resumes from sleep with CONNECT");
        self.start_handshake(ctx, c.will);
        Flow::Continue
    }

    /// A message from the device.
    pub(crate) fn handle_packet(&mut self, ctx: &mut Ctx<'_>, packet: Packet<'_>) -> Flow {
        use SessionState as S;
        if self.state != S::Asleep {
            self.last_heard = ctx.now;
        }
        match (self.state, packet) {
            (S::WillTopic | S::WillMsg, Packet::WillTopic(Some(w))) => {
                if let Err(why) = topics::check_topic_name(w.topic) {
                    ctx.metrics.topic_refused += 1;
                    debug!(client = %self.client_id, peer = %self.peer, topic = w.topic, %why, "invalid will topic refused");
                    ctx.out.send(&self.peer, &Packet::ConnAck(ReturnCode::NotSupported));
                    ctx.metrics.connects_refused += 1;
                    return self.end_connecting(ctx);
                }
                if !self.may_publish(ctx, w.topic, "will topic") {
                    ctx.out.send(&self.peer, &Packet::ConnAck(ReturnCode::NotSupported));
                    ctx.metrics.connects_refused += 1;
                    return self.end_connecting(ctx);
                }
                self.will_topic = Some((w.topic.to_string(), mqtt_qos(w.qos), w.retain));
                self.state = S::WillMsg;
                ctx.out.send(&self.peer, &Packet::WillMsgReq);
            }
            (S::WillTopic, Packet::WillTopic(None)) => {
                self.will_topic = None;
                self.finish_handshake(ctx);
            }
            (S::WillMsg, Packet::WillMsg(m)) => {
                self.will_message = Bytes::copy_from_slice(m);
                self.finish_handshake(ctx);
            }
            // Retransmissions of handshake steps already done.
            (S::Connecting, Packet::WillMsg(_) | Packet::WillTopic(_)) => {}
            (S::WillTopic | S::WillMsg | S::Connecting, Packet::Disconnect(None)) => {
                ctx.out.send(&self.peer, &Packet::Disconnect(None));
                return self.end_connecting(ctx);
            }
            (S::Active | S::Awake, Packet::Register(r)) => self.on_register(ctx, r),
            (S::Active | S::Awake, Packet::Publish(p)) => self.on_publish(ctx, p),
            (S::Active | S::Awake | S::Asleep, Packet::PubRel(msg_id)) => {
                // Answered whatever we know of it: PUBCOMP must reach the device.
                self.qos2_in.remove(&msg_id);
                if let Some(digest) = self.qos2_digest.remove(&msg_id) {
                    if self.qos2_done.len() >= QOS2_DONE_KEPT {
                        self.qos2_done.pop_front();
                    }
                    self.qos2_done.push_back((msg_id, digest, ctx.now));
                }
                ctx.out.send(&self.peer, &Packet::PubComp(msg_id));
            }
            (S::Active | S::Awake, Packet::PubAck(a)) => self.on_puback(ctx, a),
            (S::Active | S::Awake, Packet::PubRec(msg_id)) => self.on_pubrec(ctx, msg_id),
            (S::Active | S::Awake, Packet::PubComp(msg_id)) => self.on_pubcomp(ctx, msg_id),
            (S::Active | S::Awake, Packet::RegAck(a)) => self.on_regack(ctx, a),
            (S::Active | S::Awake, Packet::Subscribe(s)) => self.on_subscribe(ctx, s),
            (S::Active | S::Awake, Packet::Unsubscribe(u)) => self.on_unsubscribe(ctx, u),
            (S::Active, Packet::PingReq(_)) => {
                ctx.out.send(&self.peer, &Packet::PingResp);
            }
            (S::Asleep, Packet::PingReq(_)) => self.wake(ctx),
            // A repeated PINGREQ while delivering: PINGRESP comes after the last message.
            (S::Awake, Packet::PingReq(_)) => {}
            (S::Active | S::Awake | S::Asleep, Packet::Disconnect(None)) => {
                ctx.out.send(&self.peer, &Packet::Disconnect(None));
                ctx.metrics.disconnects += 1;
                debug!(client = %self.client_id, peer = %self.peer, "client disconnected");
                ctx.out.command(self.key, Command::Disconnect { will: None });
                return Flow::End;
            }
            (S::Active | S::Awake | S::Asleep, Packet::Disconnect(Some(secs))) => return self.sleep(ctx, secs),
            (S::Active | S::Awake, Packet::WillTopicUpd(w)) => {
                let code = match w {
                    None => {
                        self.will_topic = None;
                        self.will_message = Bytes::new();
                        ReturnCode::Accepted
                    }
                    Some(w) => match topics::check_topic_name(w.topic) {
                        Ok(()) if !self.may_publish(ctx, w.topic, "will topic update") => ReturnCode::NotSupported,
                        Ok(()) => {
                            self.will_topic = Some((w.topic.to_string(), mqtt_qos(w.qos), w.retain));
                            ReturnCode::Accepted
                        }
                        Err(why) => {
                            ctx.metrics.topic_refused += 1;
                            debug!(client = %self.client_id, peer = %self.peer, topic = w.topic, %why, "invalid will topic refused");
                            ReturnCode::NotSupported
                        }
                    },
                };
                debug!(client = %self.client_id, ?code, "will topic update");
                ctx.out.send(&self.peer, &Packet::WillTopicResp(code));
            }
            (S::Active | S::Awake, Packet::WillMsgUpd(m)) => {
                self.will_message = Bytes::copy_from_slice(m);
                debug!(client = %self.client_id, "will message update");
                ctx.out.send(&self.peer, &Packet::WillMsgResp(ReturnCode::Accepted));
            }
            (S::Asleep, Packet::Publish(_) | Packet::Register(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_))
                if self.restored =>
            {
                ctx.metrics.unexpected += 1;
                debug!(client = %self.client_id, "request to a session restored asleep: the device is told to connect");
                ctx.out.send(&self.peer, &Packet::Disconnect(None));
            }
            (state, p) => {
                ctx.metrics.unexpected += 1;
                debug!(client = %self.client_id, ?state, kind = ?p.msg_type(), "unexpected message dropped");
            }
        }
        self.pump(ctx);
        Flow::Continue
    }

    /// A request the decoder refused as unsupported (reserved value, not UTF-8): the
    /// answer it would get for an invalid topic, return code 0x03, in the states where
    /// the request itself is handled.
    pub(crate) fn refuse(&mut self, ctx: &mut Ctx<'_>, request: sn_codec::Request) -> Flow {
        use sn_codec::Request as R;
        use SessionState as S;
        if self.state != S::Asleep {
            self.last_heard = ctx.now;
        }
        let rc = ReturnCode::NotSupported;
        let answer = match (self.state, request) {
            (S::WillTopic | S::WillMsg, R::WillTopic) => {
                ctx.out.send(&self.peer, &Packet::ConnAck(rc));
                ctx.metrics.connects_refused += 1;
                return self.end_connecting(ctx);
            }
            (S::Active | S::Awake, R::WillTopicUpd) => Packet::WillTopicResp(rc),
            (S::Active | S::Awake, R::Register { msg_id, .. }) => Packet::RegAck(RegAck {
                topic_id: 0,
                msg_id,
                code: rc,
            }),
            (S::Active | S::Awake, R::Publish { topic_id, msg_id, .. }) => Packet::PubAck(PubAck {
                topic_id,
                msg_id,
                code: rc,
            }),
            (S::Active | S::Awake, R::Subscribe { msg_id }) => Packet::SubAck(SubAck {
                qos: QoS::AtMostOnce,
                topic_id: 0,
                msg_id,
                code: rc,
            }),
            // UNSUBACK has no return code: nothing was subscribed by that topic.
            (S::Active | S::Awake, R::Unsubscribe { msg_id }) => Packet::UnsubAck(msg_id),
            (state, request) => {
                ctx.metrics.unexpected += 1;
                debug!(client = %self.client_id, ?state, request = request.name(), "unexpected message dropped");
                return Flow::Continue;
            }
        };
        debug!(client = %self.client_id, peer = %self.peer, request = request.name(), "request refused: not supported");
        ctx.out.send(&self.peer, &answer);
        Flow::Continue
    }

    fn end_connecting(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        if self.resuming {
            // The broker connection belongs to the sleeping session being resumed.
            ctx.out.command(self.key, Command::Disconnect { will: None });
        } else if self.state == SessionState::Connecting {
            ctx.out.command(self.key, Command::Disconnect { will: None });
        }
        Flow::End
    }

    fn next_msg_id(&mut self) -> u16 {
        loop {
            self.next_msg_id = self.next_msg_id.wrapping_add(1);
            // 0 is no id; one a QoS 2 delivery in progress holds is not free either.
            if self.next_msg_id != 0 && !self.qos2_out.holds(self.next_msg_id) {
                return self.next_msg_id;
            }
        }
    }

    fn next_token(&mut self) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn on_register(&mut self, ctx: &mut Ctx<'_>, r: Register<'_>) {
        let (topic_id, code) = if let Err(why) = topics::check_topic_name(r.topic_name) {
            ctx.metrics.topic_refused += 1;
            debug!(client = %self.client_id, peer = %self.peer, topic = ?r.topic_name, %why, "REGISTER of an invalid topic refused");
            (0, ReturnCode::NotSupported)
        } else if !self.may_publish(ctx, r.topic_name, "REGISTER") {
            (0, ReturnCode::NotSupported)
        } else {
            match self
                .topics
                .assign(r.topic_name, ctx.cfg.max_topics_per_client, &self.predefined)
            {
                Some(id) => (id, ReturnCode::Accepted),
                None => (0, ReturnCode::Congestion),
            }
        };
        debug!(client = %self.client_id, topic = r.topic_name, topic_id, ?code, "REGISTER");
        let ack = Packet::RegAck(RegAck {
            topic_id,
            msg_id: r.msg_id,
            code,
        });
        ctx.out.send(&self.peer, &ack);
    }

    fn on_publish(&mut self, ctx: &mut Ctx<'_>, p: sn_codec::Publish<'_>) {
        let topic_id = topics::raw_id(p.topic);
        let topic = match topics::resolve(p.topic, &self.predefined, &self.topics) {
            Ok(topic) => topic,
            Err(unresolved) => {
                let code = match unresolved {
                    topics::Unresolved::UnknownId => {
                        ctx.metrics.invalid_topic += 1;
                        debug!(client = %self.client_id, topic = ?p.topic, "PUBLISH to unknown topic id");
                        ReturnCode::InvalidTopicId
                    }
                    topics::Unresolved::Invalid(why) => {
                        ctx.metrics.topic_refused += 1;
                        debug!(client = %self.client_id, peer = %self.peer, topic = ?p.topic, %why, "PUBLISH to an invalid topic refused");
                        ReturnCode::NotSupported
                    }
                };
                let ack = Packet::PubAck(PubAck {
                    topic_id,
                    msg_id: p.msg_id,
                    code,
                });
                ctx.out.send(&self.peer, &ack);
                return;
            }
        };
        // Checked at every PUBLISH, not only at REGISTER: predefined and short topics
        // have no REGISTER, and a reload may have changed the patterns since.
        if !self.may_publish(ctx, &topic, "PUBLISH") {
            if p.qos != QoS::AtMostOnce {
                let ack = Packet::PubAck(PubAck {
                    topic_id,
                    msg_id: p.msg_id,
                    code: ReturnCode::NotSupported,
                });
                ctx.out.send(&self.peer, &ack);
            }
            return;
        }
        let topic = self.mounted(topic);
        let qos = mqtt_qos(p.qos);
        let token = match qos {
            MqttQos::AtMostOnce => 0,
            MqttQos::AtLeastOnce => {
                if p.dup && self.uplink.values().any(|u| u.msg_id == p.msg_id) {
                    return; // Still waiting for the broker; PUBACK follows.
                }
                self.next_token()
            }
            MqttQos::ExactlyOnce if self.recently_completed(ctx, p.msg_id, digest(&p)) => {
                ctx.metrics.duplicates_dropped += 1;
                debug!(client = %self.client_id, msg_id = p.msg_id, "late copy of a completed QoS 2 PUBLISH dropped");
                return;
            }
            MqttQos::ExactlyOnce => match self.qos2_in.get(&p.msg_id) {
                Some(true) => {
                    // The broker has it; the device missed our PUBREC.
                    ctx.out.send(&self.peer, &Packet::PubRec(p.msg_id));
                    return;
                }
                Some(false) => return,
                None => {
                    self.qos2_in.insert(p.msg_id, false);
                    self.qos2_digest.insert(p.msg_id, digest(&p));
                    self.next_token()
                }
            },
        };
        if qos != MqttQos::AtMostOnce {
            self.uplink.insert(
                token,
                Uplink {
                    msg_id: p.msg_id,
                    topic_id,
                    qos,
                    at: ctx.now,
                },
            );
        }
        ctx.metrics.publishes_in += 1;
        ctx.out.command(
            self.key,
            Command::Publish {
                token,
                topic,
                payload: Bytes::copy_from_slice(p.data),
                qos,
                retain: p.retain,
            },
        );
    }

    /// Whether the same QoS 2 PUBLISH completed within the retransmission window.
    fn recently_completed(&mut self, ctx: &Ctx<'_>, msg_id: u16, digest: u64) -> bool {
        let window = ctx.cfg.retry_interval * (ctx.cfg.max_retries + 1);
        while self
            .qos2_done
            .front()
            .is_some_and(|(_, _, at)| ctx.now.duration_since(*at) > window)
        {
            self.qos2_done.pop_front();
        }
        self.qos2_done.iter().any(|&(id, d, _)| id == msg_id && d == digest)
    }

    fn on_subscribe(&mut self, ctx: &mut Ctx<'_>, s: sn_codec::Subscribe<'_>) {
        if self.subs.values().any(|p| p.msg_id == s.msg_id) {
            return; // A retransmission; SUBACK follows.
        }
        let reject = |ctx: &mut Ctx<'_>, peer: &Peer, code| {
            let ack = Packet::SubAck(SubAck {
                qos: QoS::AtMostOnce,
                topic_id: 0,
                msg_id: s.msg_id,
                code,
            });
            ctx.out.send(peer, &ack);
        };
        let (filter, topic_id) = match s.topic {
            TopicFilter::Name(name) => {
                if let Err(why) = topics::check_topic_filter(name) {
                    ctx.metrics.topic_refused += 1;
                    debug!(client = %self.client_id, peer = %self.peer, filter = ?name, %why, "SUBSCRIBE to an invalid filter refused");
                    return reject(ctx, &self.peer, ReturnCode::NotSupported);
                }
                if !self.may_subscribe(ctx, name) {
                    return reject(ctx, &self.peer, ReturnCode::NotSupported);
                }
                if topics::has_wildcards(name) {
                    (name.to_string(), 0)
                } else {
                    match self
                        .topics
                        .assign(name, ctx.cfg.max_topics_per_client, &self.predefined)
                    {
                        Some(id) => (name.to_string(), id),
                        None => return reject(ctx, &self.peer, ReturnCode::Congestion),
                    }
                }
            }
            TopicFilter::Predefined(id) => match self.predefined.name(id) {
                Some(name) if !self.may_subscribe(ctx, name) => {
                    return reject(ctx, &self.peer, ReturnCode::NotSupported)
                }
                Some(name) => (name.to_string(), id),
                None => return reject(ctx, &self.peer, ReturnCode::InvalidTopicId),
            },
            TopicFilter::Short(bytes) => {
                match topics::resolve(TopicRef::Short(bytes), &self.predefined, &self.topics) {
                    Ok(name) if !self.may_subscribe(ctx, &name) => {
                        return reject(ctx, &self.peer, ReturnCode::NotSupported)
                    }
                    Ok(name) => (name.to_string(), u16::from_be_bytes(bytes)),
                    Err(why) => {
                        ctx.metrics.topic_refused += 1;
                        debug!(client = %self.client_id, peer = %self.peer, topic = ?bytes, %why, "SUBSCRIBE to an invalid short topic refused");
                        return reject(ctx, &self.peer, ReturnCode::NotSupported);
                    }
                }
            }
        };
        let token = self.next_token();
        self.subs.insert(
            token,
            PendingSub {
                msg_id: s.msg_id,
                topic_id,
            },
        );
        debug!(client = %self.client_id, %filter, qos = ?s.qos, "SUBSCRIBE");
        let filter = self.grants.mount(&filter);
        ctx.out.command(
            self.key,
            Command::Subscribe {
                token,
                filter,
                qos: mqtt_qos(s.qos),
            },
        );
    }

    /// Whether the device may subscribe to `filter`; counts and logs a refusal.
    fn may_subscribe(&self, ctx: &mut Ctx<'_>, filter: &str) -> bool {
        if self.grants.may_subscribe(filter) {
            return true;
        }
        ctx.metrics.auth_subscribe_denied += 1;
        debug!(client = %self.client_id, peer = %self.peer, filter, "SUBSCRIBE refused: filter not allowed");
        false
    }

    fn on_unsubscribe(&mut self, ctx: &mut Ctx<'_>, u: sn_codec::Unsubscribe<'_>) {
        if self.unsubs.values().any(|&m| m == u.msg_id) {
            return;
        }
        let filter = match u.topic {
            TopicFilter::Name(name) => Some(name.to_string()),
            TopicFilter::Predefined(id) => self.predefined.name(id).map(|n| n.to_string()),
            TopicFilter::Short(bytes) => std::str::from_utf8(&bytes).ok().map(str::to_string),
        };
        let filter = match filter.map(|f| topics::check_topic_filter(&f).map(|()| f)) {
            Some(Err(why)) => {
                ctx.metrics.topic_refused += 1;
                debug!(client = %self.client_id, peer = %self.peer, topic = ?u.topic, %why, "UNSUBSCRIBE from an invalid filter refused");
                None
            }
            Some(Ok(f)) => Some(f),
            None => None,
        };
        match filter {
            Some(filter) => {
                let filter = self.grants.mount(&filter);
                let token = self.next_token();
                self.unsubs.insert(token, u.msg_id);
                ctx.out.command(self.key, Command::Unsubscribe { token, filter });
            }
            // Nothing to unsubscribe from: the client is not subscribed to it either way.
            None => {
                ctx.out.send(&self.peer, &Packet::UnsubAck(u.msg_id));
            }
        }
    }

    fn sleep(&mut self, ctx: &mut Ctx<'_>, secs: u16) -> Flow {
        let requested = Duration::from_secs(u64::from(secs));
        self.sleep_duration = requested.min(ctx.cfg.max_sleep);
        if self.sleep_duration < requested {
            info!(client = %self.client_id, requested = secs, max = ctx.cfg.max_sleep.as_secs(), "sleep duration shortened to the configured maximum");
        }
        self.sleep_since = ctx.now;
        if self.state != SessionState::Asleep {
            ctx.metrics.sleeps += 1;
        }
        self.state = SessionState::Asleep;
        debug!(client = %self.client_id, secs, held = self.queue.len(), "client asleep");
        ctx.out.send(&self.peer, &Packet::Disconnect(None));
        Flow::Continue
    }

    fn wake(&mut self, ctx: &mut Ctx<'_>) {
        ctx.metrics.wakes += 1;
        self.last_heard = ctx.now;
        self.state = SessionState::Awake;
        self.wake_remaining = self.queue.len();
        debug!(client = %self.client_id, held = self.queue.len(), "client awake");
        self.retransmit_inflight(ctx);
        // pump() sends the held messages, then PINGRESP.
    }

    /// A message from the broker for this client.
    pub(crate) fn handle_broker_event(&mut self, ctx: &mut Ctx<'_>, event: BrokerEvent) -> Flow {
        match event {
            BrokerEvent::Connected { session_present } => {
                if self.state == SessionState::Connecting {
                    debug!(client = %self.client_id, session_present, "broker accepted connection");
                    self.become_active(ctx);
                } else if self.reopening {
                    debug!(client = %self.client_id, session_present, "broker connection of a restored sleeping session open again");
                    self.reopening = false;
                    if self.state == SessionState::Awake {
                        // Woken meanwhile: what arrived so far goes out, then PINGRESP.
                        self.wake_remaining = self.queue.len();
                        self.pump(ctx);
                    }
                }
            }
            BrokerEvent::ConnectFailed { reason, refused } => {
                // Logged (rate-limited, at warn) by the engine.
                debug!(client = %self.client_id, %reason, refused, "broker connection failed");
                ctx.metrics.connects_refused += 1;
                if self.state.is_connecting() {
                    // Refused (not authorised, bad credentials): retrying will not help,
                    // so "rejected: not supported"; unreachable: transient, congestion.
                    let code = if refused {
                        ReturnCode::NotSupported
                    } else {
                        ReturnCode::Congestion
                    };
                    ctx.out.send(&self.peer, &Packet::ConnAck(code));
                } else {
                    ctx.out.send(&self.peer, &Packet::Disconnect(None));
                }
                return Flow::End;
            }
            BrokerEvent::Closed { reason } => {
                // Tell the device rather than leave it talking to nobody.
                info!(client = %self.client_id, %reason, "broker connection closed; disconnecting client");
                ctx.metrics.broker_closed += 1;
                ctx.out.send(&self.peer, &Packet::Disconnect(None));
                return Flow::End;
            }
            BrokerEvent::Published { token } => {
                if let Some(u) = self.uplink.remove(&token) {
                    ctx.latency.publish_ack.observe(ctx.now.saturating_duration_since(u.at));
                    match u.qos {
                        MqttQos::ExactlyOnce => {
                            self.qos2_in.insert(u.msg_id, true);
                            ctx.out.send(&self.peer, &Packet::PubRec(u.msg_id));
                        }
                        _ => {
                            let ack = Packet::PubAck(PubAck {
                                topic_id: u.topic_id,
                                msg_id: u.msg_id,
                                code: ReturnCode::Accepted,
                            });
                            ctx.out.send(&self.peer, &ack);
                        }
                    }
                }
            }
            BrokerEvent::Rejected { token, reason } => {
                ctx.metrics.broker_rejected += 1;
                if token == 0 {
                    ctx.metrics.qos0_dropped_by_link(reason);
                }
                if let Some(u) = self.uplink.remove(&token) {
                    self.qos2_in.remove(&u.msg_id);
                    self.qos2_digest.remove(&u.msg_id);
                    let ack = Packet::PubAck(PubAck {
                        topic_id: u.topic_id,
                        msg_id: u.msg_id,
                        code: ReturnCode::Congestion,
                    });
                    ctx.out.send(&self.peer, &ack);
                } else if let Some(s) = self.subs.remove(&token) {
                    let ack = Packet::SubAck(SubAck {
                        qos: QoS::AtMostOnce,
                        topic_id: 0,
                        msg_id: s.msg_id,
                        code: ReturnCode::Congestion,
                    });
                    ctx.out.send(&self.peer, &ack);
                } else {
                    // UNSUBACK has no return code; the device retries on silence.
                    self.unsubs.remove(&token);
                }
            }
            BrokerEvent::SubAck { token, granted } => {
                if let Some(s) = self.subs.remove(&token) {
                    let ack = match granted {
                        Some(q) => SubAck {
                            qos: sn_qos(q),
                            topic_id: s.topic_id,
                            msg_id: s.msg_id,
                            code: ReturnCode::Accepted,
                        },
                        None => SubAck {
                            qos: QoS::AtMostOnce,
                            topic_id: 0,
                            msg_id: s.msg_id,
                            code: ReturnCode::NotSupported,
                        },
                    };
                    ctx.out.send(&self.peer, &Packet::SubAck(ack));
                }
            }
            BrokerEvent::UnsubAck { token } => {
                if let Some(msg_id) = self.unsubs.remove(&token) {
                    ctx.out.send(&self.peer, &Packet::UnsubAck(msg_id));
                }
            }
            BrokerEvent::Message(m) => match self.grants.unmount(&m.topic) {
                Some(t) if self.grants.mountpoint.is_some() => {
                    let topic: Arc<str> = t.into();
                    self.enqueue(ctx, Message { topic, ..m });
                }
                Some(_) => self.enqueue(ctx, m),
                None => {
                    // Not for this device's view (another subscriber's overlap, a broker
                    // bridge): released at the broker, never delivered.
                    ctx.metrics.mountpoint_dropped += 1;
                    debug!(client = %self.client_id, topic = %m.topic, "broker message outside the mountpoint dropped");
                    if m.qos != MqttQos::AtMostOnce {
                        ctx.out.command(self.key, Command::Ack { delivery: m.delivery });
                    }
                }
            },
        }
        self.pump(ctx);
        Flow::Continue
    }

    /// Holds a broker message. QoS 1/2 are always kept (the broker's in-flight window
    /// bounds them, and they are not acknowledged until the device has them); a QoS 0
    /// message that does not fit the bounds pushes out the oldest QoS 0 one.
    fn enqueue(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let size = msg.payload.len() + msg.topic.len();
        if msg.qos == MqttQos::AtMostOnce {
            while self.queue.len() + 1 > ctx.cfg.max_queued_messages
                || self.queued_bytes + size > ctx.cfg.max_queued_bytes
            {
                // The front is protected while something about it is in flight.
                let start = usize::from(self.inflight.is_some());
                let oldest = self
                    .queue
                    .iter()
                    .skip(start)
                    .position(|h| h.msg.qos == MqttQos::AtMostOnce);
                ctx.metrics.qos0_dropped += 1;
                match oldest {
                    Some(i) => {
                        let i = i + start;
                        if let Some(h) = self.queue.remove(i) {
                            self.queued_bytes -= h.msg.payload.len() + h.msg.topic.len();
                        }
                        if i < self.wake_remaining {
                            self.wake_remaining -= 1;
                        }
                        debug!(client = %self.client_id, "buffer full: oldest QoS 0 message dropped");
                    }
                    None => {
                        debug!(client = %self.client_id, "buffer full of QoS 1/2 messages: QoS 0 message dropped");
                        return;
                    }
                }
            }
        }
        self.queued_bytes += size;
        self.queue.push_back(Held { msg, sent: false });
    }

    fn pop_front(&mut self) {
        if let Some(h) = self.queue.pop_front() {
            self.queued_bytes -= h.msg.payload.len() + h.msg.topic.len();
            self.wake_remaining = self.wake_remaining.saturating_sub(1);
        }
    }

    /// Starts the next delivery if nothing is in flight, and ends a wake with PINGRESP
    /// once the messages held at wake time are delivered.
    fn pump(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            if self.inflight.is_some() {
                return;
            }
            match self.state {
                SessionState::Active => {}
                SessionState::Awake if self.wake_remaining > 0 => {}
                // Restored after a restart, its broker connection not open yet: PINGRESP
                // waits for what the broker kept for it.
                SessionState::Awake if self.reopening => return,
                SessionState::Awake if self.qos2_out.owed_pubrel(None).is_some() => {}
                SessionState::Awake => {
                    ctx.out.send(&self.peer, &Packet::PingResp);
                    self.state = SessionState::Asleep;
                    self.sleep_since = ctx.now;
                    debug!(client = %self.client_id, held = self.queue.len(), "client asleep again");
                    return;
                }
                _ => return,
            }
            // A QoS 2 delivery of an earlier session that the device acknowledged with
            // PUBREC is completed first: the device holds its message id until PUBREL.
            if let Some(msg_id) = self.qos2_out.owed_pubrel(None) {
                self.set_inflight(ctx, InflightKind::PubRel { msg_id });
                ctx.out.send(&self.peer, &Packet::PubRel(msg_id));
                return;
            }
            let Some(front) = self.queue.front() else {
                return;
            };
            let topic_name = front.msg.topic.clone();
            match topics::outbound_ref(&topic_name, &self.predefined, &self.topics) {
                Some(topic) => {
                    let qos = front.msg.qos;
                    let again = (qos == MqttQos::ExactlyOnce)
                        .then(|| qos2::digest(&front.msg.topic, &front.msg.payload))
                        .map(|d| (d, self.qos2_out.matching(d)));
                    let msg_id = match again {
                        _ if qos == MqttQos::AtMostOnce => 0,
                        // Sent before, in an earlier session (or gateway): the same id,
                        // with DUP, so the device recognises it.
                        Some((_, Some(msg_id))) => {
                            if let Some(f) = self.queue.front_mut() {
                                f.sent = true;
                            }
                            msg_id
                        }
                        _ => self.next_msg_id(),
                    };
                    if let Some((d, _)) = again {
                        self.qos2_out.sent(msg_id, d);
                    }
                    if !self.send_publish(ctx, topic, msg_id) {
                        self.give_up_front(ctx);
                        continue;
                    }
                    ctx.metrics.publishes_out += 1;
                    if qos == MqttQos::AtMostOnce {
                        self.pop_front();
                        continue;
                    }
                    self.set_inflight(ctx, InflightKind::Publish { msg_id, topic });
                }
                None => {
                    let Some(topic_id) =
                        self.topics
                            .assign(&topic_name, ctx.cfg.max_topics_per_client, &self.predefined)
                    else {
                        debug!(client = %self.client_id, topic = %topic_name, "topic table full: message dropped");
                        self.give_up_front(ctx);
                        continue;
                    };
                    let msg_id = self.next_msg_id();
                    let reg = Packet::Register(Register {
                        topic_id,
                        msg_id,
                        topic_name: &topic_name,
                    });
                    if !ctx.out.send(&self.peer, &reg) {
                        self.topics.remove(topic_id);
                        self.give_up_front(ctx);
                        continue;
                    }
                    self.set_inflight(ctx, InflightKind::Register { msg_id, topic_id });
                }
            }
        }
    }

    fn set_inflight(&mut self, ctx: &Ctx<'_>, kind: InflightKind) {
        self.inflight = Some(Inflight {
            kind,
            sent_at: ctx.now,
            retries: 0,
        });
    }

    fn send_publish(&mut self, ctx: &mut Ctx<'_>, topic: TopicRef, msg_id: u16) -> bool {
        let Some(front) = self.queue.front_mut() else {
            return false;
        };
        let dup = front.sent && front.msg.qos != MqttQos::AtMostOnce;
        front.sent = true;
        let p = Packet::Publish(sn_codec::Publish {
            dup,
            qos: sn_qos(front.msg.qos),
            retain: front.msg.retain,
            topic,
            msg_id,
            data: &front.msg.payload,
        });
        ctx.out.send(&self.peer, &p)
    }

    /// The message at the front cannot be delivered (topic table full, too long,
    /// rejected by the device): drop it, and release it at the broker so it is not
    /// redelivered forever.
    fn give_up_front(&mut self, ctx: &mut Ctx<'_>) {
        if self.queue.front().is_some() {
            ctx.metrics.undeliverable += 1;
        }
        self.ack_front_to_broker(ctx);
    }

    /// Takes the front message off the queue, acknowledging it to the broker (QoS 1/2).
    fn ack_front_to_broker(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(front) = self.queue.front().filter(|f| f.msg.qos != MqttQos::AtMostOnce) {
            ctx.out.command(
                self.key,
                Command::Ack {
                    delivery: front.msg.delivery,
                },
            );
        }
        self.pop_front();
    }

    fn on_regack(&mut self, ctx: &mut Ctx<'_>, a: RegAck) {
        let Some(Inflight {
            kind: InflightKind::Register { msg_id, topic_id },
            ..
        }) = self.inflight
        else {
            return;
        };
        if a.msg_id != msg_id {
            return;
        }
        self.inflight = None;
        if a.code != ReturnCode::Accepted {
            debug!(client = %self.client_id, code = ?a.code, "client refused REGISTER; message dropped");
            self.topics.remove(topic_id);
            self.give_up_front(ctx);
        }
    }

    fn on_puback(&mut self, ctx: &mut Ctx<'_>, a: PubAck) {
        let Some(Inflight {
            kind: InflightKind::Publish { msg_id, topic },
            ..
        }) = self.inflight
        else {
            return;
        };
        if a.msg_id != msg_id {
            return;
        }
        self.inflight = None;
        match a.code {
            ReturnCode::Accepted => self.ack_front_to_broker(ctx),
            ReturnCode::InvalidTopicId => {
                // The device forgot the id (it restarted?): register it again and resend.
                if let TopicRef::Normal(id) = topic {
                    debug!(client = %self.client_id, id, "client does not know topic id; registering again");
                    self.topics.remove(id);
                } else {
                    self.give_up_front(ctx);
                }
            }
            code => {
                debug!(client = %self.client_id, ?code, "client refused PUBLISH; message dropped");
                self.give_up_front(ctx);
            }
        }
    }

    fn on_pubrec(&mut self, ctx: &mut Ctx<'_>, rec_id: u16) {
        match self.inflight.map(|i| i.kind) {
            Some(InflightKind::Publish { msg_id, .. }) if msg_id == rec_id => {
                // The device has the message: now, and only now, the broker may forget it.
                self.qos2_out.released(msg_id);
                self.ack_front_to_broker(ctx);
                self.set_inflight(ctx, InflightKind::PubRel { msg_id });
                ctx.out.send(&self.peer, &Packet::PubRel(msg_id));
            }
            // Our PUBREL was lost and the device repeats PUBREC.
            Some(InflightKind::PubRel { msg_id }) if msg_id == rec_id => {
                ctx.out.send(&self.peer, &Packet::PubRel(msg_id));
            }
            _ => {}
        }
    }

    fn on_pubcomp(&mut self, _ctx: &mut Ctx<'_>, comp_id: u16) {
        if let Some(InflightKind::PubRel { msg_id }) = self.inflight.map(|i| i.kind) {
            if msg_id == comp_id {
                self.inflight = None;
                self.qos2_out.completed(msg_id);
            }
        }
    }

    fn retransmit_inflight(&mut self, ctx: &mut Ctx<'_>) {
        let Some(inflight) = self.inflight else {
            return;
        };
        match inflight.kind {
            InflightKind::Register { msg_id, topic_id } => {
                let Some(name) = self.topics.name(topic_id).cloned() else {
                    self.inflight = None;
                    return;
                };
                let reg = Packet::Register(Register {
                    topic_id,
                    msg_id,
                    topic_name: &name,
                });
                ctx.out.send(&self.peer, &reg);
            }
            InflightKind::Publish { msg_id, topic } => {
                self.send_publish(ctx, topic, msg_id);
            }
            InflightKind::PubRel { msg_id } => {
                ctx.out.send(&self.peer, &Packet::PubRel(msg_id));
            }
        }
        if let Some(i) = self.inflight.as_mut() {
            i.sent_at = ctx.now;
        }
    }

    /// When the session next needs [`Session::handle_timeout`].
    pub(crate) fn poll_timeout(&self, cfg: &EngineConfig) -> Option<Instant> {
        match self.state {
            SessionState::WillTopic | SessionState::WillMsg | SessionState::Connecting => {
                Some(self.last_heard + cfg.connect_timeout)
            }
            SessionState::Asleep => Some(self.sleep_deadline(cfg)),
            SessionState::Active | SessionState::Awake => {
                let retry = self.inflight.map(|i| i.sent_at + cfg.retry_interval);
                let keep_alive = (self.state == SessionState::Active && self.keep_alive > 0)
                    .then(|| self.last_heard + scaled(self.keep_alive, cfg.keep_alive_factor));
                match (retry, keep_alive) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    fn sleep_deadline(&self, cfg: &EngineConfig) -> Instant {
        self.sleep_since + self.sleep_duration.mul_f64(cfg.sleep_factor)
    }

    /// Timers due: handshake timeout, keep-alive, sleep deadline, retransmission.
    pub(crate) fn handle_timeout(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        let now = ctx.now;
        match self.state {
            SessionState::WillTopic | SessionState::WillMsg | SessionState::Connecting => {
                if now >= self.last_heard + ctx.cfg.connect_timeout {
                    info!(client = %self.client_id, state = ?self.state, "connect handshake timed out");
                    return self.end_connecting(ctx);
                }
            }
            SessionState::Asleep => {
                if now >= self.sleep_deadline(ctx.cfg) {
                    return self.lose(ctx, "did not wake within its sleep duration");
                }
            }
            SessionState::Active | SessionState::Awake => {
                if self.state == SessionState::Active
                    && self.keep_alive > 0
                    && now >= self.last_heard + scaled(self.keep_alive, ctx.cfg.keep_alive_factor)
                {
                    return self.lose(ctx, "keep-alive expired");
                }
                if let Some(i) = self.inflight {
                    if now >= i.sent_at + ctx.cfg.retry_interval {
                        if i.retries >= ctx.cfg.max_retries {
                            return self.lose(ctx, "retransmissions exhausted");
                        }
                        ctx.metrics.retransmissions += 1;
                        self.retransmit_inflight(ctx);
                        if let Some(i) = self.inflight.as_mut() {
                            i.retries += 1;
                        }
                    }
                }
            }
        }
        Flow::Continue
    }

    /// The client's link went away: lost (will published), or, before it was ever
    /// accepted, just ended.
    pub(crate) fn lose_now(&mut self, ctx: &mut Ctx<'_>, why: &str) -> Flow {
        if self.state.is_connecting() && !self.resuming {
            return self.end_connecting(ctx);
        }
        self.lose(ctx, why)
    }

    /// The gateway is stopping (see [`super::Gateway::shutdown`]): ends the session
    /// when nothing of it is in flight, or at once with `force`. `publish_will`: the
    /// will goes to the broker before its connection closes.
    pub(crate) fn stop(&mut self, ctx: &mut Ctx<'_>, publish_will: bool, force: bool) -> Flow {
        let will = if publish_will { self.will() } else { None };
        match self.state {
            SessionState::WillTopic | SessionState::WillMsg | SessionState::Connecting => {
                ctx.out.send(&self.peer, &Packet::ConnAck(ReturnCode::Congestion));
                if self.resuming {
                    // The broker connection of the sleeping session being resumed.
                    ctx.out.command(self.key, Command::Disconnect { will });
                } else if self.state == SessionState::Connecting {
                    ctx.out.command(self.key, Command::Disconnect { will: None });
                }
                Flow::End
            }
            SessionState::Asleep => {
                // It cannot hear a DISCONNECT; it finds out when it next wakes.
                ctx.out.command(self.key, Command::Disconnect { will });
                Flow::End
            }
            SessionState::Active | SessionState::Awake => {
                let in_flight = !self.uplink.is_empty()
                    || !self.qos2_in.is_empty()
                    || !self.subs.is_empty()
                    || !self.unsubs.is_empty();
                if in_flight && !force {
                    return Flow::Continue;
                }
                info!(client = %self.client_id, peer = %self.peer, in_flight, "gateway stopping: client disconnected");
                ctx.out.send(&self.peer, &Packet::Disconnect(None));
                ctx.out.command(self.key, Command::Disconnect { will });
                Flow::End
            }
        }
    }

    /// The client is lost: publish its will (the latest one) and close its broker
    /// connection.
    fn lose(&mut self, ctx: &mut Ctx<'_>, why: &str) -> Flow {
        ctx.metrics.lost += 1;
        info!(client = %self.client_id, peer = %self.peer, will = self.will_topic.is_some(), "client lost: {why}");
        ctx.out.command(self.key, Command::Disconnect { will: self.will() });
        Flow::End
    }
}
