//! Transparent mode: one MQTT 3.1.1 connection (rumqttc) per MQTT-SN client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, Publish, SubscribeReasonCode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{BrokerEvent, BrokerLink, ClientKey, Command, ConnectParams, Message, MqttQos, Token};

/// Where and how to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name sent in every CONNECT, if any.
    pub username: Option<String>,
    /// Password sent with the user name.
    pub password: Option<String>,
    /// Prepended to each device's client id on the broker.
    pub client_id_prefix: String,
    /// Requests queued per connection before the gateway answers congestion.
    pub request_capacity: usize,
    /// QoS 1/2 publishes per connection awaiting the broker's acknowledgement.
    pub inflight: u16,
    /// Seconds to wait for the TCP connection and CONNACK.
    pub connect_timeout_secs: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            client_id_prefix: String::new(),
            request_capacity: 256,
            inflight: 16,
            connect_timeout_secs: 5,
        }
    }
}

impl BrokerConfig {
    /// Parses `mqtt://host:port` (also `tcp://`, or a bare `host:port`; port 1883 when
    /// omitted) into host and port.
    pub fn parse_url(url: &str) -> Result<(String, u16), String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        if rest.contains("://") {
            return Err(format!("broker URL {url:?}: only mqtt:// (plain TCP) is supported"));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .map_err(|_| format!("broker URL {url:?}: bad port {p:?}"))?,
            ),
            _ => (rest, 1883),
        };
        if host.is_empty() {
            return Err(format!("broker URL {url:?}: no host"));
        }
        Ok((host.to_string(), port))
    }
}

fn rumqttc_qos(q: MqttQos) -> rumqttc::QoS {
    match q {
        MqttQos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        MqttQos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        MqttQos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn our_qos(q: rumqttc::QoS) -> MqttQos {
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

struct Conn {
    client: AsyncClient,
    pending: Arc<Mutex<Pending>>,
}

/// The transparent-mode broker link: a connection per client, each driven by its own
/// task, all reporting to one event channel.
pub struct MqttLinks {
    cfg: Arc<BrokerConfig>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    conns: HashMap<ClientKey, Conn>,
    /// The last connection task of each broker client id: a new connection with the
    /// same id waits for the old one to close, so the broker never sees them overlap.
    last_task: HashMap<String, JoinHandle<()>>,
}

impl MqttLinks {
    /// A link reporting to `events`.
    pub fn new(cfg: BrokerConfig, events: mpsc::Sender<(ClientKey, BrokerEvent)>) -> Self {
        MqttLinks {
            cfg: Arc::new(cfg),
            events,
            conns: HashMap::new(),
            last_task: HashMap::new(),
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
        if let (Some(u), Some(pw)) = (&self.cfg.username, &self.cfg.password) {
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
        let broker_id = options.client_id();
        let (client, eventloop) = AsyncClient::new(options, self.cfg.request_capacity.max(1));
        let pending = Arc::new(Mutex::new(Pending::default()));
        if self.last_task.len() > 2 * self.conns.len() + 1024 {
            self.last_task.retain(|_, t| !t.is_finished());
        }
        let previous = self.last_task.remove(&broker_id);
        let task = tokio::spawn(drive(
            key,
            eventloop,
            pending.clone(),
            self.events.clone(),
            previous,
            self.cfg.connect_timeout_secs,
        ));
        self.last_task.insert(broker_id, task);
        if let Some(old) = self.conns.insert(key, Conn { client, pending }) {
            let _ = old.client.try_disconnect();
        }
    }
}

impl BrokerLink for MqttLinks {
    fn execute(&mut self, key: ClientKey, command: Command) -> Option<BrokerEvent> {
        if let Command::Connect(p) = command {
            self.connect(key, p);
            return None;
        }
        let Some(conn) = self.conns.get(&key) else {
            return match command {
                Command::Publish { token, .. }
                | Command::Subscribe { token, .. }
                | Command::Unsubscribe { token, .. } => Some(BrokerEvent::Rejected { token }),
                _ => None,
            };
        };
        match command {
            Command::Connect(_) => None,
            Command::Publish {
                token,
                topic,
                payload,
                qos,
                retain,
            } => {
                let mut pending = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending
                    .publishes
                    .push_back((qos != MqttQos::AtMostOnce).then_some(token));
                match conn
                    .client
                    .try_publish(&*topic, rumqttc_qos(qos), retain, payload.to_vec())
                {
                    Ok(()) => None,
                    Err(e) => {
                        pending.publishes.pop_back();
                        debug!(key, error = %e, "publish not queued");
                        Some(BrokerEvent::Rejected { token })
                    }
                }
            }
            Command::Subscribe { token, filter, qos } => {
                let mut pending = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.subscribes.push_back(token);
                match conn.client.try_subscribe(filter, rumqttc_qos(qos)) {
                    Ok(()) => None,
                    Err(e) => {
                        pending.subscribes.pop_back();
                        debug!(key, error = %e, "subscribe not queued");
                        Some(BrokerEvent::Rejected { token })
                    }
                }
            }
            Command::Unsubscribe { token, filter } => {
                let mut pending = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.unsubscribes.push_back(token);
                match conn.client.try_unsubscribe(filter) {
                    Ok(()) => None,
                    Err(e) => {
                        pending.unsubscribes.pop_back();
                        debug!(key, error = %e, "unsubscribe not queued");
                        Some(BrokerEvent::Rejected { token })
                    }
                }
            }
            Command::Ack { qos, pkid } => {
                let mut p = Publish::new("", rumqttc_qos(qos), Vec::new());
                p.pkid = pkid;
                if let Err(e) = conn.client.try_ack(&p) {
                    // Not lost: unacknowledged, the broker delivers it again.
                    warn!(key, pkid, error = %e, "acknowledgement not queued");
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
                // Awaiting in a task keeps the order (will, then DISCONNECT) even when the
                // request queue is full, without blocking the engine.
                tokio::spawn(async move {
                    if let Some(w) = will {
                        let _ = conn
                            .client
                            .publish(w.topic, rumqttc_qos(w.qos), w.retain, w.message.to_vec())
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
}

/// Tells the task closing a lost client's link that the broker has its will.
fn will_delivered(pending: &Mutex<Pending>) {
    if let Some(tx) = pending.lock().unwrap_or_else(|e| e.into_inner()).will_done.take() {
        let _ = tx.send(());
    }
}

/// Drives one broker connection until it closes, translating rumqttc's events.
async fn drive(
    key: ClientKey,
    mut eventloop: EventLoop,
    pending: Arc<Mutex<Pending>>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    previous: Option<JoinHandle<()>>,
    connect_timeout_secs: u64,
) {
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
                    pkid: p.pkid,
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
                    Outgoing::Disconnect => return,
                    _ => {}
                }
                None
            }
            Err(e) => {
                let reason = e.to_string();
                let event = if connected {
                    BrokerEvent::Closed { reason }
                } else {
                    BrokerEvent::ConnectFailed { reason }
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

    #[test]
    fn urls() {
        assert_eq!(
            BrokerConfig::parse_url("mqtt://127.0.0.1:1884"),
            Ok(("127.0.0.1".into(), 1884))
        );
        assert_eq!(BrokerConfig::parse_url("tcp://broker"), Ok(("broker".into(), 1883)));
        assert_eq!(BrokerConfig::parse_url("localhost:99"), Ok(("localhost".into(), 99)));
        assert_eq!(BrokerConfig::parse_url("mqtt://[::1]:1883"), Ok(("::1".into(), 1883)));
        assert!(BrokerConfig::parse_url("mqtts://x:1").is_err());
        assert!(BrokerConfig::parse_url("mqtt://x:port").is_err());
        assert!(BrokerConfig::parse_url("mqtt://:1").is_err());
    }
}
