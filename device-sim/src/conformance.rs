//! The conformance suite: named protocol checks run against any MQTT-SN gateway over UDP,
//! with an MQTT subscriber and publisher on the gateway's broker to see the other side.
//! Each check reports pass, fail or not supported.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event as MqttEvent, Packet as MqttPacket};
use serde::Serialize;
use sn_codec::client::{Client, Config, Event, Will};
use sn_codec::{Connect, Packet, QoS, ReturnCode, TopicFilter, TopicRef};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::device::{Device, Received};
use crate::radio::LinkModel;
use crate::station::{now_ms, Station};
use crate::tools::{self, Common};
use crate::verifier::BrokerUrl;

/// What to check and where.
#[derive(Debug, Clone)]
pub struct ConformanceOptions {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// The broker the gateway uses.
    pub broker: BrokerUrl,
    /// A predefined topic the gateway is configured with, `(id, name)`; without one the
    /// predefined-topic check is reported as not supported.
    pub predefined: Option<(u16, String)>,
    /// How long to wait for each expected answer.
    pub timeout: Duration,
    /// Run only the checks whose names contain one of these (all when empty).
    pub only: Vec<String>,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The gateway behaved as the specification says.
    Pass,
    /// It did not.
    Fail,
    /// The gateway does not offer the feature (or the check cannot run here).
    NotSupported,
}

/// One check's report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Name.
    pub name: &'static str,
    /// What it checks.
    pub description: &'static str,
    /// The outcome.
    pub outcome: Outcome,
    /// Why it failed or is not supported, or a note.
    pub detail: String,
    /// How long it took.
    pub millis: u64,
}

/// The checks, in the order they run: name and description.
pub const CHECKS: &[(&str, &str)] = &[
    (
        "connect",
        "CONNECT is answered by CONNACK accepted; DISCONNECT by DISCONNECT",
    ),
    ("register", "REGISTER is answered by REGACK with a usable topic id"),
    (
        "publish-qos0",
        "a QoS 0 PUBLISH to a registered topic reaches the broker",
    ),
    ("publish-qos1", "a QoS 1 PUBLISH is acknowledged and reaches the broker"),
    (
        "publish-qos2",
        "a QoS 2 PUBLISH completes (PUBREC/PUBREL/PUBCOMP) and reaches the broker once",
    ),
    (
        "publish-qos-minus-one",
        "a QoS -1 PUBLISH to a short topic, without connecting, reaches the broker",
    ),
    (
        "short-topic",
        "a QoS 1 PUBLISH to a two-character short topic reaches the broker under that name",
    ),
    (
        "predefined-topic",
        "a QoS 1 PUBLISH to a predefined topic id reaches the broker under its name",
    ),
    (
        "subscribe-qos0",
        "a broker message at QoS 0 reaches a device subscribed by name",
    ),
    (
        "subscribe-qos1",
        "a broker message at QoS 1 reaches a device subscribed by name",
    ),
    (
        "subscribe-qos2",
        "a broker message at QoS 2 reaches a device subscribed by name, once",
    ),
    (
        "wildcard",
        "a '+' subscription: the gateway REGISTERs the topic, then delivers the message",
    ),
    (
        "retained",
        "a retained message reaches a device that subscribes afterwards, with RETAIN set",
    ),
    (
        "will",
        "will handshake on CONNECT; a client silent past 1.5 x keep-alive gets its will published",
    ),
    (
        "sleep-and-wake",
        "a message for a sleeping device is held and delivered when it wakes with PINGREQ",
    ),
    ("discovery", "SEARCHGW is answered by GWINFO"),
    (
        "hostile-input",
        "malformed datagrams are ignored and the gateway still serves the sender",
    ),
];

/// A message seen by the observer.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    payload: Vec<u8>,
}

/// The broker side: an MQTT subscriber and publisher.
struct Observer {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Seen>,
    subacks: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Observer {
    async fn start(broker: &BrokerUrl, id: String) -> Result<Observer, String> {
        let mut o = broker.options(id);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(16);
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let (ack_tx, mut subacks) = watch::channel(0u64);
        let (conn_tx, mut connected) = watch::channel(None::<Result<(), String>>);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(MqttPacket::Publish(p))) => {
                        let _ = msg_tx.send(Seen {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        });
                    }
                    Ok(MqttEvent::Incoming(MqttPacket::ConnAck(_))) => {
                        let _ = conn_tx.send(Some(Ok(())));
                    }
                    Ok(MqttEvent::Incoming(MqttPacket::SubAck(_))) => ack_tx.send_modify(|n| *n += 1),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = conn_tx.send(Some(Err(e.to_string())));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let r = tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| c.is_some())).await;
        let state = match r {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        match state {
            Some(Ok(())) => {
                subacks.mark_unchanged();
                Ok(Observer {
                    client,
                    messages,
                    subacks,
                    task,
                })
            }
            Some(Err(e)) => {
                task.abort();
                Err(format!(
                    "cannot connect to the broker {}:{}: {e}",
                    broker.host, broker.port
                ))
            }
            None => {
                task.abort();
                Err(format!("the broker {}:{} did not answer", broker.host, broker.port))
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        let before = *self.subacks.borrow();
        self.client
            .subscribe(filter, rumqttc::QoS::ExactlyOnce)
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(5), self.subacks.wait_for(|n| *n > before))
            .await
            .map_err(|_| format!("the broker did not acknowledge the observer's subscription to {filter}"))?
            .map_err(|_| "observer stopped".to_string())?;
        Ok(())
    }

    async fn publish(&self, topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Result<(), String> {
        let q = match qos {
            QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
            QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
            _ => rumqttc::QoS::AtMostOnce,
        };
        self.client
            .publish(topic, q, retain, payload.to_vec())
            .await
            .map_err(|e| e.to_string())
    }

    /// The next message on `topic` within `timeout` (others are dropped).
    async fn expect(&mut self, topic: &str, timeout: Duration) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(m)) if m.topic == topic => return Some(m),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }

    async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

struct Ctx {
    opts: ConformanceOptions,
    run: u32,
    n: u32,
    observer: Observer,
}

type CheckResult = Result<(Outcome, String), String>;

fn pass() -> CheckResult {
    Ok((Outcome::Pass, String::new()))
}

impl Ctx {
    fn common(&mut self) -> Common {
        self.n += 1;
        Common {
            gateway: self.opts.gateway,
            client_id: format!("cf-{:08x}-{}", self.run, self.n),
            keep_alive: 30,
            timeout: self.opts.timeout,
            t_retry_ms: 1_000,
            n_retry: 3,
        }
    }

    fn topic(&self, check: &str) -> String {
        format!("conformance/{:08x}/{check}", self.run)
    }

    fn short_name(&self, salt: u32) -> [u8; 2] {
        let x = self.run.wrapping_add(salt);
        [b'a' + (x % 26) as u8, b'a' + ((x / 26) % 26) as u8]
    }
}

fn local_for(gateway: SocketAddr) -> SocketAddr {
    match gateway {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

async fn device<'a>(common: &Common, config: Config<'a>) -> Result<Device<'a>, String> {
    let station = Station::bind(
        local_for(common.gateway),
        common.gateway,
        LinkModel::PERFECT,
        SmallRng::seed_from_u64(0),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Device::new(Client::new(config), station))
}

fn deadline(common: &Common) -> u64 {
    now_ms() + u64::try_from(common.timeout.as_millis()).unwrap_or(u64::MAX)
}

async fn connected<'a>(common: &'a Common) -> Result<Device<'a>, String> {
    let mut dev = device(common, common.config(&[])).await?;
    tools::connect(&mut dev, common).await.map_err(|e| e.to_string())?;
    Ok(dev)
}

async fn register(dev: &mut Device<'_>, common: &Common, name: &str) -> Result<u16, String> {
    let msg_id = dev.client.register(now_ms(), name).map_err(|e| e.to_string())?;
    tools::outcome(
        dev,
        common,
        "REGISTER",
        |e| match e {
            Event::Registered { msg_id: m, topic_id } if m == msg_id => Some(topic_id),
            _ => None,
        },
        &mut tools::ignore,
    )
    .await
    .map_err(|e| e.to_string())
}

async fn publish_acked(
    dev: &mut Device<'_>,
    common: &Common,
    topic: TopicRef,
    payload: &[u8],
    qos: QoS,
    retain: bool,
) -> Result<(), String> {
    let msg_id = dev
        .client
        .publish(now_ms(), topic, payload, qos, retain)
        .map_err(|e| e.to_string())?;
    if matches!(qos, QoS::AtLeastOnce | QoS::ExactlyOnce) {
        tools::outcome(
            dev,
            common,
            "PUBLISH",
            |e| matches!(e, Event::Published { msg_id: m } if m == msg_id).then_some(()),
            &mut tools::ignore,
        )
        .await
        .map_err(|e| e.to_string())?;
    } else {
        dev.flush().await;
    }
    Ok(())
}

async fn subscribe(dev: &mut Device<'_>, common: &Common, filter: TopicFilter<'_>, qos: QoS) -> Result<(), String> {
    let msg_id = dev.client.subscribe(now_ms(), filter, qos).map_err(|e| e.to_string())?;
    tools::outcome(
        dev,
        common,
        "SUBSCRIBE",
        |e| matches!(e, Event::Subscribed { msg_id: m, .. } if m == msg_id).then_some(()),
        &mut tools::ignore,
    )
    .await
    .map_err(|e| e.to_string())
}

/// A message a device received, copied out.
#[derive(Debug, Clone)]
struct Got {
    topic: Option<String>,
    payload: Vec<u8>,
    retain: bool,
}

/// Steps the device until `until` (ms), collecting received messages; stops early once
/// `want` messages arrived.
async fn collect(dev: &mut Device<'_>, until: u64, want: usize) -> Vec<Got> {
    let mut got = Vec::new();
    while got.len() < want {
        let mut on = |r: Received<'_>| {
            got.push(Got {
                topic: r.topic.map(str::to_string),
                payload: r.message.payload.to_vec(),
                retain: r.message.retain,
            })
        };
        if dev.step(Some(until), &mut on).await == crate::device::Step::Deadline {
            break;
        }
        while dev.poll_event().is_some() {}
    }
    got
}

async fn check_connect(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let mut dev = connected(&common).await?;
    dev.client.disconnect(now_ms()).map_err(|e| e.to_string())?;
    tools::outcome(
        &mut dev,
        &common,
        "DISCONNECT",
        |e| (e == Event::Disconnected).then_some(()),
        &mut tools::ignore,
    )
    .await
    .map_err(|e| format!("DISCONNECT not answered: {e}"))?;
    pass()
}

async fn check_register(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let topic = ctx.topic("register");
    let mut dev = connected(&common).await?;
    let id = register(&mut dev, &common, &topic).await?;
    tools::disconnect(&mut dev, &common).await;
    if id == 0 || id == 0xFFFF {
        return Ok((
            Outcome::Fail,
            format!("REGACK accepted with the reserved topic id {id:#06x}"),
        ));
    }
    Ok((Outcome::Pass, format!("topic id {id}")))
}

async fn check_publish(ctx: &mut Ctx, qos: QoS) -> CheckResult {
    let common = ctx.common();
    let topic = ctx.topic(&format!("publish-{}", qos.bits()));
    ctx.observer.subscribe(&topic).await?;
    let mut dev = connected(&common).await?;
    let id = register(&mut dev, &common, &topic).await?;
    let payload = format!("qos {}", qos.bits());
    publish_acked(&mut dev, &common, TopicRef::Normal(id), payload.as_bytes(), qos, false).await?;
    let seen = ctx.observer.expect(&topic, common.timeout).await;
    let dup = if qos == QoS::ExactlyOnce {
        ctx.observer.expect(&topic, Duration::from_millis(500)).await
    } else {
        None
    };
    tools::disconnect(&mut dev, &common).await;
    match seen {
        None => Ok((Outcome::Fail, "the message did not reach the broker".into())),
        Some(m) if m.payload != payload.as_bytes() => Ok((Outcome::Fail, "the payload changed".into())),
        Some(_) if dup.is_some() => Ok((Outcome::Fail, "the QoS 2 message reached the broker twice".into())),
        Some(_) => pass(),
    }
}

async fn check_minus_one(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let short = ctx.short_name(1);
    let name = String::from_utf8_lossy(&short).into_owned();
    ctx.observer.subscribe(&name).await?;
    let mut dev = device(&common, common.config(&[])).await?;
    let payload = format!("qos -1 {:08x}", ctx.run);
    dev.client
        .publish(
            now_ms(),
            TopicRef::Short(short),
            payload.as_bytes(),
            QoS::MinusOne,
            false,
        )
        .map_err(|e| e.to_string())?;
    dev.flush().await;
    let deadline = tokio::time::Instant::now() + common.timeout;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, ctx.observer.expect(&name, common.timeout)).await {
        if m.payload == payload.as_bytes() {
            return pass();
        }
    }
    Ok((
        Outcome::NotSupported,
        format!("nothing reached the broker on {name:?}: QoS -1 is not accepted (or the datagram was lost)"),
    ))
}

/// Publishes `payload` at QoS 1 on `topic`, disconnects, and passes when the observer
/// (already subscribed to `name`) sees it at the broker.
async fn publish_qos1_then_seen(
    ctx: &mut Ctx,
    dev: &mut Device<'_>,
    common: &Common,
    topic: TopicRef,
    name: &str,
    payload: &str,
) -> CheckResult {
    let r = publish_acked(dev, common, topic, payload.as_bytes(), QoS::AtLeastOnce, false).await;
    tools::disconnect(dev, common).await;
    if let Err(e) = r {
        return Ok((Outcome::Fail, e));
    }
    let deadline = tokio::time::Instant::now() + common.timeout;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, ctx.observer.expect(name, common.timeout)).await {
        if m.payload == payload.as_bytes() {
            return pass();
        }
    }
    Ok((
        Outcome::Fail,
        format!("acknowledged, but nothing reached the broker on {name:?}"),
    ))
}

async fn check_short(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let short = ctx.short_name(2);
    let name = String::from_utf8_lossy(&short).into_owned();
    ctx.observer.subscribe(&name).await?;
    let mut dev = connected(&common).await?;
    let payload = format!("short {:08x}", ctx.run);
    publish_qos1_then_seen(ctx, &mut dev, &common, TopicRef::Short(short), &name, &payload).await
}

async fn check_predefined(ctx: &mut Ctx) -> CheckResult {
    let Some((id, name)) = ctx.opts.predefined.clone() else {
        return Ok((
            Outcome::NotSupported,
            "give the gateway's predefined topic with --predefined ID=TOPIC to run it".into(),
        ));
    };
    let common = ctx.common();
    ctx.observer.subscribe(&name).await?;
    let table = [(id, name.as_str())];
    let mut dev = device(&common, common.config(&table)).await?;
    tools::connect(&mut dev, &common).await.map_err(|e| e.to_string())?;
    let payload = format!("predefined {:08x}", ctx.run);
    publish_qos1_then_seen(ctx, &mut dev, &common, TopicRef::Predefined(id), &name, &payload).await
}

async fn check_subscribe(ctx: &mut Ctx, qos: QoS) -> CheckResult {
    let common = ctx.common();
    let topic = ctx.topic(&format!("subscribe-{}", qos.bits()));
    let mut dev = connected(&common).await?;
    subscribe(&mut dev, &common, TopicFilter::Name(&topic), qos).await?;
    let payload = format!("down qos {}", qos.bits());
    ctx.observer.publish(&topic, payload.as_bytes(), qos, false).await?;
    let got = collect(&mut dev, deadline(&common), 1).await;
    let more = if qos == QoS::ExactlyOnce {
        collect(&mut dev, now_ms() + 500, 1).await
    } else {
        Vec::new()
    };
    tools::disconnect(&mut dev, &common).await;
    match got.first() {
        None => Ok((Outcome::Fail, "the device received nothing".into())),
        Some(g) if g.payload != payload.as_bytes() => Ok((Outcome::Fail, "the payload changed".into())),
        Some(g) if g.topic.as_deref() != Some(&topic) => Ok((
            Outcome::Fail,
            format!("delivered on a topic the device cannot name ({:?})", g.topic),
        )),
        Some(_) if !more.is_empty() => Ok((Outcome::Fail, "the QoS 2 message was delivered twice".into())),
        Some(_) => pass(),
    }
}

async fn check_wildcard(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let base = ctx.topic("wildcard");
    let filter = format!("{base}/+");
    let topic = format!("{base}/a");
    let mut dev = connected(&common).await?;
    subscribe(&mut dev, &common, TopicFilter::Name(&filter), QoS::AtLeastOnce).await?;
    ctx.observer.publish(&topic, b"wild", QoS::AtLeastOnce, false).await?;
    let got = collect(&mut dev, deadline(&common), 1).await;
    tools::disconnect(&mut dev, &common).await;
    match got.first() {
        None => Ok((Outcome::Fail, "the device received nothing".into())),
        Some(g) if g.topic.as_deref() != Some(&topic) => Ok((
            Outcome::Fail,
            format!(
                "delivered without a REGISTER of {topic:?} first (the device names it {:?})",
                g.topic
            ),
        )),
        Some(_) => pass(),
    }
}

async fn check_retained(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let topic = ctx.topic("retained");
    ctx.observer.publish(&topic, b"kept", QoS::AtLeastOnce, true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut dev = connected(&common).await?;
    subscribe(&mut dev, &common, TopicFilter::Name(&topic), QoS::AtLeastOnce).await?;
    let got = collect(&mut dev, deadline(&common), 1).await;
    tools::disconnect(&mut dev, &common).await;
    // Clear the retained message.
    let _ = ctx.observer.publish(&topic, b"", QoS::AtLeastOnce, true).await;
    match got.first() {
        None => Ok((Outcome::Fail, "the retained message was not delivered".into())),
        Some(g) if g.payload != b"kept" => Ok((Outcome::Fail, "the payload changed".into())),
        Some(g) if !g.retain => Ok((Outcome::Fail, "delivered without the RETAIN flag".into())),
        Some(_) => pass(),
    }
}

async fn check_will(ctx: &mut Ctx) -> CheckResult {
    let mut common = ctx.common();
    common.keep_alive = 1;
    let will_topic = ctx.topic("will");
    ctx.observer.subscribe(&will_topic).await?;
    let config = Config {
        will: Some(Will {
            topic: &will_topic,
            message: b"gone",
            qos: QoS::AtLeastOnce,
            retain: false,
        }),
        ..common.config(&[])
    };
    let mut dev = device(&common, config).await?;
    tools::connect(&mut dev, &common)
        .await
        .map_err(|e| format!("CONNECT with a will: {e}"))?;
    // Go silent: no PINGREQ, no DISCONNECT.
    drop(dev);
    let wait = Duration::from_millis(1_500) + common.timeout;
    match ctx.observer.expect(&will_topic, wait).await {
        Some(m) if m.payload == b"gone" => pass(),
        Some(_) => Ok((Outcome::Fail, "the will message changed".into())),
        None => Ok((
            Outcome::Fail,
            format!("no will published within {wait:?} of the client going silent (keep-alive 1 s)"),
        )),
    }
}

async fn check_sleep(ctx: &mut Ctx) -> CheckResult {
    let common = ctx.common();
    let topic = ctx.topic("sleep");
    let mut dev = connected(&common).await?;
    subscribe(&mut dev, &common, TopicFilter::Name(&topic), QoS::AtLeastOnce).await?;
    dev.client.sleep(now_ms(), 3).map_err(|e| e.to_string())?;
    tools::outcome(
        &mut dev,
        &common,
        "DISCONNECT with a duration",
        |e| (e == Event::Asleep).then_some(()),
        &mut tools::ignore,
    )
    .await
    .map_err(|e| e.to_string())?;
    ctx.observer
        .publish(&topic, b"while asleep", QoS::AtLeastOnce, false)
        .await?;
    // Asleep: the radio is off. Let the message reach the gateway, then wake.
    tokio::time::sleep(Duration::from_millis(500)).await;
    dev.client.wake(now_ms()).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let end = deadline(&common);
    let woke = loop {
        let mut on = |r: Received<'_>| got.push(r.message.payload.to_vec());
        if dev.step(Some(end), &mut on).await == crate::device::Step::Deadline {
            break false;
        }
        let mut asleep = false;
        while let Some(e) = dev.poll_event() {
            asleep |= e == Event::Asleep;
        }
        if asleep {
            break true;
        }
    };
    tools::disconnect(&mut dev, &common).await;
    if !woke {
        return Ok((Outcome::Fail, "the waking PINGREQ got no PINGRESP".into()));
    }
    if got.iter().any(|p| p == b"while asleep") {
        pass()
    } else {
        Ok((Outcome::Fail, "PINGRESP came without the held message".into()))
    }
}

async fn raw_socket(gateway: SocketAddr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind(local_for(gateway)).await.map_err(|e| e.to_string())?;
    s.connect(gateway).await.map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends `request` (encoded) up to three times, each time waiting a third of `timeout` for
/// an answer that `pick` accepts. `None` when none came.
async fn ask<T>(
    sock: &UdpSocket,
    request: &Packet<'_>,
    timeout: Duration,
    mut pick: impl FnMut(Packet<'_>) -> Option<T>,
) -> Result<Option<T>, String> {
    let mut buf = [0u8; 64];
    let n = request.encode(&mut buf).map_err(|e| format!("{e:?}"))?;
    let mut answer = [0u8; 512];
    for _ in 0..3 {
        sock.send(buf.get(..n).unwrap_or(&[]))
            .await
            .map_err(|e| e.to_string())?;
        let end = tokio::time::Instant::now() + timeout / 3;
        while let Ok(Ok(len)) = tokio::time::timeout_at(end, sock.recv(&mut answer)).await {
            if let Some(t) = Packet::decode(answer.get(..len).unwrap_or(&[]))
                .ok()
                .and_then(&mut pick)
            {
                return Ok(Some(t));
            }
        }
    }
    Ok(None)
}

async fn check_discovery(ctx: &mut Ctx) -> CheckResult {
    let sock = raw_socket(ctx.opts.gateway).await?;
    let gw_id = ask(&sock, &Packet::SearchGw { radius: 1 }, ctx.opts.timeout, |p| match p {
        Packet::GwInfo(g) => Some(g.gw_id),
        _ => None,
    })
    .await?;
    Ok(match gw_id {
        Some(id) => (Outcome::Pass, format!("gateway id {id}")),
        None => (
            Outcome::NotSupported,
            "no GWINFO in answer to a unicast SEARCHGW (the gateway may answer by broadcast only)".into(),
        ),
    })
}

async fn check_hostile(ctx: &mut Ctx) -> CheckResult {
    let sock = raw_socket(ctx.opts.gateway).await?;
    let garbage: [&[u8]; 8] = [
        &[],
        &[0x00],
        &[0x05, 0x04],
        &[0x01, 0x00, 0x00],
        &[0x01, 0xFF, 0xFF, 0x0C, 0x00],
        &[0x10, 0x0C, 0x62, 0x00, 0x01],
        &[0x03, 0xEE, 0x00],
        &[0xFF; 300],
    ];
    for g in garbage {
        let _ = sock.send(g).await;
    }
    let id = format!("cf-{:08x}-hostile", ctx.run);
    let connect = Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 30,
        client_id: &id,
    });
    let code = ask(&sock, &connect, ctx.opts.timeout, |p| match p {
        Packet::ConnAck(code) => Some(code),
        _ => None,
    })
    .await?;
    Ok(match code {
        Some(ReturnCode::Accepted) => {
            let mut d = [0u8; 8];
            if let Ok(n) = Packet::Disconnect(None).encode(&mut d) {
                let _ = sock.send(d.get(..n).unwrap_or(&[])).await;
            }
            (Outcome::Pass, String::new())
        }
        Some(code) => (Outcome::Fail, format!("CONNECT after garbage refused: {code:?}")),
        None => (
            Outcome::Fail,
            "no CONNACK to a valid CONNECT sent after malformed datagrams".into(),
        ),
    })
}

async fn run_check(ctx: &mut Ctx, name: &str) -> CheckResult {
    match name {
        "connect" => check_connect(ctx).await,
        "register" => check_register(ctx).await,
        "publish-qos0" => check_publish(ctx, QoS::AtMostOnce).await,
        "publish-qos1" => check_publish(ctx, QoS::AtLeastOnce).await,
        "publish-qos2" => check_publish(ctx, QoS::ExactlyOnce).await,
        "publish-qos-minus-one" => check_minus_one(ctx).await,
        "short-topic" => check_short(ctx).await,
        "predefined-topic" => check_predefined(ctx).await,
        "subscribe-qos0" => check_subscribe(ctx, QoS::AtMostOnce).await,
        "subscribe-qos1" => check_subscribe(ctx, QoS::AtLeastOnce).await,
        "subscribe-qos2" => check_subscribe(ctx, QoS::ExactlyOnce).await,
        "wildcard" => check_wildcard(ctx).await,
        "retained" => check_retained(ctx).await,
        "will" => check_will(ctx).await,
        "sleep-and-wake" => check_sleep(ctx).await,
        "discovery" => check_discovery(ctx).await,
        "hostile-input" => check_hostile(ctx).await,
        other => Err(format!("unknown check {other}")),
    }
}

/// Runs the checks in order. Fails only when the broker cannot be reached.
pub async fn run(opts: ConformanceOptions) -> Result<Vec<CheckReport>, String> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    let observer = Observer::start(&opts.broker, format!("mqtt-sn-conformance-{run:08x}")).await?;
    let mut ctx = Ctx {
        opts,
        run,
        n: 0,
        observer,
    };
    let mut reports = Vec::new();
    for (name, description) in CHECKS {
        if !ctx.opts.only.is_empty() && !ctx.opts.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let started = Instant::now();
        let (outcome, detail) = match run_check(&mut ctx, name).await {
            Ok(r) => r,
            Err(e) => (Outcome::Fail, e),
        };
        reports.push(CheckReport {
            name,
            description,
            outcome,
            detail,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
    ctx.observer.stop().await;
    Ok(reports)
}

/// The results as a table for people.
pub fn table(reports: &[CheckReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = reports.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in reports {
        let verdict = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::NotSupported => "not supported",
        };
        let _ = write!(out, "{:<13} {:<w$} {:>6} ms", verdict, r.name, r.millis);
        if !r.detail.is_empty() {
            let _ = write!(out, "  {}", r.detail);
        }
        out.push('\n');
    }
    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    let _ = writeln!(
        out,
        "{} passed, {} failed, {} not supported",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::NotSupported)
    );
    out
}
