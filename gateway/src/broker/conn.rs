//! One lean MQTT 3.1.1 client connection that owns its packet ids.
//!
//! [`spawn`] runs one connection as a task: it is fed [`ConnRequest`]s through a lean
//! queue ([`queue`]: bounded in requests and in octets, nothing allocated while empty) and
//! reports [`ConnEvent`]s, in order, to an [`EventSink`] (awaited: a slow receiver holds
//! the reading back instead of piling events up). Unlike rumqttc's event loop (a packet-id counter cycling
//! `1..=inflight` that hands out an id whose QoS 2 exchange is still in its PUBREL phase,
//! and never checks SUBSCRIBE ids), one id space covers PUBLISH (QoS 1/2, until PUBACK or
//! PUBCOMP), SUBSCRIBE and UNSUBSCRIBE (until their ack), and a new id is never one in
//! use (a cursor skipping ids in use). The codec is rumqttc's own `mqttbytes::v4`, so nothing new is built.
//!
//! Broker misbehaviour ends the connection with a [`ConnEvent::Closed`] naming it: a
//! malformed packet, a packet a broker never sends (CONNECT, SUBSCRIBE, PINGREQ, a second
//! CONNACK), and an ack for a packet id not in use or in the wrong phase (answering it
//! could complete someone else's exchange). A PUBREL for an unknown id is answered with
//! PUBCOMP (harmless, MQTT 3.1.1 4.3.3: the broker may resend it).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, LastWill, Login, Packet, PingReq, PubAck, PubComp, PubRec, PubRel,
    Publish, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::{MqttQos, Will};

/// What the read buffer starts with and is shrunk back to: most packets are small.
const READ_BUF: usize = 1024;
/// A read buffer grown beyond this for a large packet is given back once it is empty.
const READ_BUF_KEEP: usize = 4 * READ_BUF;
/// A write buffer grown beyond this for a large batch is given back once written.
const WRITE_BUF_KEEP: usize = 16 * 1024;
/// A batch stops taking requests beyond this many bytes, so reads are not starved.
const BATCH_MAX: usize = 64 * 1024;
/// How long to wait for the broker to close its side after our DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How one connection is opened and run.
#[derive(Clone)]
pub struct ConnOptions {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS with this config (what `broker::tls::BrokerTls::config()` returns), or plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Local address to bind before connecting (port 0), or the kernel's choice.
    pub source: Option<IpAddr>,
    /// MQTT client id.
    pub client_id: String,
    /// Clean-session flag.
    pub clean_session: bool,
    /// Keep-alive (whole seconds are sent; zero: none).
    pub keep_alive: Duration,
    /// User and password ("" = user name only).
    pub credentials: Option<(String, String)>,
    /// Last will registered with the broker.
    pub will: Option<Will>,
    /// Bound on reaching the broker, the TLS handshake and its CONNACK (zero: none).
    pub connect_timeout: Duration,
    /// Outgoing QoS 1/2 publishes not yet complete (PUBACK, or PUBCOMP for QoS 2); beyond,
    /// requests wait in order.
    pub inflight: u16,
    /// The largest packet accepted from the broker (its remaining length); a larger one
    /// ends the connection. Outgoing packets are not checked.
    pub max_packet_size: usize,
}

impl std::fmt::Debug for ConnOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("source", &self.source)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .field("will", &self.will)
            .field("connect_timeout", &self.connect_timeout)
            .field("inflight", &self.inflight)
            .field("max_packet_size", &self.max_packet_size)
            .finish()
    }
}

/// A request to the connection task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnRequest {
    /// Publish. QoS 1/2 with a tag are answered by [`ConnEvent::Published`]; QoS 0 (and
    /// no tag) by nothing.
    Publish {
        /// Echoed by [`ConnEvent::Published`].
        tag: Option<u64>,
        /// Topic name.
        topic: Arc<str>,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: MqttQos,
        /// Retain flag.
        retain: bool,
    },
    /// Subscribe; answered by [`ConnEvent::SubAck`] (at once, with nothing granted, when
    /// `filters` is empty: MQTT forbids an empty SUBSCRIBE).
    Subscribe {
        /// Echoed by [`ConnEvent::SubAck`].
        tag: u64,
        /// Topic filters with their requested QoS.
        filters: Vec<(Arc<str>, MqttQos)>,
    },
    /// Unsubscribe; answered by [`ConnEvent::UnsubAck`] (at once when `filters` is empty).
    Unsubscribe {
        /// Echoed by [`ConnEvent::UnsubAck`].
        tag: u64,
        /// Topic filters.
        filters: Vec<Arc<str>>,
    },
    /// Acknowledge the broker's message `pkid`: PUBACK (QoS 1) or PUBREC (QoS 2; the task then
    /// answers the broker's PUBREL with PUBCOMP by itself). QoS 0: nothing.
    Ack {
        /// The message's packet id ([`ConnEvent::Message::pkid`]).
        pkid: u16,
        /// The message's QoS.
        qos: MqttQos,
    },
    /// DISCONNECT after everything queued before it (and once the publishes in flight are
    /// complete, bounded by `connect_timeout`, at least 1 s), then wait (bounded, ~1 s) for
    /// the broker to close its side, then end.
    Disconnect,
}

/// What the connection task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    /// CONNACK with code 0.
    Connected {
        /// The broker kept a session for this client id.
        session_present: bool,
    },
    /// Never connected: refused (CONNACK with a non-zero code, TLS certificate refusal: `refused`
    /// true) or unreachable/timeout (`refused` false).
    ConnectFailed {
        /// Why, for the log.
        reason: String,
        /// The broker (or its TLS peer) said no, as opposed to not being reached.
        refused: bool,
    },
    /// PUBACK for QoS 1, PUBREC for QoS 2 (the broker has it; the task sends PUBREL itself).
    Published {
        /// The request's tag.
        tag: u64,
    },
    /// SUBACK: one entry per filter, `None` where refused (0x80).
    SubAck {
        /// The request's tag.
        tag: u64,
        /// Granted QoS per filter.
        granted: Vec<Option<MqttQos>>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// The request's tag.
        tag: u64,
    },
    /// A message from the broker; QoS 1/2 want a [`ConnRequest::Ack`] with `pkid`.
    Message {
        /// Topic name.
        topic: Arc<str>,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: MqttQos,
        /// Retain flag.
        retain: bool,
        /// DUP flag (a redelivery).
        dup: bool,
        /// Packet id (0 for QoS 0).
        pkid: u16,
    },
    /// After Connected: lost (with why), or ended after Disconnect.
    Closed {
        /// Why, for the log.
        reason: String,
    },
}

/// Where a connection's events go. Awaited for each event: a receiver that is slow to take
/// them holds the connection's reading back (the broker's own flow control then applies)
/// instead of letting events pile up.
pub trait EventSink: Send + 'static {
    /// Hands one event on; [`Gone`] when nobody takes events any more (the connection then
    /// ends).
    fn send(&mut self, event: ConnEvent) -> impl Future<Output = Result<(), Gone>> + Send;
}

/// The receiver of a connection's events is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl EventSink for mpsc::UnboundedSender<ConnEvent> {
    fn send(&mut self, event: ConnEvent) -> impl Future<Output = Result<(), Gone>> + Send {
        std::future::ready(mpsc::UnboundedSender::send(self, event).map_err(|_| Gone))
    }
}

/// The sending half of a connection's request queue ([`queue`]). Dropping it drops the
/// connection (without DISCONNECT) once the requests queued before are taken.
pub struct Requests {
    shared: Arc<Queue>,
}

/// The receiving half of a connection's request queue, owned by the connection task.
pub struct RequestQueue {
    shared: Arc<Queue>,
}

/// Why [`Requests::try_send`] did not queue a request (handed back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotQueued {
    /// The queue holds its bound of requests or octets.
    Full(ConnRequest),
    /// The connection task has ended.
    Closed(ConnRequest),
}

/// A request queue shared by its two halves: a `VecDeque` behind a mutex (empty, it holds
/// no allocation, unlike a channel's block of slots) and a wake-up for the task.
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
    max_requests: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<ConnRequest>,
    /// Topic, filter and payload octets of `items`.
    bytes: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

/// A queue beyond this many slots, once empty, gives its memory back.
const QUEUE_KEEP: usize = 64;

/// A request queue holding at most `max_requests` requests and `max_bytes` octets of
/// topics, filters and payloads (a request is always taken into an empty queue, however
/// large), for [`spawn`].
pub fn queue(max_requests: usize, max_bytes: usize) -> (Requests, RequestQueue) {
    let shared = Arc::new(Queue {
        state: Mutex::new(QueueState::default()),
        ready: Notify::new(),
        max_requests: max_requests.max(1),
        max_bytes,
    });
    (Requests { shared: shared.clone() }, RequestQueue { shared })
}

/// The octets a request holds in a queue (acknowledgements and DISCONNECT: none).
fn request_bytes(r: &ConnRequest) -> usize {
    match r {
        ConnRequest::Publish { topic, payload, .. } => topic.len() + payload.len(),
        ConnRequest::Subscribe { filters, .. } => filters.iter().map(|(f, _)| f.len()).sum(),
        ConnRequest::Unsubscribe { filters, .. } => filters.iter().map(|f| f.len()).sum(),
        ConnRequest::Ack { .. } | ConnRequest::Disconnect => 0,
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Requests {
    /// Queues `req` within the queue's bounds.
    pub fn try_send(&self, req: ConnRequest) -> Result<(), NotQueued> {
        self.push(req, true)
    }

    /// Queues `req` whatever the bounds (for what must not be refused and is small or
    /// bounded elsewhere: acknowledgements, a lost client's will, DISCONNECT); `Err` with
    /// the request when the task has ended.
    pub fn send_anyway(&self, req: ConnRequest) -> Result<(), ConnRequest> {
        self.push(req, false).map_err(|e| match e {
            NotQueued::Full(r) | NotQueued::Closed(r) => r,
        })
    }

    /// The connection task has ended (nothing sent now is taken).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }

    /// Requests queued and not yet taken by the task.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, req: ConnRequest, bounded: bool) -> Result<(), NotQueued> {
        let size = request_bytes(&req);
        let mut st = self.shared.lock();
        if st.receiver_gone {
            return Err(NotQueued::Closed(req));
        }
        if bounded
            && !st.items.is_empty()
            && (st.items.len() >= self.shared.max_requests || st.bytes + size > self.shared.max_bytes)
        {
            return Err(NotQueued::Full(req));
        }
        st.items.push_back(req);
        st.bytes += size;
        drop(st);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.shared.lock().sender_gone = true;
        self.shared.ready.notify_one();
    }
}

/// What [`RequestQueue::try_recv`] found instead of a request.
enum Empty {
    /// Nothing queued now.
    Now,
    /// Nothing queued, and the sender is gone.
    ForGood,
}

impl RequestQueue {
    fn try_recv(&mut self) -> Result<ConnRequest, Empty> {
        let mut st = self.shared.lock();
        match st.items.pop_front() {
            Some(req) => {
                st.bytes -= request_bytes(&req);
                if st.items.is_empty() && st.items.capacity() > QUEUE_KEEP {
                    st.items = VecDeque::new();
                }
                Ok(req)
            }
            None if st.sender_gone => Err(Empty::ForGood),
            None => Err(Empty::Now),
        }
    }

    /// The next request; `None` once the queue is empty and its sender gone. Cancel-safe:
    /// a request is only taken when this returns it.
    async fn recv(&mut self) -> Option<ConnRequest> {
        loop {
            match self.try_recv() {
                Ok(req) => return Some(req),
                Err(Empty::ForGood) => return None,
                // A push after this look stores a permit, so the wait below returns at once.
                Err(Empty::Now) => self.shared.ready.notified().await,
            }
        }
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receiver_gone = true;
        st.items = VecDeque::new();
        st.bytes = 0;
    }
}

/// Runs one connection as a task until it ends ([`run`]).
pub fn spawn<E: EventSink>(opts: ConnOptions, requests: RequestQueue, events: E) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(opts, requests, events))
}

/// Why the connection was never established.
struct Failure {
    reason: String,
    refused: bool,
}

impl Failure {
    fn unreachable(reason: String) -> Failure {
        Failure { reason, refused: false }
    }

    /// An I/O error while establishing: a TLS error inside it (an alert the broker sends
    /// after a TLS 1.3 handshake: a client certificate required or refused) is a refusal,
    /// described for an operator; anything else is a failure to reach the broker.
    fn io(context: &str, e: &std::io::Error, host: &str) -> Failure {
        match super::tls::describe_io(e, host) {
            Some(reason) => Failure { reason, refused: true },
            None => Failure::unreachable(format!("{context}: {e}")),
        }
    }
}

/// Runs one connection until it ends; events in order; ends after ConnectFailed or Closed.
///
/// Dropping the [`Requests`] drops the connection without DISCONNECT (the broker then
/// publishes the will) once what was queued before is taken, and ends with
/// [`ConnEvent::Closed`]; so does a gone event receiver (without the event). Dropping the
/// future (aborting the task) drops the connection the same way.
pub async fn run<E: EventSink>(opts: ConnOptions, requests: RequestQueue, mut events: E) {
    let tcp = match bounded(opts.connect_timeout, open_tcp(&opts)).await {
        Ok(tcp) => tcp,
        Err(f) => {
            let _ = events
                .send(ConnEvent::ConnectFailed {
                    reason: f.reason,
                    refused: f.refused,
                })
                .await;
            return;
        }
    };
    // Nagle would hold a lone small packet (an ack, a PINGREQ) back for the peer's ack.
    let _ = tcp.set_nodelay(true);
    match opts.tls.clone() {
        None => establish_and_run(tcp, opts, requests, events).await,
        // Boxed: a TLS stream is large, and an unboxed future would make every plain
        // connection's task as large as a TLS one.
        Some(config) => Box::pin(run_tls(tcp, config, opts, requests, events)).await,
    }
}

/// The TLS handshake, then the connection over it.
async fn run_tls<E: EventSink>(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    opts: ConnOptions,
    requests: RequestQueue,
    mut events: E,
) {
    match bounded(opts.connect_timeout, tls_handshake(tcp, &opts.host, config)).await {
        Ok(stream) => establish_and_run(stream, opts, requests, events).await,
        Err(f) => {
            let _ = events
                .send(ConnEvent::ConnectFailed {
                    reason: f.reason,
                    refused: f.refused,
                })
                .await;
        }
    }
}

/// `fut` bounded by `limit` (zero: unbounded).
async fn bounded<T>(limit: Duration, fut: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    if limit.is_zero() {
        return fut.await;
    }
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(Failure::unreachable(format!("no answer within {limit:?}"))),
    }
}

async fn open_tcp(opts: &ConnOptions) -> Result<TcpStream, Failure> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| Failure::unreachable(format!("cannot resolve {}: {e}", opts.host)))?
        // Bound to a source address, only a peer of the same family can be reached.
        .filter(|a| opts.source.map_or(true, |s| s.is_ipv4() == a.is_ipv4()))
        .collect();
    let mut last = format!("no address of {} to reach", opts.host);
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        let attempt = async {
            let socket = socket?;
            if let Some(source) = opts.source {
                socket.bind(SocketAddr::new(source, 0))?;
            }
            socket.connect(addr).await
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(Failure::unreachable(last))
}

async fn tls_handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
    let name = super::tls::server_name(host).map_err(|reason| Failure { reason, refused: true })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        // A rustls error (a certificate refused by either side, an alert) is a refusal; a
        // plain I/O error (reset, EOF) is not.
        .map_err(|e| Failure::io("TLS handshake", &e, host))
}

fn to_qos(q: MqttQos) -> QoS {
    match q {
        MqttQos::AtMostOnce => QoS::AtMostOnce,
        MqttQos::AtLeastOnce => QoS::AtLeastOnce,
        MqttQos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn from_qos(q: QoS) -> MqttQos {
    match q {
        QoS::AtMostOnce => MqttQos::AtMostOnce,
        QoS::AtLeastOnce => MqttQos::AtLeastOnce,
        QoS::ExactlyOnce => MqttQos::ExactlyOnce,
    }
}

fn connect_packet(opts: &ConnOptions) -> Connect {
    let mut c = Connect::new(opts.client_id.clone());
    c.keep_alive = u16::try_from(opts.keep_alive.as_secs()).unwrap_or(u16::MAX);
    c.clean_session = opts.clean_session;
    c.login = opts.credentials.as_ref().map(|(u, p)| Login::new(u.clone(), p.clone()));
    c.last_will = opts.will.as_ref().map(|w| LastWill {
        topic: w.topic.clone(),
        message: w.message.clone(),
        qos: to_qos(w.qos),
        retain: w.retain,
    });
    c
}

/// Sends CONNECT, waits (bounded) for CONNACK, then runs the connection.
async fn establish_and_run<S: AsyncRead + AsyncWrite + Unpin, E: EventSink>(
    mut stream: S,
    opts: ConnOptions,
    requests: RequestQueue,
    mut events: E,
) {
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let host = opts.host.as_str();
    let handshake = async {
        let mut wbuf = BytesMut::with_capacity(64);
        connect_packet(&opts).write(&mut wbuf).map_err(|e| Failure {
            reason: format!("cannot encode CONNECT: {e}"),
            refused: true,
        })?;
        stream
            .write_all(&wbuf)
            .await
            .map_err(|e| Failure::io("sending CONNECT", &e, host))?;
        stream
            .flush()
            .await
            .map_err(|e| Failure::io("sending CONNECT", &e, host))?;
        loop {
            match Packet::read(&mut rbuf, opts.max_packet_size) {
                Ok(Packet::ConnAck(ack)) => return Ok(ack),
                Ok(other) => {
                    return Err(Failure::unreachable(format!(
                        "expected CONNACK, got {}",
                        packet_name(&other)
                    )))
                }
                Err(CodecError::InsufficientBytes(n)) => rbuf.reserve(n),
                Err(e) => return Err(Failure::unreachable(format!("malformed CONNACK: {e}"))),
            }
            match stream.read_buf(&mut rbuf).await {
                Ok(0) => {
                    return Err(Failure::unreachable(
                        "the broker closed the connection before CONNACK".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(Failure::io("waiting for CONNACK", &e, host)),
            }
        }
    };
    let ack: ConnAck = match bounded(opts.connect_timeout, handshake).await {
        Ok(ack) => ack,
        Err(f) => {
            let _ = events
                .send(ConnEvent::ConnectFailed {
                    reason: f.reason,
                    refused: f.refused,
                })
                .await;
            return;
        }
    };
    if ack.code != ConnectReturnCode::Success {
        let _ = events
            .send(ConnEvent::ConnectFailed {
                reason: format!("the broker refused the connection: {:?} ({})", ack.code, ack.code as u8),
                // "Server unavailable" is transient; the others are answered the same
                // on every retry.
                refused: ack.code != ConnectReturnCode::ServiceUnavailable,
            })
            .await;
        return;
    }
    if events
        .send(ConnEvent::Connected {
            session_present: ack.session_present,
        })
        .await
        .is_err()
    {
        return;
    }
    let mut conn = Conn::new(&opts, rbuf);
    let reason = match conn.run(&mut stream, requests, &mut events).await {
        Ok(reason) | Err(reason) => reason,
    };
    // Events parsed before the end still go, then the end.
    if conn.deliver(&mut events).await.is_ok() {
        let _ = events.send(ConnEvent::Closed { reason }).await;
    }
}

/// What an id in use is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// QoS 1 PUBLISH, for PUBACK.
    PubAck(Option<u64>),
    /// QoS 2 PUBLISH, for PUBREC.
    PubRec(Option<u64>),
    /// QoS 2 PUBREL sent, for PUBCOMP.
    PubComp,
    /// SUBSCRIBE, for SUBACK.
    SubAck(u64),
    /// UNSUBSCRIBE, for UNSUBACK.
    UnsubAck(u64),
}

/// Packet ids in use, with what each waits for. A cursor cycles through 1..=65535 and
/// skips ids in use, so a new id is never one in use and a freed id is not handed out
/// again soon (a late duplicate ack cannot hit its successor). Empty when idle, so an
/// idle connection costs nothing here.
#[derive(Debug, Default)]
struct Ids {
    used: HashMap<u16, Slot>,
    next: u16,
}

impl Ids {
    /// A free id for `slot`, or `None` when all 65535 are in use.
    fn take(&mut self, slot: Slot) -> Option<u16> {
        if self.used.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.next = self.next.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(e) = self.used.entry(self.next) {
                e.insert(slot);
                return Some(self.next);
            }
        }
    }

    fn get(&self, id: u16) -> Option<Slot> {
        self.used.get(&id).copied()
    }

    fn set(&mut self, id: u16, slot: Slot) {
        self.used.insert(id, slot);
    }

    fn free(&mut self, id: u16) {
        self.used.remove(&id);
        if self.used.is_empty() {
            // Give the table's memory back: an idle connection keeps none.
            self.used = HashMap::new();
        }
    }
}

/// The state of one established connection.
struct Conn {
    /// Events parsed and not yet handed to the sink ([`Conn::deliver`]).
    outbox: Vec<ConnEvent>,
    keep_alive: Duration,
    max_packet_size: usize,
    inflight_max: u16,
    /// Outgoing QoS 1/2 publishes not complete.
    inflight: u16,
    ids: Ids,
    /// The head request, waiting for an inflight slot or a free id; nothing behind it
    /// is taken before it.
    held: Option<ConnRequest>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    last_sent: Instant,
    last_heard: Instant,
    ping_out: bool,
    /// Disconnect reached the head: nothing more is taken, and DISCONNECT goes once the
    /// publishes in flight are complete or at this instant.
    closing: Option<Instant>,
    /// How long Disconnect waits for publishes in flight.
    drain_wait: Duration,
}

/// How one connection ends: `Ok` after Disconnect, `Err` when lost; both carry the reason.
type End = Result<String, String>;

impl Conn {
    fn new(opts: &ConnOptions, rbuf: BytesMut) -> Conn {
        let now = Instant::now();
        Conn {
            outbox: Vec::new(),
            keep_alive: Duration::from_secs(opts.keep_alive.as_secs().min(u64::from(u16::MAX))),
            max_packet_size: opts.max_packet_size,
            inflight_max: opts.inflight.max(1),
            inflight: 0,
            ids: Ids::default(),
            held: None,
            rbuf,
            wbuf: BytesMut::new(),
            last_sent: now,
            last_heard: now,
            ping_out: false,
            closing: None,
            drain_wait: opts.connect_timeout.max(Duration::from_secs(1)),
        }
    }

    fn emit(&mut self, event: ConnEvent) -> Result<(), String> {
        self.outbox.push(event);
        Ok(())
    }

    /// Hands the events parsed so far to the sink, in order.
    async fn deliver<E: EventSink>(&mut self, sink: &mut E) -> Result<(), String> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.outbox);
        for event in out.drain(..) {
            sink.send(event)
                .await
                .map_err(|Gone| "the event receiver was dropped".to_owned())?;
        }
        // Keep a small outbox's allocation for the next batch; give a large one back.
        if out.capacity() <= QUEUE_KEEP {
            self.outbox = out;
        }
        Ok(())
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin, E: EventSink>(
        &mut self,
        stream: &mut S,
        mut requests: RequestQueue,
        sink: &mut E,
    ) -> End {
        // Packets that came with CONNACK.
        self.parse()?;
        loop {
            self.deliver(sink).await?;
            // Take what is queued, in order, up to the inflight bound.
            loop {
                if self.closing.is_some() {
                    break;
                }
                if let Some(req) = self.held.take() {
                    match self.admit(req)? {
                        Admit::Done => {}
                        Admit::Wait(req) => {
                            self.held = Some(req);
                            break;
                        }
                        Admit::Disconnect => {
                            self.closing = Some(Instant::now() + self.drain_wait);
                            break;
                        }
                    }
                }
                if self.wbuf.len() >= BATCH_MAX {
                    break;
                }
                match requests.try_recv() {
                    Ok(req) => self.held = Some(req),
                    Err(Empty::Now) => break,
                    Err(Empty::ForGood) => {
                        // Flush what was taken, then drop the connection without DISCONNECT.
                        self.flush(stream).await?;
                        return Err("the request channel was closed; connection dropped".into());
                    }
                }
            }
            // mosquitto hands an incoming QoS 2 message on only at PUBREL: DISCONNECT
            // before the exchanges in flight complete would lose them.
            if self
                .closing
                .is_some_and(|until| self.inflight == 0 || Instant::now() >= until)
            {
                Disconnect
                    .write(&mut self.wbuf)
                    .map_err(|e| format!("encoding DISCONNECT: {e}"))?;
                self.flush(stream).await?;
                return self.linger(stream, sink).await;
            }
            self.flush(stream).await?;

            let deadline = self.deadline();
            let more = self.held.is_none() && self.closing.is_none() && self.wbuf.len() < BATCH_MAX;
            let closing = self.closing;
            if self.rbuf.capacity() - self.rbuf.len() < 64 {
                self.rbuf.reserve(READ_BUF / 2);
            }
            tokio::select! {
                read = stream.read_buf(&mut self.rbuf) => {
                    match read {
                        Ok(0) => return Err("the broker closed the connection".into()),
                        Ok(_) => {
                            self.last_heard = Instant::now();
                            self.parse()?;
                        }
                        Err(e) => return Err(format!("reading from the broker: {e}")),
                    }
                }
                req = requests.recv(), if more => match req {
                    Some(req) => self.held = Some(req),
                    None => return Err("the request channel was closed; connection dropped".into()),
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.keep_alive_check()?;
                }
                // The drain bound passed: the loop's top sends DISCONNECT.
                _ = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {}
            }
        }
    }

    /// When the keep-alive needs a look next, if at all.
    fn deadline(&self) -> Option<Instant> {
        if self.keep_alive.is_zero() {
            return None;
        }
        let lost = self.last_heard + self.keep_alive * 3 / 2;
        if self.ping_out {
            Some(lost)
        } else {
            Some(lost.min(self.last_sent.min(self.last_heard) + self.keep_alive))
        }
    }

    fn keep_alive_check(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if now >= self.last_heard + self.keep_alive * 3 / 2 {
            return Err(format!(
                "keep-alive: nothing heard from the broker for {:?}",
                now.duration_since(self.last_heard)
            ));
        }
        // Ping also when we keep sending but hear nothing (QoS 0 only), so that silence
        // from the broker is told from a connection that is merely quiet.
        if !self.ping_out && (now >= self.last_sent + self.keep_alive || now >= self.last_heard + self.keep_alive) {
            PingReq
                .write(&mut self.wbuf)
                .map_err(|e| format!("encoding PINGREQ: {e}"))?;
            self.ping_out = true;
        }
        Ok(())
    }

    /// Writes the batch with one `write_all`.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        stream
            .write_all(&self.wbuf)
            .await
            .map_err(|e| format!("writing to the broker: {e}"))?;
        stream
            .flush()
            .await
            .map_err(|e| format!("writing to the broker: {e}"))?;
        self.last_sent = Instant::now();
        if self.wbuf.capacity() > WRITE_BUF_KEEP {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        Ok(())
    }

    /// After DISCONNECT: reads (and reports) what the broker still sends until it closes,
    /// bounded by [`CLOSE_WAIT`].
    async fn linger<S: AsyncRead + Unpin, E: EventSink>(&mut self, stream: &mut S, sink: &mut E) -> End {
        let until = Instant::now() + CLOSE_WAIT;
        loop {
            self.rbuf.reserve(READ_BUF / 2);
            match tokio::time::timeout_at(until, stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok("disconnected".into()),
                Ok(Ok(_)) => {
                    // Acks for what was sent before DISCONNECT are still reported; any
                    // answer they would need is not sent (the session is over).
                    if let Err(e) = self.parse() {
                        return Ok(format!("disconnected ({e})"));
                    }
                    self.wbuf.clear();
                    if self.deliver(sink).await.is_err() {
                        return Ok("disconnected".into());
                    }
                }
            }
        }
    }

    /// Encodes `req` into the batch, or hands it back when it must wait.
    fn admit(&mut self, req: ConnRequest) -> Result<Admit, String> {
        let enc = |e: CodecError| format!("encoding a request: {e}");
        match req {
            ConnRequest::Publish {
                tag,
                topic,
                payload,
                qos,
                retain,
            } => {
                let mut p = Publish::from_bytes(&*topic, to_qos(qos), payload);
                p.retain = retain;
                if qos != MqttQos::AtMostOnce {
                    let slot = if qos == MqttQos::AtLeastOnce {
                        Slot::PubAck(tag)
                    } else {
                        Slot::PubRec(tag)
                    };
                    if self.inflight >= self.inflight_max {
                        return Ok(Admit::Wait(ConnRequest::Publish {
                            tag,
                            topic,
                            payload: p.payload,
                            qos,
                            retain,
                        }));
                    }
                    let Some(id) = self.ids.take(slot) else {
                        return Ok(Admit::Wait(ConnRequest::Publish {
                            tag,
                            topic,
                            payload: p.payload,
                            qos,
                            retain,
                        }));
                    };
                    p.pkid = id;
                    self.inflight += 1;
                }
                p.write(&mut self.wbuf).map_err(enc)?;
            }
            ConnRequest::Subscribe { tag, filters } => {
                if filters.is_empty() {
                    self.emit(ConnEvent::SubAck {
                        tag,
                        granted: Vec::new(),
                    })?;
                    return Ok(Admit::Done);
                }
                let Some(id) = self.ids.take(Slot::SubAck(tag)) else {
                    return Ok(Admit::Wait(ConnRequest::Subscribe { tag, filters }));
                };
                let s = Subscribe {
                    pkid: id,
                    filters: filters
                        .iter()
                        .map(|(f, q)| SubscribeFilter::new(f.to_string(), to_qos(*q)))
                        .collect(),
                };
                s.write(&mut self.wbuf).map_err(enc)?;
            }
            ConnRequest::Unsubscribe { tag, filters } => {
                if filters.is_empty() {
                    self.emit(ConnEvent::UnsubAck { tag })?;
                    return Ok(Admit::Done);
                }
                let Some(id) = self.ids.take(Slot::UnsubAck(tag)) else {
                    return Ok(Admit::Wait(ConnRequest::Unsubscribe { tag, filters }));
                };
                let u = Unsubscribe {
                    pkid: id,
                    topics: filters.iter().map(|f| f.to_string()).collect(),
                };
                u.write(&mut self.wbuf).map_err(enc)?;
            }
            ConnRequest::Ack { pkid, qos } => match qos {
                MqttQos::AtMostOnce => {}
                MqttQos::AtLeastOnce => {
                    PubAck::new(pkid).write(&mut self.wbuf).map_err(enc)?;
                }
                MqttQos::ExactlyOnce => {
                    PubRec::new(pkid).write(&mut self.wbuf).map_err(enc)?;
                }
            },
            ConnRequest::Disconnect => return Ok(Admit::Disconnect),
        }
        Ok(Admit::Done)
    }

    /// Handles every whole packet in the read buffer.
    fn parse(&mut self) -> Result<(), String> {
        loop {
            match Packet::read(&mut self.rbuf, self.max_packet_size) {
                Ok(packet) => self.incoming(packet)?,
                Err(CodecError::InsufficientBytes(n)) => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > READ_BUF_KEEP {
                        // Idle again after a large packet: give the memory back.
                        self.rbuf = BytesMut::with_capacity(READ_BUF);
                    } else {
                        self.rbuf.reserve(n);
                    }
                    return Ok(());
                }
                Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                    return Err(format!(
                        "the broker sent a packet of {n} bytes, over max_packet_size {}",
                        self.max_packet_size
                    ))
                }
                Err(e) => return Err(format!("malformed packet from the broker: {e}")),
            }
        }
    }

    fn incoming(&mut self, packet: Packet) -> Result<(), String> {
        let enc = |e: CodecError| format!("encoding an answer: {e}");
        match packet {
            Packet::Publish(p) => self.emit(ConnEvent::Message {
                topic: Arc::from(p.topic),
                payload: p.payload,
                qos: from_qos(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
            })?,
            Packet::PubAck(a) => match self.ids.get(a.pkid) {
                Some(Slot::PubAck(tag)) => {
                    self.ids.free(a.pkid);
                    self.inflight -= 1;
                    if let Some(tag) = tag {
                        self.emit(ConnEvent::Published { tag })?;
                    }
                }
                other => return Err(unexpected("PUBACK", a.pkid, other)),
            },
            Packet::PubRec(a) => match self.ids.get(a.pkid) {
                Some(Slot::PubRec(tag)) => {
                    self.ids.set(a.pkid, Slot::PubComp);
                    PubRel::new(a.pkid).write(&mut self.wbuf).map_err(enc)?;
                    if let Some(tag) = tag {
                        self.emit(ConnEvent::Published { tag })?;
                    }
                }
                // A repeated PUBREC: PUBREL again (MQTT 3.1.1 4.3.3 lets the sender resend).
                Some(Slot::PubComp) => {
                    PubRel::new(a.pkid).write(&mut self.wbuf).map_err(enc)?;
                }
                other => return Err(unexpected("PUBREC", a.pkid, other)),
            },
            Packet::PubComp(a) => match self.ids.get(a.pkid) {
                Some(Slot::PubComp) => {
                    self.ids.free(a.pkid);
                    self.inflight -= 1;
                }
                other => return Err(unexpected("PUBCOMP", a.pkid, other)),
            },
            Packet::PubRel(r) => {
                PubComp::new(r.pkid).write(&mut self.wbuf).map_err(enc)?;
            }
            Packet::SubAck(a) => match self.ids.get(a.pkid) {
                Some(Slot::SubAck(tag)) => {
                    self.ids.free(a.pkid);
                    let granted = a
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => Some(from_qos(*q)),
                            SubscribeReasonCode::Failure => None,
                        })
                        .collect();
                    self.emit(ConnEvent::SubAck { tag, granted })?;
                }
                other => return Err(unexpected("SUBACK", a.pkid, other)),
            },
            Packet::UnsubAck(a) => match self.ids.get(a.pkid) {
                Some(Slot::UnsubAck(tag)) => {
                    self.ids.free(a.pkid);
                    self.emit(ConnEvent::UnsubAck { tag })?;
                }
                other => return Err(unexpected("UNSUBACK", a.pkid, other)),
            },
            Packet::PingResp => self.ping_out = false,
            other => {
                return Err(format!(
                    "the broker sent {}, which a broker never sends",
                    packet_name(&other)
                ))
            }
        }
        Ok(())
    }
}

/// What [`Conn::admit`] did with a request.
enum Admit {
    /// Encoded (or answered at once).
    Done,
    /// Must wait for an inflight slot or a free id.
    Wait(ConnRequest),
    /// Disconnect reached the head of the queue.
    Disconnect,
}

fn unexpected(what: &str, pkid: u16, slot: Option<Slot>) -> String {
    match slot {
        None => format!("the broker sent {what} for packet id {pkid}, which is not in use"),
        Some(s) => format!("the broker sent {what} for packet id {pkid}, which waits for {s:?}"),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_one_in_use_and_wrap() {
        let mut ids = Ids::default();
        let a = ids.take(Slot::PubComp).unwrap();
        assert_eq!(a, 1);
        // Walk the cursor round to just before `a`: the next take skips it.
        ids.next = u16::MAX;
        let b = ids.take(Slot::SubAck(7)).unwrap();
        assert_eq!(b, 2, "1 is in use, so the wrapped cursor skips it");
        ids.free(a);
        assert_eq!(ids.get(a), None);
        assert_eq!(ids.get(b), Some(Slot::SubAck(7)));
    }

    fn test_opts() -> ConnOptions {
        ConnOptions {
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            source: None,
            client_id: "t".into(),
            clean_session: true,
            keep_alive: Duration::from_secs(30),
            credentials: None,
            will: None,
            connect_timeout: Duration::ZERO,
            inflight: 4,
            max_packet_size: 4096,
        }
    }

    #[tokio::test]
    async fn arbitrary_bytes_from_the_broker_never_panic() {
        // A deterministic xorshift stream of packet-like inputs: a plausible first byte
        // (every packet type and flag), a short remaining length, random contents.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ended = 0;
        for _ in 0..20_000 {
            let mut conn = Conn::new(&test_opts(), BytesMut::new());
            // Some ids in use, so that acks sometimes match.
            conn.ids.take(Slot::PubAck(Some(1)));
            conn.ids.take(Slot::PubRec(Some(2)));
            conn.ids.take(Slot::SubAck(3));
            conn.inflight = 2;
            let len = (next() % 12) as usize;
            conn.rbuf.extend_from_slice(&[(next() & 0xFF) as u8, len as u8]);
            for _ in 0..len + (next() % 3) as usize {
                conn.rbuf.extend_from_slice(&[(next() & 0xFF) as u8]);
            }
            if conn.parse().is_err() {
                ended += 1;
            }
        }
        assert!(ended > 0, "some inputs end the connection");
    }

    #[test]
    fn ids_run_out_at_65535() {
        let mut ids = Ids::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..u16::MAX {
            assert!(seen.insert(ids.take(Slot::PubAck(None)).unwrap()));
        }
        assert!(!seen.contains(&0));
        assert_eq!(ids.take(Slot::PubAck(None)), None);
        ids.free(300);
        assert_eq!(ids.take(Slot::PubAck(None)), Some(300));
    }
}
