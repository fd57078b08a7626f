//! The link between the gateway and the MQTT broker.
//!
//! The session engine speaks to the broker only through [`Command`]s it queues and
//! [`BrokerEvent`]s it is fed, so it does not care how the broker is reached. Transparent
//! mode ([`mqtt::MqttLinks`]) opens one MQTT 3.1.1 connection per MQTT-SN client;
//! aggregating mode ([`shared::SharedLinks`], with the sans-IO [`aggregate::Aggregator`])
//! carries every client over a few shared connections.

pub mod aggregate;
pub mod conn;
pub mod index;
pub mod mqtt;
pub mod shared;
pub mod tls;

use bytes::Bytes;
use std::sync::Arc;

/// Identifies one MQTT-SN client session inside the gateway. Never reused while the
/// process runs, so a late event for a finished session cannot reach a new one.
pub type ClientKey = u64;

/// The key of the gateway's own publications (QoS -1 publishes, spec 6.8), which belong
/// to no session. The link carries them on a connection of its choosing (transparent
/// mode: one of its own, opened at the first and again after it is lost, with the
/// client id `broker.gateway_client_id`).
pub const GATEWAY_KEY: ClientKey = 0;

/// Identifies one request to the broker within a session, echoed by its outcome event.
pub type Token = u64;

/// QoS on the broker side (MQTT 3.1.1 has no QoS -1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MqttQos {
    /// QoS 0.
    AtMostOnce = 0,
    /// QoS 1.
    AtLeastOnce = 1,
    /// QoS 2.
    ExactlyOnce = 2,
}

/// A client's last will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub message: Bytes,
    /// QoS.
    pub qos: MqttQos,
    /// Retain flag.
    pub retain: bool,
}

/// What the broker connection of a client is opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// The MQTT-SN client id (the link may add a configured prefix).
    pub client_id: String,
    /// Clean-session flag from the device's CONNECT.
    pub clean_session: bool,
    /// Keep-alive in seconds from the device's CONNECT (0: none).
    pub keep_alive: u16,
    /// The will as known at connect time (also registered with the broker, so that the
    /// broker publishes it should the gateway itself die).
    pub will: Option<Will>,
    /// The device's own broker login (from the device registry); `None`: the link's
    /// global one.
    pub credentials: Option<Credentials>,
    /// The device's own TLS client certificate (from the device registry), presented
    /// instead of the gateway's `broker.client_cert` over `mqtts://`.
    pub client_identity: Option<Arc<tls::ClientIdentity>>,
}

/// A broker login (MQTT 3.1.1 user name and password). The password never shows in a
/// debug print.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (empty: none is sent, only the user name).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A request from a session to its broker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the broker connection.
    Connect(ConnectParams),
    /// Publish; QoS 1 and 2 are answered by [`BrokerEvent::Published`] with `token`.
    Publish {
        /// Outcome correlation.
        token: Token,
        /// Topic name.
        topic: Arc<str>,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: MqttQos,
        /// Retain flag.
        retain: bool,
    },
    /// Subscribe; answered by [`BrokerEvent::SubAck`].
    Subscribe {
        /// Outcome correlation.
        token: Token,
        /// Topic filter.
        filter: String,
        /// Requested QoS.
        qos: MqttQos,
    },
    /// Unsubscribe; answered by [`BrokerEvent::UnsubAck`].
    Unsubscribe {
        /// Outcome correlation.
        token: Token,
        /// Topic filter.
        filter: String,
    },
    /// The device has this QoS 1/2 message: the link acknowledges it to the broker
    /// (PUBACK or PUBREC; in a shared connection, once every device it went to has it).
    Ack {
        /// The message's [`Message::delivery`].
        delivery: DeliveryId,
    },
    /// Close the connection cleanly (MQTT DISCONNECT, so the broker drops its copy of
    /// the will), first publishing `will` if the client was lost.
    Disconnect {
        /// The will to publish, for a lost client.
        will: Option<Will>,
    },
    /// The clean-session-false session of `client_id`, away, has expired
    /// (`limits.session_expiry_secs`); sent with [`GATEWAY_KEY`]. A link that keeps such
    /// sessions (aggregating mode) drops it, and the broker subscriptions only it held;
    /// transparent mode leaves that to the broker's own expiry.
    Expire {
        /// The device's client id.
        client_id: Arc<str>,
    },
}

/// Something that happened on a client's broker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// CONNACK accepted.
    Connected {
        /// Whether the broker resumed a stored session.
        session_present: bool,
    },
    /// The broker refused the connection or could not be reached.
    ConnectFailed {
        /// Why, for the log.
        reason: String,
        /// The broker answered and refused (CONNACK with a non-zero return code: not
        /// authorised, bad credentials, identifier rejected): the device is told
        /// "rejected" rather than "congestion", since retrying will not help. `false`
        /// for an unreachable broker (connection refused, timeout), which is transient.
        refused: bool,
    },
    /// A QoS 1 publish was acknowledged (PUBACK), or a QoS 2 one received (PUBREC).
    Published {
        /// The publish's token.
        token: Token,
    },
    /// The request could not be queued towards the broker (link congested or closed).
    Rejected {
        /// The request's token (0 for a QoS 0 publish).
        token: Token,
        /// Why.
        reason: RejectReason,
    },
    /// SUBACK.
    SubAck {
        /// The subscribe's token.
        token: Token,
        /// Granted QoS, or `None` when the broker refused.
        granted: Option<MqttQos>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// The unsubscribe's token.
        token: Token,
    },
    /// A message for the client.
    Message(Message),
    /// The connection is gone (after having been up).
    Closed {
        /// Why, for the log.
        reason: String,
    },
}

/// Why a request could not be queued towards the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The connection's queue is full (the device sends faster than the broker
    /// connection drains, for longer than its backlog absorbs).
    Full,
    /// The connection is gone (closed, or never opened).
    Closed,
}

/// A message the broker delivered for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was delivered with.
    pub qos: MqttQos,
    /// Retain flag (set for retained messages sent on subscribe).
    pub retain: bool,
    /// The link's handle of this delivery, handed back in [`Command::Ack`] once the
    /// device has the message (QoS 1/2). The engine never looks inside: packet ids,
    /// and which connection a message came on, are the link's business.
    pub delivery: DeliveryId,
}

/// A broker message's delivery to one device, as the link numbers it (opaque to the
/// engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub u64);

/// At most one log line per `every` for one kind of event, counting those it holds back,
/// so that a flood (thousands of refused CONNECTs, a congested link) is visible in the
/// log without drowning it. Time is a parameter (the engine is sans-IO).
#[derive(Debug, Clone)]
pub struct LogThrottle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// A throttle letting one line through per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        LogThrottle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; `Some(n)` with the number of lines held back since the last
    /// one logged.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Carries session commands to the broker. Implementations must not block. Outcomes
/// arrive later through the implementation's event channel, except a command that
/// cannot even be queued, whose [`BrokerEvent::Rejected`] is returned at once.
pub trait BrokerLink {
    /// Executes one command for one client.
    fn execute(&mut self, client: ClientKey, command: Command) -> Option<BrokerEvent>;

    /// Sessions whose link is not yet closed.
    fn active(&self) -> usize;

    /// Broker connections allowed at once (`usize::MAX`: unbounded).
    fn max_connections(&self) -> usize;

    /// Frees what connections that ended by themselves held. Cheap when none has.
    fn reap(&mut self);

    /// Connection tasks still running (including those closing after their session
    /// ended), after [`BrokerLink::reap`].
    fn tasks(&self) -> usize;

    /// Closes every connection still open with an MQTT DISCONNECT (no will), after what
    /// is already queued on it. For the gateway's shutdown, once the sessions have closed
    /// theirs.
    fn close_all(&mut self);

    /// Waits, until `deadline`, for every connection to end (a closed one: its
    /// DISCONNECT written to the broker). Resolves to how many did not.
    fn wait_closed(&mut self, deadline: tokio::time::Instant) -> impl std::future::Future<Output = usize> + Send;

    /// What an aggregating link holds for its devices (`None` for a link that holds
    /// nothing of the kind).
    fn aggregate_stats(&self) -> Option<aggregate::AggregateStats> {
        None
    }
}

/// The link of either mode, chosen at start by `broker.mode`.
pub enum AnyLink {
    /// One connection per device.
    Transparent(mqtt::MqttLinks),
    /// Shared connections.
    Aggregating(shared::SharedLinks),
}

impl BrokerLink for AnyLink {
    fn execute(&mut self, client: ClientKey, command: Command) -> Option<BrokerEvent> {
        match self {
            AnyLink::Transparent(l) => l.execute(client, command),
            AnyLink::Aggregating(l) => l.execute(client, command),
        }
    }

    fn active(&self) -> usize {
        match self {
            AnyLink::Transparent(l) => l.active(),
            AnyLink::Aggregating(l) => l.active(),
        }
    }

    fn max_connections(&self) -> usize {
        match self {
            AnyLink::Transparent(l) => l.max_connections(),
            AnyLink::Aggregating(l) => l.max_connections(),
        }
    }

    fn reap(&mut self) {
        match self {
            AnyLink::Transparent(l) => l.reap(),
            AnyLink::Aggregating(l) => l.reap(),
        }
    }

    fn tasks(&self) -> usize {
        match self {
            AnyLink::Transparent(l) => l.tasks(),
            AnyLink::Aggregating(l) => l.tasks(),
        }
    }

    fn close_all(&mut self) {
        match self {
            AnyLink::Transparent(l) => l.close_all(),
            AnyLink::Aggregating(l) => l.close_all(),
        }
    }

    fn aggregate_stats(&self) -> Option<aggregate::AggregateStats> {
        match self {
            AnyLink::Transparent(_) => None,
            AnyLink::Aggregating(l) => Some(l.stats()),
        }
    }

    fn wait_closed(&mut self, deadline: tokio::time::Instant) -> impl std::future::Future<Output = usize> + Send {
        let wait: std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> = match self {
            AnyLink::Transparent(l) => Box::pin(l.wait_closed(deadline)),
            AnyLink::Aggregating(l) => Box::pin(l.wait_closed(deadline)),
        };
        wait
    }
}
