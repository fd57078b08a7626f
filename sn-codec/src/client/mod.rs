//! Sans-IO MQTT-SN v1.2 client engine (feature `client`).
//!
//! [`Client`] is the device side of MQTT-SN as a plain state machine: no sockets, no
//! clock, no allocator, no `std`. Like `quinn-proto`'s `Connection`, it is driven from the
//! outside:
//!
//! | you call | when | it does |
//! | --- | --- | --- |
//! | [`Client::handle_datagram`] | a message arrived from the gateway | updates state, queues answers; returns a received PUBLISH as a [`Message`] borrowing your buffer |
//! | [`Client::poll_transmit`] | after every other call, until it returns `None` | encodes the next message to send into your buffer |
//! | [`Client::poll_event`] | after every other call, until it returns `None` | hands out what happened ([`Event`]) |
//! | [`Client::poll_timeout`] | before waiting for input | tells the time (ms) at which [`Client::handle_timeout`] must be called |
//! | [`Client::handle_timeout`] | that time has come | retransmits, sends keep-alive pings, gives up, signals wake-ups |
//! | [`Client::connect`], [`Client::publish`], ... | the application wants something | checks and queues the request, or returns a [`ClientError`] |
//!
//! Time is a `u64` count of milliseconds from any monotonic origin, passed in as `now`.
//!
//! ```
//! use sn_codec::client::{Client, Config, Event};
//! use sn_codec::{QoS, TopicRef};
//!
//! let mut client: Client<'_, 8, 128, 128> = Client::new(Config::new("sensor-42"));
//! let mut out = [0u8; 128];
//! let mut now = 0u64;
//!
//! client.connect(now).expect("disconnected, so it can connect");
//! while let Some(n) = client.poll_transmit(&mut out) {
//!     // radio.send(gateway, &out[..n]);
//!     assert_eq!(&out[..n], b"\x0f\x04\x04\x01\x00\x3csensor-42");
//! }
//!
//! // ... the gateway answers CONNACK (accepted):
//! now += 40;
//! let datagram = [0x03, 0x05, 0x00];
//! if let Ok(Some(msg)) = client.handle_datagram(now, &datagram) {
//!     // A PUBLISH: msg.topic, msg.payload borrow `datagram`.
//!     let _ = (msg.topic, msg.payload);
//! }
//! while let Some(event) = client.poll_event() {
//!     assert_eq!(event, Event::Connected);
//! }
//!
//! client
//!     .publish(now, TopicRef::Short(*b"tp"), b"21.5", QoS::AtMostOnce, false)
//!     .expect("connected");
//! while let Some(n) = client.poll_transmit(&mut out) {
//!     assert_eq!(&out[..n], b"\x0b\x0c\x02tp\x00\x0021.5");
//! }
//!
//! // Sleep until `client.poll_timeout()` (or until a datagram arrives), then:
//! if client.poll_timeout().is_some_and(|t| t <= now) {
//!     client.handle_timeout(now);
//! }
//! ```
//!
//! # Delivery of received messages
//!
//! A PUBLISH from the gateway is returned by the very [`Client::handle_datagram`] call that
//! was given its datagram, as `Ok(Some(Message))`: topic, QoS, flags and a payload slice
//! that borrows the datagram. Nothing is copied and nothing is queued: use it before the
//! buffer is reused. Acknowledgements (PUBACK, PUBREC, PUBCOMP) are queued by the engine
//! and come out of [`Client::poll_transmit`]. A QoS 2 message is handed out once: a
//! retransmitted PUBLISH with the same message id is answered again but not delivered again.
//! All other outcomes are [`Event`]s.
//!
//! # One request at a time
//!
//! Following the specification, at most one message that expects an answer is outstanding
//! (CONNECT, REGISTER, PUBLISH QoS 1/2 and its PUBREL, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
//! WILLTOPICUPD, WILLMSGUPD, DISCONNECT). Operations that would start another return
//! [`ClientError::Busy`]; wait for the outcome [`Event`] and try again. The one exception is
//! the automatic keep-alive PINGREQ, which any operation silently replaces (its answer would
//! prove nothing more than the new request's answer will). [`Client::disconnect`] and
//! [`Client::connect`] (from the sleeping states) abandon whatever was outstanding.
//!
//! The outstanding request is retransmitted every [`Config::t_retry`] ms (PUBLISH and
//! SUBSCRIBE with the DUP flag), at most [`Config::n_retry`] times; when the last attempt
//! is unanswered too, [`Event::GatewayLost`] is reported and the engine is
//! [`State::Disconnected`].
//!
//! # Memory
//!
//! `Client<'a, TOPICS, NAMES, TX>` holds everything inline: a table of `TOPICS` topic
//! registrations whose names share a `NAMES`-byte arena, and a `TX`-byte transmit buffer
//! that keeps the encoded outstanding request (for retransmission) and queued QoS 0 / -1
//! PUBLISH messages. `TX` bounds the longest message the client can send. The strings of
//! the [`Config`] (client id, will, predefined topics) are borrowed for `'a`.

mod buffers;
mod table;
pub mod uart;

use core::fmt;

use crate::{
    Connect, Packet, PubAck, Publish, QoS, RegAck, Register, ReturnCode, Subscribe, TopicFilter, TopicRef, Unsubscribe,
    WillTopic,
};
use buffers::{Ring, TxBuf};
use table::TopicTable;

/// "No deadline".
const NEVER: u64 = u64::MAX;

/// Capacity of the event queue. Every call produces at most three events, so draining
/// [`Client::poll_event`] after each call never loses one.
pub const EVENT_CAPACITY: usize = 4;

/// Capacity of the queue of acknowledgements waiting for [`Client::poll_transmit`]. When it
/// is full, further acknowledgements are dropped (the gateway retransmits).
pub const CONTROL_CAPACITY: usize = 4;

/// How many incoming QoS 2 message ids (PUBREC sent, PUBREL not yet received) are
/// remembered for duplicate detection. The oldest is forgotten when more arrive.
pub const INCOMING_QOS2_CAPACITY: usize = 4;

/// The will the gateway publishes when the client is lost (spec 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    /// Will topic name.
    pub topic: &'a str,
    /// Will message.
    pub message: &'a [u8],
    /// QoS of the will message: 0, 1 or 2.
    pub qos: QoS,
    /// RETAIN flag of the will message.
    pub retain: bool,
}

/// Client configuration. Start from [`Config::new`] and change fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config<'a> {
    /// Client identifier sent in CONNECT and in the PINGREQ that wakes a sleeping client.
    pub client_id: &'a str,
    /// Keep-alive period in seconds (0: no keep-alive). A PINGREQ is sent when nothing was
    /// sent to, or nothing was received from, the gateway for this long.
    pub keep_alive: u16,
    /// CLEAN SESSION flag of CONNECT.
    pub clean_session: bool,
    /// The will, if any: with one, CONNECT sets the WILL flag and the engine answers
    /// WILLTOPICREQ and WILLMSGREQ.
    pub will: Option<Will<'a>>,
    /// Retransmission timer Tretry in milliseconds (spec 6.13 suggests 10 to 15 s).
    pub t_retry: u32,
    /// Retransmission counter Nretry: retransmissions before giving up (spec: 3 to 5).
    pub n_retry: u8,
    /// The gateway is considered lost after this many ADVERTISE periods without an
    /// ADVERTISE from it (spec 6.1's Nadv). 0 disables this supervision.
    pub n_adv: u8,
    /// Predefined topics known to both sides: `(topic id, topic name)`.
    pub predefined: &'a [(u16, &'a str)],
}

impl<'a> Config<'a> {
    /// Defaults: keep-alive 60 s, clean session, no will, Tretry 10 s, Nretry 3, Nadv 3,
    /// no predefined topics.
    pub const fn new(client_id: &'a str) -> Self {
        Config {
            client_id,
            keep_alive: 60,
            clean_session: true,
            will: None,
            t_retry: 10_000,
            n_retry: 3,
            n_adv: 3,
            predefined: &[],
        }
    }
}

/// Where the engine stands with its gateway (spec 6.14, figure 4, seen from the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Not connected (initial state, after DISCONNECT, after the gateway was lost).
    Disconnected,
    /// CONNECT sent, CONNACK awaited (will handshake included).
    Connecting,
    /// Connected.
    Active,
    /// DISCONNECT sent, the gateway's DISCONNECT awaited.
    Disconnecting,
    /// DISCONNECT with a sleep duration sent, the gateway's DISCONNECT awaited.
    GoingToSleep,
    /// Sleeping: the gateway buffers messages for the client.
    Asleep,
    /// Woken up with [`Client::wake`]: buffered messages arrive, PINGRESP ends the visit.
    Awake,
}

/// Where a message from [`Client::poll_transmit_to`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// The gateway (unicast).
    Gateway,
    /// Broadcast with this radius (SEARCHGW).
    Broadcast {
        /// Broadcast radius in hops, as given to [`Client::search_gateway`].
        radius: u8,
    },
}

/// A message encoded by [`Client::poll_transmit_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transmit {
    /// Octets written at the start of the caller's buffer.
    pub len: usize,
    /// Where to send them.
    pub destination: Destination,
}

/// A PUBLISH received from the gateway, borrowing the datagram it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Message<'d> {
    /// The topic. Resolve a normal or predefined id to its name with [`Client::topic_name`].
    pub topic: TopicRef,
    /// The payload.
    pub payload: &'d [u8],
    /// QoS of the delivery.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// DUP flag (a QoS 1 retransmission may be delivered twice, QoS 2 never is).
    pub dup: bool,
    /// Message id (0 for QoS 0).
    pub msg_id: u16,
}

/// Something that happened, from [`Client::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// CONNACK accepted: the client is [`State::Active`].
    Connected,
    /// CONNACK with an error: the client is [`State::Disconnected`].
    ConnectRejected(ReturnCode),
    /// REGACK accepted for [`Client::register`]: the name is now in the topic table.
    Registered {
        /// Message id returned by [`Client::register`].
        msg_id: u16,
        /// The topic id assigned.
        topic_id: u16,
    },
    /// REGACK with an error (on `Congestion`, retry later).
    RegisterRejected {
        /// Message id returned by [`Client::register`].
        msg_id: u16,
        /// The return code.
        code: ReturnCode,
    },
    /// The gateway registered a topic (REGISTER from the gateway, typically before a
    /// PUBLISH matching a wildcard subscription). Already answered and recorded.
    GatewayRegistered {
        /// The topic id; its name is [`Client::topic_name`].
        topic_id: u16,
    },
    /// A PUBLISH QoS 1 was acknowledged (PUBACK) or a QoS 2 completed (PUBCOMP).
    Published {
        /// Message id returned by [`Client::publish`].
        msg_id: u16,
    },
    /// PUBACK with an error: for the outstanding QoS 1/2 PUBLISH, or for a QoS 0 one
    /// (`msg_id` then 0). On `InvalidTopicId`, register the topic again.
    PublishRejected {
        /// Message id of the rejected PUBLISH.
        msg_id: u16,
        /// The topic id field of the PUBACK.
        topic_id: u16,
        /// The return code.
        code: ReturnCode,
    },
    /// SUBACK accepted. For a topic name without wildcards, the name and id are now in the
    /// topic table.
    Subscribed {
        /// Message id returned by [`Client::subscribe`].
        msg_id: u16,
        /// Topic id assigned (0 for a filter with wildcards).
        topic_id: u16,
        /// Granted QoS.
        qos: QoS,
    },
    /// SUBACK with an error.
    SubscribeRejected {
        /// Message id returned by [`Client::subscribe`].
        msg_id: u16,
        /// The return code.
        code: ReturnCode,
    },
    /// UNSUBACK received.
    Unsubscribed {
        /// Message id returned by [`Client::unsubscribe`].
        msg_id: u16,
    },
    /// PINGRESP to a keep-alive or [`Client::ping`] PINGREQ.
    PingResp,
    /// WILLTOPICRESP for [`Client::update_will_topic`]; on `Accepted` the configuration's
    /// will was updated.
    WillTopicUpdated(ReturnCode),
    /// WILLMSGRESP for [`Client::update_will_message`]; on `Accepted` the configuration's
    /// will was updated.
    WillMessageUpdated(ReturnCode),
    /// The client is [`State::Asleep`]: the gateway acknowledged [`Client::sleep`], or
    /// answered the waking PINGREQ with PINGRESP after delivering the buffered messages.
    /// The sleep timer runs: expect [`Event::WakeUpDue`].
    Asleep,
    /// Time to call [`Client::wake`] (or [`Client::connect`]) before the gateway's sleep
    /// timer runs out: emitted `min(Tretry, duration / 2)` before the sleep duration ends.
    WakeUpDue,
    /// The connection ended with a DISCONNECT exchange, or the gateway sent DISCONNECT.
    Disconnected,
    /// The gateway stopped answering (Nretry retransmissions unanswered) or its
    /// ADVERTISEs stopped: the client is [`State::Disconnected`] and knows no gateway.
    GatewayLost,
    /// A gateway made itself known: GWINFO or ADVERTISE during [`Client::search_gateway`],
    /// or the first ADVERTISE heard while no gateway is known. It is now
    /// [`Client::gateway_id`]; its address is the source of the datagram just handled (a
    /// GWINFO sent by another client carries it instead: decode it yourself if you need it).
    GatewayFound {
        /// The gateway id.
        gw_id: u8,
    },
    /// [`Client::search_gateway`] got no GWINFO after Nretry retransmissions.
    GatewayNotFound,
}

/// Why an operation was refused. The engine is unchanged when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientError {
    /// The operation needs [`State::Active`].
    NotConnected,
    /// The operation is not possible in the current [`State`] (e.g. `connect` while
    /// connected, `wake` while not asleep).
    InvalidState,
    /// Another request is outstanding; wait for its [`Event`].
    Busy,
    /// The topic table has no room for the name (entries or name bytes).
    TableFull,
    /// The transmit buffer is momentarily full: drain [`Client::poll_transmit`] first.
    QueueFull,
    /// The message is longer than the transmit buffer `TX` can ever hold.
    TooLong,
    /// The topic cannot be used here (empty name, wildcard in a topic name, reserved id
    /// 0x0000 or 0xFFFF, a normal topic id with QoS -1).
    InvalidTopic,
    /// The QoS cannot be used here (QoS -1 in SUBSCRIBE or a will).
    InvalidQos,
    /// Another argument is out of range (e.g. a sleep duration of 0).
    InvalidArgument,
}

impl ClientError {
    fn from_encode(e: crate::Error) -> Self {
        match e {
            crate::Error::BufferTooSmall => ClientError::QueueFull,
            crate::Error::TooLong => ClientError::TooLong,
            crate::Error::InvalidQos => ClientError::InvalidQos,
            _ => ClientError::InvalidArgument,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientError::NotConnected => "not connected",
            ClientError::InvalidState => "not possible in the current state",
            ClientError::Busy => "another request is outstanding",
            ClientError::TableFull => "topic table full",
            ClientError::QueueFull => "transmit buffer full; drain poll_transmit",
            ClientError::TooLong => "message longer than the transmit buffer",
            ClientError::InvalidTopic => "topic not usable here",
            ClientError::InvalidQos => "QoS not usable here",
            ClientError::InvalidArgument => "argument out of range",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ClientError {}

/// The outstanding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request<'a> {
    Idle,
    Connect {
        clean: bool,
    },
    Register {
        msg_id: u16,
    },
    Publish {
        msg_id: u16,
        qos: QoS,
    },
    PubRel {
        msg_id: u16,
    },
    Subscribe {
        msg_id: u16,
    },
    Unsubscribe {
        msg_id: u16,
    },
    /// Keep-alive or [`Client::ping`] PINGREQ.
    Ping,
    /// PINGREQ with the client id, waking a sleeping client.
    WakePing,
    WillTopicUpd(Option<WillTopic<'a>>),
    WillMsgUpd(&'a [u8]),
    Disconnect,
    Sleep {
        duration: u16,
    },
}

/// A message answering the gateway, encoded only when polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    PubAck {
        topic_id: u16,
        msg_id: u16,
        code: ReturnCode,
    },
    PubRec(u16),
    PubComp(u16),
    RegAck {
        topic_id: u16,
        msg_id: u16,
        code: ReturnCode,
    },
    PingResp,
    WillTopic,
    WillMsg,
}

/// Gateway discovery in progress.
#[derive(Debug, Clone, Copy)]
struct Search {
    active: bool,
    /// The SEARCHGW went out at least once (or another client's did: spec 6.1).
    sent: bool,
    /// A SEARCHGW waits for `poll_transmit`.
    due: bool,
    radius: u8,
    retries: u8,
    deadline: u64,
    interval: u64,
}

impl Search {
    const IDLE: Search = Search {
        active: false,
        sent: false,
        due: false,
        radius: 0,
        retries: 0,
        deadline: NEVER,
        interval: 0,
    };
}

/// The MQTT-SN client engine. See the [module documentation](self).
///
/// - `TOPICS`: how many topic registrations (name <-> id) are remembered,
/// - `NAMES`: bytes shared by the names of those registrations,
/// - `TX`: bytes of the transmit buffer, i.e. the longest message the client sends (a
///   PUBLISH needs 7 octets plus its payload) plus room for queued QoS 0 / -1 PUBLISHes.
///
/// All three must be at most 65535.
#[derive(Debug, Clone)]
pub struct Client<'a, const TOPICS: usize = 8, const NAMES: usize = 128, const TX: usize = 128> {
    config: Config<'a>,
    state: State,
    req: Request<'a>,
    req_deadline: u64,
    req_retries: u8,
    req_due: bool,
    tx: TxBuf<TX>,
    control: Ring<Control, CONTROL_CAPACITY>,
    events: Ring<Event, EVENT_CAPACITY>,
    topics: TopicTable<TOPICS, NAMES>,
    qos2_in: [u16; INCOMING_QOS2_CAPACITY],
    qos2_next: u8,
    next_msg_id: u16,
    last_sent: u64,
    last_recv: u64,
    sleep_duration: u16,
    wake_due: u64,
    gateway: Option<u8>,
    adv_deadline: u64,
    search: Search,
}

impl<'a, const TOPICS: usize, const NAMES: usize, const TX: usize> Client<'a, TOPICS, NAMES, TX> {
    /// A disconnected client.
    pub const fn new(config: Config<'a>) -> Self {
        const {
            assert!(
                TOPICS <= u16::MAX as usize && NAMES <= u16::MAX as usize,
                "TOPICS and NAMES must be at most 65535"
            );
            assert!(TX <= u16::MAX as usize, "TX must be at most 65535");
        }
        Client {
            config,
            state: State::Disconnected,
            req: Request::Idle,
            req_deadline: NEVER,
            req_retries: 0,
            req_due: false,
            tx: TxBuf::new(),
            control: Ring::new(),
            events: Ring::new(),
            topics: TopicTable::new(),
            qos2_in: [0; INCOMING_QOS2_CAPACITY],
            qos2_next: 0,
            next_msg_id: 1,
            last_sent: 0,
            last_recv: 0,
            sleep_duration: 0,
            wake_due: NEVER,
            gateway: None,
            adv_deadline: NEVER,
            search: Search::IDLE,
        }
    }

    // ----------------------------------------------------------------------------------
    // Accessors
    // ----------------------------------------------------------------------------------

    /// The configuration (the will reflects accepted will updates).
    pub fn config(&self) -> &Config<'a> {
        &self.config
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a request is outstanding, so that operations needing the request slot
    /// would return [`ClientError::Busy`]. An automatic keep-alive PINGREQ does not count.
    pub fn is_busy(&self) -> bool {
        !matches!(self.req, Request::Idle | Request::Ping)
    }

    /// Id of the gateway learnt from GWINFO or ADVERTISE, if any.
    pub fn gateway_id(&self) -> Option<u8> {
        self.gateway
    }

    /// The message id the next REGISTER, PUBLISH QoS 1/2, SUBSCRIBE or UNSUBSCRIBE will use.
    pub fn next_msg_id(&self) -> u16 {
        self.next_msg_id
    }

    /// Sets the next message id (0 is taken as 1), e.g. to continue a sequence saved before
    /// a reboot with `clean_session: false`.
    pub fn set_next_msg_id(&mut self, msg_id: u16) {
        self.next_msg_id = msg_id.max(1);
    }

    /// The topic id registered for `name` (REGACK, SUBACK or the gateway's REGISTER).
    pub fn topic_id(&self, name: &str) -> Option<u16> {
        self.topics.id_of(name)
    }

    /// How to address `name` in [`Client::publish`]: a registered normal id, else a
    /// predefined id of the configuration, else a short topic name if `name` has two bytes.
    pub fn topic(&self, name: &str) -> Option<TopicRef> {
        if let Some(id) = self.topics.id_of(name) {
            return Some(TopicRef::Normal(id));
        }
        if let Some(&(id, _)) = self.config.predefined.iter().find(|(_, n)| *n == name) {
            return Some(TopicRef::Predefined(id));
        }
        match *name.as_bytes() {
            [a, b] => Some(TopicRef::Short([a, b])),
            _ => None,
        }
    }

    /// The name of a topic: registered (normal), from the configuration (predefined) or the
    /// short name itself (if valid UTF-8).
    pub fn topic_name<'s>(&'s self, topic: &'s TopicRef) -> Option<&'s str> {
        match topic {
            TopicRef::Normal(id) => self.topics.name_of(*id),
            TopicRef::Predefined(id) => self.config.predefined.iter().find(|(p, _)| p == id).map(|&(_, n)| n),
            TopicRef::Short(s) => core::str::from_utf8(s).ok(),
        }
    }

    /// Number of registrations in the topic table, and bytes of the name arena used.
    pub fn topic_table_usage(&self) -> (usize, usize) {
        (self.topics.len(), self.topics.arena_used())
    }

    /// Forgets the registration of a normal topic id (e.g. after
    /// [`Event::PublishRejected`] with `InvalidTopicId`). Returns whether there was one.
    pub fn forget_topic(&mut self, topic_id: u16) -> bool {
        self.topics.remove_id(topic_id)
    }

    // ----------------------------------------------------------------------------------
    // Output
    // ----------------------------------------------------------------------------------

    /// Encodes the next message to send to the gateway into `buf` and returns its length.
    ///
    /// Call until it returns `None` after every other call. `buf` should be at least `TX`
    /// octets and hold the will message plus 4; a message that does not fit is dropped.
    /// The one broadcast message, SEARCHGW, also comes out here: use
    /// [`Client::poll_transmit_to`] to tell it apart.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.poll_transmit_to(buf).map(|t| t.len)
    }

    /// Like [`Client::poll_transmit`], also telling whether the message goes to the gateway
    /// or is a broadcast.
    pub fn poll_transmit_to(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let to_gateway = |len| {
            Some(Transmit {
                len,
                destination: Destination::Gateway,
            })
        };
        while let Some(c) = self.control.pop() {
            if let Ok(n) = self.control_packet(c).encode(buf) {
                return to_gateway(n);
            }
        }
        if let Some(n) = self.tx.pop(buf) {
            return to_gateway(n);
        }
        if self.req_due {
            self.req_due = false;
            let req = self.tx.request();
            if let Some(dst) = buf.get_mut(..req.len()) {
                if !req.is_empty() {
                    dst.copy_from_slice(req);
                    return to_gateway(req.len());
                }
            }
        }
        if self.search.due {
            self.search.due = false;
            let radius = self.search.radius;
            if let Ok(len) = (Packet::SearchGw { radius }).encode(buf) {
                return Some(Transmit {
                    len,
                    destination: Destination::Broadcast { radius },
                });
            }
        }
        None
    }

    /// Whether [`Client::poll_transmit`] has something to send.
    pub fn has_transmit(&self) -> bool {
        self.control.len() > 0 || self.tx.has_queued() || self.req_due || self.search.due
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop()
    }

    /// When [`Client::handle_timeout`] must be called next (ms), or `None` if no timer runs.
    /// May be in the past: call it right away then.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = NEVER;
        if self.req != Request::Idle {
            t = t.min(self.req_deadline);
        } else if let Some(p) = self.ping_due() {
            t = t.min(p);
        }
        if self.state == State::Asleep {
            t = t.min(self.wake_due);
        }
        t = t.min(self.adv_deadline);
        if self.search.active {
            t = t.min(self.search.deadline);
        }
        (t != NEVER).then_some(t)
    }

    fn control_packet(&self, c: Control) -> Packet<'a> {
        match c {
            Control::PubAck { topic_id, msg_id, code } => Packet::PubAck(PubAck { topic_id, msg_id, code }),
            Control::PubRec(id) => Packet::PubRec(id),
            Control::PubComp(id) => Packet::PubComp(id),
            Control::RegAck { topic_id, msg_id, code } => Packet::RegAck(RegAck { topic_id, msg_id, code }),
            Control::PingResp => Packet::PingResp,
            Control::WillTopic => Packet::WillTopic(self.config.will.map(|w| WillTopic {
                qos: w.qos,
                retain: w.retain,
                topic: w.topic,
            })),
            Control::WillMsg => Packet::WillMsg(self.config.will.map_or(&[][..], |w| w.message)),
        }
    }

    // ----------------------------------------------------------------------------------
    // Timers
    // ----------------------------------------------------------------------------------

    fn ping_due(&self) -> Option<u64> {
        if self.state != State::Active || self.config.keep_alive == 0 {
            return None;
        }
        let period = u64::from(self.config.keep_alive) * 1000;
        Some(self.last_sent.min(self.last_recv).saturating_add(period))
    }

    /// Tretry in ms, at least 1 so that a retransmission is never due at the very instant
    /// it was scheduled.
    fn t_retry(&self) -> u64 {
        u64::from(self.config.t_retry).max(1)
    }

    /// Runs the timers that are due at `now`: retransmission (or giving up), keep-alive
    /// PINGREQ, the wake-up signal, ADVERTISE supervision and SEARCHGW retransmission.
    pub fn handle_timeout(&mut self, now: u64) {
        // Retransmission of the outstanding request.
        if self.req != Request::Idle && now >= self.req_deadline {
            if self.req_retries < self.config.n_retry {
                self.req_retries += 1;
                if matches!(self.req, Request::Publish { .. } | Request::Subscribe { .. }) {
                    self.tx.set_request_dup();
                }
                self.req_due = true;
                self.req_deadline = now.saturating_add(self.t_retry());
                self.last_sent = now;
            } else {
                self.gateway_lost();
            }
        }
        // Keep-alive.
        if self.req == Request::Idle && self.ping_due().is_some_and(|t| now >= t) {
            let _ = self.start_request(now, Request::Ping, &Packet::PingReq(None));
        }
        // Sleep timer.
        if self.state == State::Asleep && now >= self.wake_due {
            self.wake_due = NEVER;
            self.events.push_overwrite(Event::WakeUpDue);
        }
        // ADVERTISE supervision.
        if now >= self.adv_deadline {
            self.adv_deadline = NEVER;
            if self.gateway.is_some() {
                self.gateway_lost();
            }
        }
        // Gateway search.
        if self.search.active && now >= self.search.deadline {
            let s = &mut self.search;
            if !s.sent {
                s.sent = true;
                s.due = true;
                s.deadline = now.saturating_add(s.interval);
            } else if s.retries < self.config.n_retry {
                s.retries += 1;
                s.due = true;
                s.interval = s.interval.saturating_mul(2);
                s.deadline = now.saturating_add(s.interval);
            } else {
                *s = Search::IDLE;
                self.events.push_overwrite(Event::GatewayNotFound);
            }
        }
    }

    fn finish_request(&mut self) {
        self.req = Request::Idle;
        self.req_due = false;
        self.req_retries = 0;
        self.req_deadline = NEVER;
        self.tx.clear_request();
    }

    fn gateway_lost(&mut self) {
        self.finish_request();
        self.control.clear();
        self.state = State::Disconnected;
        self.gateway = None;
        self.adv_deadline = NEVER;
        self.wake_due = NEVER;
        self.events.push_overwrite(Event::GatewayLost);
    }

    fn disconnected(&mut self) {
        self.finish_request();
        self.state = State::Disconnected;
        self.wake_due = NEVER;
        self.events.push_overwrite(Event::Disconnected);
    }

    fn fall_asleep(&mut self, now: u64) {
        self.state = State::Asleep;
        let duration = u64::from(self.sleep_duration) * 1000;
        let margin = self.t_retry().min(duration / 2);
        self.wake_due = now.saturating_add(duration - margin);
        // The radio is off while asleep: ADVERTISEs are not expected to be heard.
        self.adv_deadline = NEVER;
        self.events.push_overwrite(Event::Asleep);
    }

    // ----------------------------------------------------------------------------------
    // Requests
    // ----------------------------------------------------------------------------------

    fn ensure_slot(&self) -> Result<(), ClientError> {
        if self.is_busy() {
            Err(ClientError::Busy)
        } else {
            Ok(())
        }
    }

    fn ensure_active(&self) -> Result<(), ClientError> {
        if self.state == State::Active {
            Ok(())
        } else {
            Err(ClientError::NotConnected)
        }
    }

    /// Makes `pkt` the outstanding request, replacing any previous one.
    fn start_request(&mut self, now: u64, req: Request<'a>, pkt: &Packet<'_>) -> Result<(), ClientError> {
        if let Err(e) = self.tx.set_request(pkt) {
            if self.tx.request().is_empty() {
                self.req = Request::Idle;
                self.req_due = false;
                self.req_deadline = NEVER;
            }
            return Err(e);
        }
        self.req = req;
        self.req_retries = 0;
        self.req_due = true;
        self.req_deadline = now.saturating_add(self.t_retry());
        self.last_sent = now;
        Ok(())
    }

    fn take_msg_id(&mut self) -> u16 {
        let id = self.next_msg_id;
        self.next_msg_id = id.checked_add(1).unwrap_or(1);
        id
    }

    fn check_will(&self) -> Result<(), ClientError> {
        match self.config.will {
            Some(w) if w.qos == QoS::MinusOne => Err(ClientError::InvalidQos),
            _ => Ok(()),
        }
    }

    /// Starts connecting (CONNECT; the will handshake follows if a will is configured).
    ///
    /// From [`State::Disconnected`] this opens a connection with the configured flags. From
    /// [`State::Asleep`] or [`State::Awake`] it returns to [`State::Active`] (spec 6.14):
    /// CONNECT then carries neither the WILL nor the CLEAN SESSION flag. Outcome:
    /// [`Event::Connected`] or [`Event::ConnectRejected`].
    pub fn connect(&mut self, now: u64) -> Result<(), ClientError> {
        let (will, clean) = match self.state {
            State::Disconnected => {
                self.check_will()?;
                (self.config.will.is_some(), self.config.clean_session)
            }
            State::Asleep | State::Awake => (false, false),
            _ => return Err(ClientError::InvalidState),
        };
        let pkt = Packet::Connect(Connect {
            will,
            clean_session: clean,
            duration: self.config.keep_alive,
            client_id: self.config.client_id,
        });
        self.start_request(now, Request::Connect { clean }, &pkt)?;
        self.state = State::Connecting;
        self.wake_due = NEVER;
        Ok(())
    }

    /// Registers a topic name (REGISTER) and returns the message id. Outcome:
    /// [`Event::Registered`] (the mapping is then in the topic table) or
    /// [`Event::RegisterRejected`].
    pub fn register(&mut self, now: u64, topic_name: &str) -> Result<u16, ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        if topic_name.is_empty() || topic_name.contains(['#', '+']) {
            return Err(ClientError::InvalidTopic);
        }
        if !self.topics.can_insert(topic_name) {
            return Err(ClientError::TableFull);
        }
        let msg_id = self.next_msg_id;
        let pkt = Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name,
        });
        self.start_request(now, Request::Register { msg_id }, &pkt)?;
        self.take_msg_id();
        Ok(msg_id)
    }

    /// Publishes `payload` and returns the message id (0 for QoS 0 and -1).
    ///
    /// - QoS -1 needs no connection, and only a predefined id or a short topic name,
    /// - QoS 0 needs [`State::Active`]; the message is queued (it does not occupy the
    ///   request slot),
    /// - QoS 1 and 2 need [`State::Active`] and a free request slot; outcome:
    ///   [`Event::Published`] or [`Event::PublishRejected`].
    pub fn publish(
        &mut self,
        now: u64,
        topic: TopicRef,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> Result<u16, ClientError> {
        if matches!(topic, TopicRef::Normal(0 | 0xFFFF)) {
            return Err(ClientError::InvalidTopic);
        }
        let mut publish = Publish {
            dup: false,
            qos,
            retain,
            topic,
            msg_id: 0,
            data: payload,
        };
        match qos {
            QoS::MinusOne => {
                if matches!(topic, TopicRef::Normal(_)) {
                    return Err(ClientError::InvalidTopic);
                }
                self.tx.push(&Packet::Publish(publish))?;
                Ok(0)
            }
            QoS::AtMostOnce => {
                self.ensure_active()?;
                self.tx.push(&Packet::Publish(publish))?;
                self.last_sent = now;
                Ok(0)
            }
            QoS::AtLeastOnce | QoS::ExactlyOnce => {
                self.ensure_active()?;
                self.ensure_slot()?;
                let msg_id = self.next_msg_id;
                publish.msg_id = msg_id;
                self.start_request(now, Request::Publish { msg_id, qos }, &Packet::Publish(publish))?;
                self.take_msg_id();
                Ok(msg_id)
            }
        }
    }

    fn check_filter(filter: &TopicFilter<'_>) -> Result<(), ClientError> {
        match filter {
            TopicFilter::Name("") | TopicFilter::Predefined(0 | 0xFFFF) => Err(ClientError::InvalidTopic),
            _ => Ok(()),
        }
    }

    /// Subscribes (SUBSCRIBE) and returns the message id. Outcome: [`Event::Subscribed`]
    /// or [`Event::SubscribeRejected`].
    ///
    /// For a topic name without wildcards the gateway assigns an id that is recorded in
    /// the topic table, which therefore needs room for the name ([`ClientError::TableFull`]).
    pub fn subscribe(&mut self, now: u64, filter: TopicFilter<'_>, qos: QoS) -> Result<u16, ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        Self::check_filter(&filter)?;
        if qos == QoS::MinusOne {
            return Err(ClientError::InvalidQos);
        }
        if let TopicFilter::Name(name) = filter {
            if !is_wildcard(name) && !self.topics.can_insert(name) {
                return Err(ClientError::TableFull);
            }
        }
        let msg_id = self.next_msg_id;
        let pkt = Packet::Subscribe(Subscribe {
            dup: false,
            qos,
            msg_id,
            topic: filter,
        });
        self.start_request(now, Request::Subscribe { msg_id }, &pkt)?;
        self.take_msg_id();
        Ok(msg_id)
    }

    /// Unsubscribes (UNSUBSCRIBE) and returns the message id. Outcome:
    /// [`Event::Unsubscribed`]. The topic table keeps the registration.
    pub fn unsubscribe(&mut self, now: u64, filter: TopicFilter<'_>) -> Result<u16, ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        Self::check_filter(&filter)?;
        let msg_id = self.next_msg_id;
        let pkt = Packet::Unsubscribe(Unsubscribe { msg_id, topic: filter });
        self.start_request(now, Request::Unsubscribe { msg_id }, &pkt)?;
        self.take_msg_id();
        Ok(msg_id)
    }

    /// Sends a PINGREQ now (keep-alive pings are automatic; this is for checking the
    /// gateway on demand). Outcome: [`Event::PingResp`], or [`Event::GatewayLost`].
    pub fn ping(&mut self, now: u64) -> Result<(), ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        self.start_request(now, Request::Ping, &Packet::PingReq(None))
    }

    /// Changes the will topic, QoS and RETAIN flag (WILLTOPICUPD); `None` deletes the will.
    /// Outcome: [`Event::WillTopicUpdated`]; when accepted, [`Client::config`] shows it.
    pub fn update_will_topic(&mut self, now: u64, will: Option<WillTopic<'a>>) -> Result<(), ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        if let Some(w) = will {
            if w.qos == QoS::MinusOne {
                return Err(ClientError::InvalidQos);
            }
            if w.topic.is_empty() {
                return Err(ClientError::InvalidTopic);
            }
        }
        self.start_request(now, Request::WillTopicUpd(will), &Packet::WillTopicUpd(will))
    }

    /// Changes the will message (WILLMSGUPD). Outcome: [`Event::WillMessageUpdated`].
    pub fn update_will_message(&mut self, now: u64, message: &'a [u8]) -> Result<(), ClientError> {
        self.ensure_active()?;
        self.ensure_slot()?;
        self.start_request(now, Request::WillMsgUpd(message), &Packet::WillMsgUpd(message))
    }

    /// Disconnects (DISCONNECT), abandoning any outstanding request. Outcome:
    /// [`Event::Disconnected`] when the gateway answers (or [`Event::GatewayLost`]).
    pub fn disconnect(&mut self, now: u64) -> Result<(), ClientError> {
        if self.state == State::Disconnected {
            return Err(ClientError::InvalidState);
        }
        self.start_request(now, Request::Disconnect, &Packet::Disconnect(None))?;
        self.state = State::Disconnecting;
        self.wake_due = NEVER;
        Ok(())
    }

    /// Goes to sleep for `duration` seconds (DISCONNECT with a duration, spec 6.14), from
    /// [`State::Active`] or [`State::Awake`]. Outcome: [`Event::Asleep`], then after a
    /// while [`Event::WakeUpDue`].
    pub fn sleep(&mut self, now: u64, duration: u16) -> Result<(), ClientError> {
        match self.state {
            State::Active => self.ensure_slot()?,
            // The waking PINGREQ may still be outstanding: the new DISCONNECT replaces it.
            State::Awake => {}
            _ => return Err(ClientError::NotConnected),
        }
        if duration == 0 {
            return Err(ClientError::InvalidArgument);
        }
        self.start_request(now, Request::Sleep { duration }, &Packet::Disconnect(Some(duration)))?;
        self.state = State::GoingToSleep;
        Ok(())
    }

    /// Wakes up from [`State::Asleep`] (PINGREQ with the client id): the gateway sends the
    /// messages it buffered (returned by [`Client::handle_datagram`]) and then PINGRESP,
    /// upon which the client is asleep again ([`Event::Asleep`]) with the same duration.
    /// To stay awake, call [`Client::connect`] instead.
    pub fn wake(&mut self, now: u64) -> Result<(), ClientError> {
        if self.state != State::Asleep {
            return Err(ClientError::InvalidState);
        }
        let id = self.config.client_id;
        let pkt = Packet::PingReq((!id.is_empty()).then_some(id));
        self.start_request(now, Request::WakePing, &pkt)?;
        self.state = State::Awake;
        self.wake_due = NEVER;
        Ok(())
    }

    /// Looks for gateways: broadcasts SEARCHGW with `radius` after `delay_ms` (spec 6.1
    /// asks for a random delay, so that clients that start together do not all search at
    /// once: pass one in), then retransmits it with exponential back-off starting at Tretry,
    /// Nretry times. Hearing another client's SEARCHGW before sending counts as sending.
    /// Outcome: [`Event::GatewayFound`] or [`Event::GatewayNotFound`].
    pub fn search_gateway(&mut self, now: u64, radius: u8, delay_ms: u32) -> Result<(), ClientError> {
        (Packet::SearchGw { radius })
            .encode(&mut [0u8; 3])
            .map_err(|_| ClientError::InvalidArgument)?;
        self.search = Search {
            active: true,
            sent: false,
            due: false,
            radius,
            retries: 0,
            deadline: now.saturating_add(u64::from(delay_ms)),
            interval: self.t_retry(),
        };
        if delay_ms == 0 {
            self.handle_timeout(now);
        }
        Ok(())
    }

    /// Stops a gateway search.
    pub fn cancel_search(&mut self) {
        self.search = Search::IDLE;
    }

    // ----------------------------------------------------------------------------------
    // Input
    // ----------------------------------------------------------------------------------

    /// Processes one MQTT-SN message received from the gateway (or broadcast by anyone).
    ///
    /// Returns the message of a PUBLISH to hand to the application (see the
    /// [module documentation](self)), `Ok(None)` for everything else (including messages
    /// that do not fit the current state, which are ignored), or the decoding error of a
    /// malformed datagram (the engine is then unchanged). Never panics.
    pub fn handle_datagram<'d>(&mut self, now: u64, datagram: &'d [u8]) -> Result<Option<Message<'d>>, crate::Error> {
        let pkt = Packet::decode(datagram)?;
        if !matches!(pkt, Packet::Advertise(_) | Packet::SearchGw { .. } | Packet::GwInfo(_)) {
            self.last_recv = now;
        }
        match pkt {
            Packet::Advertise(a) => self.on_gateway_seen(now, a.gw_id, Some(a.duration)),
            Packet::GwInfo(g) => self.on_gateway_seen(now, g.gw_id, None),
            Packet::SearchGw { .. } => {
                if self.search.active && !self.search.sent {
                    self.search.sent = true;
                    self.search.deadline = now.saturating_add(self.search.interval);
                }
            }
            Packet::ConnAck(code) => self.on_connack(code),
            Packet::WillTopicReq => self.on_will_request(now, Control::WillTopic),
            Packet::WillMsgReq => self.on_will_request(now, Control::WillMsg),
            Packet::Register(r) => self.on_register(now, r),
            Packet::RegAck(a) => self.on_regack(a),
            Packet::Publish(p) => return Ok(self.on_publish(now, p)),
            Packet::PubAck(a) => self.on_puback(a),
            Packet::PubRec(id) => self.on_pubrec(now, id),
            Packet::PubComp(id) => {
                if self.req == (Request::PubRel { msg_id: id }) {
                    self.finish_request();
                    self.events.push_overwrite(Event::Published { msg_id: id });
                }
            }
            Packet::PubRel(id) => {
                if self.is_connected() {
                    if let Some(slot) = self.qos2_in.iter_mut().find(|m| **m == id) {
                        *slot = 0;
                    }
                    self.answer(now, Control::PubComp(id));
                }
            }
            Packet::SubAck(s) => {
                if self.req == (Request::Subscribe { msg_id: s.msg_id }) {
                    if s.code == ReturnCode::Accepted {
                        if let Ok(Packet::Subscribe(Subscribe {
                            topic: TopicFilter::Name(name),
                            ..
                        })) = Packet::decode(self.tx.request())
                        {
                            if !is_wildcard(name) && s.topic_id != 0 && s.topic_id != 0xFFFF {
                                let _ = self.topics.insert(s.topic_id, name);
                            }
                        }
                        self.events.push_overwrite(Event::Subscribed {
                            msg_id: s.msg_id,
                            topic_id: s.topic_id,
                            qos: s.qos,
                        });
                    } else {
                        self.events.push_overwrite(Event::SubscribeRejected {
                            msg_id: s.msg_id,
                            code: s.code,
                        });
                    }
                    self.finish_request();
                }
            }
            Packet::UnsubAck(id) => {
                if self.req == (Request::Unsubscribe { msg_id: id }) {
                    self.finish_request();
                    self.events.push_overwrite(Event::Unsubscribed { msg_id: id });
                }
            }
            Packet::PingReq(_) => {
                if self.is_connected() {
                    self.answer(now, Control::PingResp);
                }
            }
            Packet::PingResp => match self.req {
                Request::Ping => {
                    self.finish_request();
                    self.events.push_overwrite(Event::PingResp);
                }
                Request::WakePing => {
                    self.finish_request();
                    self.fall_asleep(now);
                }
                _ => {}
            },
            Packet::Disconnect(_) => {
                if let Request::Sleep { duration } = self.req {
                    self.finish_request();
                    self.sleep_duration = duration;
                    self.fall_asleep(now);
                } else if self.state != State::Disconnected {
                    self.disconnected();
                }
            }
            Packet::WillTopicResp(code) => {
                if let Request::WillTopicUpd(w) = self.req {
                    self.finish_request();
                    if code == ReturnCode::Accepted {
                        self.config.will = w.map(|w| Will {
                            topic: w.topic,
                            message: self.config.will.map_or(&[][..], |old| old.message),
                            qos: w.qos,
                            retain: w.retain,
                        });
                    }
                    self.events.push_overwrite(Event::WillTopicUpdated(code));
                }
            }
            Packet::WillMsgResp(code) => {
                if let Request::WillMsgUpd(m) = self.req {
                    self.finish_request();
                    if code == ReturnCode::Accepted {
                        if let Some(w) = self.config.will.as_mut() {
                            w.message = m;
                        }
                    }
                    self.events.push_overwrite(Event::WillMessageUpdated(code));
                }
            }
            // Messages a gateway does not send to a client.
            Packet::Connect(_)
            | Packet::WillTopic(_)
            | Packet::WillMsg(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::WillTopicUpd(_)
            | Packet::WillMsgUpd(_)
            | Packet::Encapsulated(_) => {}
        }
        Ok(None)
    }

    /// Whether the gateway holds a session for the client (it acknowledges and delivers).
    fn is_connected(&self) -> bool {
        matches!(
            self.state,
            State::Active | State::Disconnecting | State::GoingToSleep | State::Asleep | State::Awake
        )
    }

    fn answer(&mut self, now: u64, c: Control) {
        if self.control.push(c) {
            self.last_sent = now;
        }
    }

    fn on_gateway_seen(&mut self, now: u64, gw_id: u8, advertise: Option<u16>) {
        // A search asks for a gateway: its answer replaces the one known. Otherwise only a
        // client that knows none adopts the first one it hears of.
        let adopt = self.gateway.is_none() || self.search.active;
        let report = adopt;
        if self.search.active {
            self.search = Search::IDLE;
        }
        if adopt {
            self.gateway = Some(gw_id);
            self.adv_deadline = NEVER;
        }
        if report {
            self.events.push_overwrite(Event::GatewayFound { gw_id });
        }
        if let Some(duration) = advertise {
            let n_adv = u64::from(self.config.n_adv);
            if self.gateway == Some(gw_id) && self.state != State::Asleep && n_adv > 0 {
                let period = u64::from(duration) * 1000;
                self.adv_deadline = now.saturating_add(period.saturating_mul(n_adv));
            }
        }
    }

    fn on_connack(&mut self, code: ReturnCode) {
        let Request::Connect { clean } = self.req else {
            return;
        };
        if self.state != State::Connecting {
            return;
        }
        self.finish_request();
        if code == ReturnCode::Accepted {
            self.state = State::Active;
            if clean {
                self.topics.clear();
                self.qos2_in = [0; INCOMING_QOS2_CAPACITY];
            }
            self.events.push_overwrite(Event::Connected);
        } else {
            self.state = State::Disconnected;
            self.events.push_overwrite(Event::ConnectRejected(code));
        }
    }

    fn on_will_request(&mut self, now: u64, c: Control) {
        if self.state == State::Connecting {
            self.answer(now, c);
            // The gateway is alive and working on our CONNECT: give it a full Tretry.
            self.req_deadline = now.saturating_add(self.t_retry());
        }
    }

    fn on_register(&mut self, now: u64, r: Register<'_>) {
        if !self.is_connected() {
            return;
        }
        let code = if r.topic_id == 0 || r.topic_id == 0xFFFF || r.topic_name.is_empty() {
            ReturnCode::InvalidTopicId
        } else {
            match self.topics.insert(r.topic_id, r.topic_name) {
                Ok(changed) => {
                    if changed {
                        self.events
                            .push_overwrite(Event::GatewayRegistered { topic_id: r.topic_id });
                    }
                    ReturnCode::Accepted
                }
                Err(table::Full) => ReturnCode::Congestion,
            }
        };
        self.answer(
            now,
            Control::RegAck {
                topic_id: r.topic_id,
                msg_id: r.msg_id,
                code,
            },
        );
    }

    fn on_regack(&mut self, a: RegAck) {
        if self.req != (Request::Register { msg_id: a.msg_id }) {
            return;
        }
        if a.code == ReturnCode::Accepted {
            if let Ok(Packet::Register(r)) = Packet::decode(self.tx.request()) {
                let _ = self.topics.insert(a.topic_id, r.topic_name);
            }
            self.events.push_overwrite(Event::Registered {
                msg_id: a.msg_id,
                topic_id: a.topic_id,
            });
        } else {
            self.events.push_overwrite(Event::RegisterRejected {
                msg_id: a.msg_id,
                code: a.code,
            });
        }
        self.finish_request();
    }

    fn on_publish<'d>(&mut self, now: u64, p: Publish<'d>) -> Option<Message<'d>> {
        if !self.is_connected() {
            return None;
        }
        let raw_topic = match p.topic {
            TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
            TopicRef::Short(s) => u16::from_be_bytes(s),
        };
        if let TopicRef::Normal(id) = p.topic {
            if self.topics.name_of(id).is_none() {
                self.answer(
                    now,
                    Control::PubAck {
                        topic_id: raw_topic,
                        msg_id: p.msg_id,
                        code: ReturnCode::InvalidTopicId,
                    },
                );
                return None;
            }
        }
        match p.qos {
            QoS::AtMostOnce | QoS::MinusOne => {}
            QoS::AtLeastOnce => self.answer(
                now,
                Control::PubAck {
                    topic_id: raw_topic,
                    msg_id: p.msg_id,
                    code: ReturnCode::Accepted,
                },
            ),
            QoS::ExactlyOnce => {
                self.answer(now, Control::PubRec(p.msg_id));
                if p.msg_id != 0 {
                    if self.qos2_in.contains(&p.msg_id) {
                        return None;
                    }
                    let at = self.qos2_next as usize % INCOMING_QOS2_CAPACITY;
                    if let Some(slot) = self.qos2_in.get_mut(at) {
                        *slot = p.msg_id;
                    }
                    self.qos2_next = ((at + 1) % INCOMING_QOS2_CAPACITY) as u8;
                }
            }
        }
        Some(Message {
            topic: p.topic,
            payload: p.data,
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            msg_id: p.msg_id,
        })
    }

    fn on_puback(&mut self, a: PubAck) {
        if let Request::Publish { msg_id, qos } = self.req {
            if msg_id == a.msg_id {
                if a.code != ReturnCode::Accepted {
                    self.finish_request();
                    self.events.push_overwrite(Event::PublishRejected {
                        msg_id,
                        topic_id: a.topic_id,
                        code: a.code,
                    });
                } else if qos == QoS::AtLeastOnce {
                    self.finish_request();
                    self.events.push_overwrite(Event::Published { msg_id });
                }
                return;
            }
        }
        if a.code != ReturnCode::Accepted && self.is_connected() {
            // E.g. a QoS 0 PUBLISH to a topic id the gateway does not know.
            self.events.push_overwrite(Event::PublishRejected {
                msg_id: a.msg_id,
                topic_id: a.topic_id,
                code: a.code,
            });
        }
    }

    fn on_pubrec(&mut self, now: u64, id: u16) {
        match self.req {
            Request::Publish {
                msg_id,
                qos: QoS::ExactlyOnce,
            } if msg_id == id => {
                let _ = self.start_request(now, Request::PubRel { msg_id }, &Packet::PubRel(msg_id));
            }
            // Our PUBREL was lost and the gateway repeats its PUBREC.
            Request::PubRel { msg_id } if msg_id == id => self.req_due = true,
            _ => {}
        }
    }
}

/// Whether a topic filter contains an MQTT wildcard.
fn is_wildcard(name: &str) -> bool {
    name.contains(['#', '+'])
}
