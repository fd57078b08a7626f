//! Serial links end to end: devices on pseudo-terminal pairs made by each test speak
//! MQTT-SN through the gateway's serial transport to a real broker (Debian's
//! `mosquitto`, started by the test on a free loopback port).
//!
//! Without mosquitto a broker test prints a note and returns, except under `CI=true`,
//! where it fails. `RUST_LOG=gateway=debug` shows the gateway's log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{free_port, init_logging, Mosquitto};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::Settings;
use gateway::engine::EngineConfig;
use gateway::runtime::Running;
use gateway::topics::Predefined;
use gateway::transport::serial::{SerialPortConfig, SerialPortStats};
use rumqttc::{AsyncClient, Event, MqttOptions};
use sn_codec::framing::{encode_frame, max_encoded_len, FrameDecoder, FramingKind};
use sn_codec::{
    Advertise, Connect, GwInfo, Packet, PubAck, Publish, QoS, RegAck, Register, ReturnCode, SubAck, Subscribe,
    TopicFilter, TopicRef, WillTopic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_serial::{SerialPort, SerialStream};

/// How long anything may take before a test fails.
const WAIT: Duration = Duration::from_secs(15);
/// The predefined topic of these tests.
const PREDEFINED: u16 = 77;

fn unique() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sn-gw-serial-{what}-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

// ---- mosquitto -------------------------------------------------------------------

// ---- a broker-side MQTT client -----------------------------------------------------

struct Observer {
    client: AsyncClient,
    msgs: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subacks: mpsc::UnboundedReceiver<()>,
}

impl Observer {
    async fn subscribed(broker: SocketAddr, filter: &str) -> Observer {
        let mut o = MqttOptions::new(format!("observer-{}", unique()), broker.ip().to_string(), broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = msg_tx.send((p.topic, p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let mut obs = Observer { client, msgs, subacks };
        timeout(WAIT, obs.subacks.recv())
            .await
            .expect("SUBACK from the broker")
            .expect("observer running");
        obs
    }

    async fn next(&mut self) -> (String, Vec<u8>) {
        timeout(WAIT, self.msgs.recv())
            .await
            .expect("a message at the broker")
            .expect("observer running")
    }

    async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish queued");
    }
}

// ---- a device on a pseudo terminal -----------------------------------------------

/// The device end of a pty pair; the gateway opens the other end by its path. The
/// slave handle is kept open so that the line stays up while the gateway (re)opens it.
struct Device {
    master: SerialStream,
    _slave: SerialStream,
    path: PathBuf,
    framing: FramingKind,
    decoder: Box<FrameDecoder<4096>>,
    frames: VecDeque<Vec<u8>>,
}

fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len()];
    let n = p.encode(&mut buf).expect("encodes");
    buf.truncate(n);
    buf
}

fn encapsulated(node: &[u8], p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len() + node.len() + 3];
    let n = sn_codec::encode_encapsulated(0, node, p, &mut buf).expect("encodes");
    buf.truncate(n);
    buf
}

fn frame(framing: FramingKind, message: &[u8]) -> Vec<u8> {
    let mut out = vec![0; max_encoded_len(framing, message.len())];
    let n = encode_frame(framing, message, &mut out).expect("frames");
    out.truncate(n);
    out
}

impl Device {
    fn new(framing: FramingKind) -> Device {
        let (master, slave) = SerialStream::pair().expect("a pty pair");
        let path = PathBuf::from(slave.name().expect("the pty has a name"));
        Device {
            master,
            _slave: slave,
            path,
            framing,
            decoder: Box::new(FrameDecoder::new(framing)),
            frames: VecDeque::new(),
        }
    }

    fn port(&self) -> SerialPortConfig {
        SerialPortConfig {
            framing: self.framing,
            ..SerialPortConfig::new(&self.path)
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).await.expect("pty write");
    }

    async fn send_message(&mut self, message: &[u8]) {
        let f = frame(self.framing, message);
        self.write(&f).await;
    }

    async fn send(&mut self, p: &Packet<'_>) {
        self.send_message(&encode(p)).await;
    }

    /// The next message from the gateway.
    async fn recv(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 1024];
        loop {
            if let Some(f) = self.frames.pop_front() {
                return f;
            }
            let n = tokio::time::timeout_at(deadline, self.master.read(&mut buf))
                .await
                .expect("a message from the gateway in time")
                .expect("pty read");
            let frames = &mut self.frames;
            self.decoder.feed(&buf[..n], |f| frames.push_back(f.to_vec()));
        }
    }

    /// Waits for the first message `pick` accepts, skipping others (ADVERTISE, ...).
    async fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(Packet<'_>) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} from the gateway"));
            let p = Packet::decode(&m).expect("the gateway sends valid messages");
            if let Some(t) = pick(p) {
                return t;
            }
        }
    }

    async fn connect(&mut self, client_id: &str) {
        self.send(&Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id,
        }))
        .await;
        let code = self
            .expect("CONNACK", |p| match p {
                Packet::ConnAck(c) => Some(c),
                _ => None,
            })
            .await;
        assert_eq!(code, ReturnCode::Accepted);
    }

    async fn register(&mut self, topic: &str, msg_id: u16) -> u16 {
        self.send(&Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name: topic,
        }))
        .await;
        self.expect("REGACK", |p| match p {
            Packet::RegAck(RegAck {
                topic_id,
                msg_id: m,
                code: ReturnCode::Accepted,
            }) if m == msg_id => Some(topic_id),
            _ => None,
        })
        .await
    }

    async fn publish_qos1(&mut self, topic: TopicRef, msg_id: u16, data: &[u8]) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            msg_id,
            data,
        }))
        .await;
        let code = self
            .expect("PUBACK", |p| match p {
                Packet::PubAck(PubAck { msg_id: m, code, .. }) if m == msg_id => Some(code),
                _ => None,
            })
            .await;
        assert_eq!(code, ReturnCode::Accepted);
    }

    async fn subscribe(&mut self, filter: &str, msg_id: u16) -> u16 {
        self.send(&Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtLeastOnce,
            msg_id,
            topic: TopicFilter::Name(filter),
        }))
        .await;
        self.expect("SUBACK", |p| match p {
            Packet::SubAck(SubAck {
                topic_id,
                msg_id: m,
                code: ReturnCode::Accepted,
                ..
            }) if m == msg_id => Some(topic_id),
            _ => None,
        })
        .await
    }

    /// Waits for a QoS 1 PUBLISH on `topic_id`, acknowledges it, returns its payload.
    async fn receive_qos1(&mut self, topic_id: u16) -> Vec<u8> {
        let (msg_id, data) = self
            .expect("PUBLISH", |p| match p {
                Packet::Publish(p) if p.topic == TopicRef::Normal(topic_id) => Some((p.msg_id, p.data.to_vec())),
                _ => None,
            })
            .await;
        self.send(&Packet::PubAck(PubAck {
            topic_id,
            msg_id,
            code: ReturnCode::Accepted,
        }))
        .await;
        data
    }
}

// ---- the gateway -----------------------------------------------------------------

fn engine_config() -> EngineConfig {
    EngineConfig {
        advertise_interval: None,
        predefined: Arc::new(Predefined::new([(PREDEFINED, "coord/data".to_string())]).expect("predefined")),
        ..EngineConfig::default()
    }
}

async fn start_gateway(broker: SocketAddr, engine: EngineConfig, serial: Vec<SerialPortConfig>) -> Running {
    init_logging();
    let settings = Settings {
        engine,
        udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        broker: BrokerConfig {
            host: broker.ip().to_string(),
            port: broker.port(),
            ..BrokerConfig::default()
        },
        stats_interval: None,
        serial,
        ..Settings::default()
    };
    gateway::runtime::start(settings).await.expect("the gateway starts")
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn port_stats(gw: &Running, i: usize) -> SerialPortStats {
    gw.serial_stats()[i].clone()
}

async fn wait_open(gw: &Running, i: usize) {
    wait_for("the serial port to open", || port_stats(gw, i).open).await;
}

// ---- tests -------------------------------------------------------------------------

/// A device with the default (COBS) framing: connect, QoS 1 publish that reaches an
/// MQTT subscriber, subscribe and receive what an MQTT client publishes.
async fn pubsub_over_serial(framing: FramingKind) {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let mut dev = Device::new(framing);
    let gw = start_gateway(mosquitto.addr(), engine_config(), vec![dev.port()]).await;
    wait_open(&gw, 0).await;
    let mut obs = Observer::subscribed(mosquitto.addr(), "serial/#").await;

    let id = format!("dev-{framing}");
    dev.connect(&id).await;
    let temp = dev.register("serial/temp", 1).await;
    dev.publish_qos1(TopicRef::Normal(temp), 2, b"21.5").await;
    assert_eq!(obs.next().await, ("serial/temp".to_string(), b"21.5".to_vec()));

    let cmd = dev.subscribe("serial/cmd", 3).await;
    obs.publish("serial/cmd", b"on").await;
    assert_eq!(dev.receive_qos1(cmd).await, b"on");

    dev.send(&Packet::Disconnect(None)).await;
    dev.expect("DISCONNECT", |p| matches!(p, Packet::Disconnect(None)).then_some(()))
        .await;
    wait_for("the port counters", || {
        let s = port_stats(&gw, 0);
        s.frames_in == 6 && s.frames_out == 6
    })
    .await;
    let s = port_stats(&gw, 0);
    assert_eq!((s.frames_dropped(), s.noise_bytes, s.send_dropped), (0, 0, 0), "{s:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cobs_device_connects_publishes_and_subscribes() {
    pubsub_over_serial(FramingKind::Cobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_framing_device_connects_publishes_and_subscribes() {
    pubsub_over_serial(FramingKind::Raw).await;
}

/// Raw framing: a message cut short (a device reset mid-message) is dropped once the
/// line has been idle, instead of swallowing the start of the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_framing_drops_a_partial_message_after_an_idle_gap() {
    // No broker needed: SEARCHGW is answered by the gateway itself.
    let nobody = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let mut dev = Device::new(FramingKind::Raw);
    let engine = EngineConfig {
        gateway_id: 5,
        ..engine_config()
    };
    let gw = start_gateway(nobody, engine, vec![dev.port()]).await;
    wait_open(&gw, 0).await;
    // The first 4 octets of a 20-octet PUBLISH, then silence.
    dev.write(&[0x14, 0x0C, 0x00, 0x00]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.send(&Packet::SearchGw { radius: 0 }).await;
    dev.expect("GWINFO", |p| {
        (p == Packet::GwInfo(GwInfo { gw_id: 5, gw_addr: &[] })).then_some(())
    })
    .await;
    let s = port_stats(&gw, 0);
    assert_eq!((s.dropped_malformed, s.noise_bytes, s.frames_in), (1, 4, 1), "{s:?}");
    gw.shutdown().await;
}

/// Line noise between frames, and some frames corrupted on the wire: exactly the
/// corrupted frames are lost; every other message reaches the broker, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_noise_loses_only_the_corrupted_frames() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let mut dev = Device::new(FramingKind::Cobs);
    let gw = start_gateway(mosquitto.addr(), engine_config(), vec![dev.port()]).await;
    wait_open(&gw, 0).await;
    let mut obs = Observer::subscribed(mosquitto.addr(), "noisy/#").await;
    dev.connect("noisy").await;
    let topic = dev.register("noisy/data", 1).await;
    let before = port_stats(&gw, 0);

    // xorshift: reproducible noise.
    let mut x: u32 = 0x1234_5678;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut expected = Vec::new();
    let mut corrupted = 0u64;
    for i in 0..40u16 {
        let noise: Vec<u8> = (0..(rnd() % 24)).map(|_| (rnd() % 256) as u8).collect();
        dev.write(&noise).await;
        let payload = format!("m{i}");
        let message = encode(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicRef::Normal(topic),
            msg_id: 0,
            data: payload.as_bytes(),
        }));
        let mut f = frame(FramingKind::Cobs, &message);
        if i % 5 == 2 {
            // Flip bits of one octet inside the frame (never into a delimiter).
            let at = 2 + (rnd() as usize % (f.len() - 3));
            let flipped = f[at] ^ (1 << (rnd() % 8));
            f[at] = if flipped == 0 { f[at] ^ 0x81 } else { flipped };
            corrupted += 1;
        } else {
            expected.push(payload.into_bytes());
        }
        dev.write(&f).await;
    }
    dev.write(&[0x13, 0x00, 0x00, 0xFF, 0x42]).await;
    // A QoS 1 publish last: once it is acknowledged, everything before it was handled.
    dev.publish_qos1(TopicRef::Normal(topic), 99, b"end").await;
    expected.push(b"end".to_vec());

    let mut got = Vec::new();
    while got.len() < expected.len() {
        let (t, payload) = obs.next().await;
        assert_eq!(t, "noisy/data");
        got.push(payload);
    }
    assert_eq!(got, expected, "good frames arrive, in order; corrupted ones are lost");
    let s = port_stats(&gw, 0);
    let dropped = s.frames_dropped() - before.frames_dropped();
    assert!(
        dropped >= corrupted,
        "{corrupted} corrupted frames, {dropped} dropped: {s:?}"
    );
    assert!(s.noise_bytes > before.noise_bytes, "{s:?}");
    assert_eq!(gw.stats().metrics.malformed, 0, "nothing damaged reached the engine");
    gw.shutdown().await;
}

/// A radio coordinator on one UART forwards 50 wireless nodes, each encapsulated
/// (0xFE) with its own node id and client id: all connect and publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_forwards_fifty_encapsulated_nodes() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let mut coord = Device::new(FramingKind::Cobs);
    let gw = start_gateway(mosquitto.addr(), engine_config(), vec![coord.port()]).await;
    wait_open(&gw, 0).await;
    let mut obs = Observer::subscribed(mosquitto.addr(), "coord/data").await;
    const NODES: u16 = 50;
    let node_id = |i: u16| (0xA000 + i).to_be_bytes();

    // The coordinator relays what its nodes send, interleaved as the radio delivers it.
    for i in 0..NODES {
        let id = format!("node-{i}");
        let connect = Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: &id,
        });
        coord.send_message(&encapsulated(&node_id(i), &connect)).await;
    }
    let mut acked = BTreeSet::new();
    while acked.len() < usize::from(NODES) {
        let m = coord.recv().await;
        let Ok(Packet::Encapsulated(e)) = Packet::decode(&m) else {
            panic!("the gateway answers nodes encapsulated: {m:02x?}")
        };
        assert_eq!(Packet::decode(e.inner), Ok(Packet::ConnAck(ReturnCode::Accepted)));
        let i = u16::from_be_bytes(e.node_id.try_into().expect("2-octet node id")) - 0xA000;
        assert!(acked.insert(i), "one CONNACK per node");
    }
    for i in 0..NODES {
        let payload = format!("from node {i}");
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Predefined(PREDEFINED),
            msg_id: i + 1,
            data: payload.as_bytes(),
        });
        coord.send_message(&encapsulated(&node_id(i), &publish)).await;
    }
    let mut pubacks = HashMap::new();
    while pubacks.len() < usize::from(NODES) {
        let m = coord.recv().await;
        let Ok(Packet::Encapsulated(e)) = Packet::decode(&m) else {
            panic!("expected an encapsulated message")
        };
        let Ok(Packet::PubAck(a)) = Packet::decode(e.inner) else {
            panic!("expected PUBACK, got {:?}", Packet::decode(e.inner))
        };
        assert_eq!(a.code, ReturnCode::Accepted);
        let i = u16::from_be_bytes(e.node_id.try_into().expect("2-octet node id")) - 0xA000;
        assert_eq!(a.msg_id, i + 1, "each node's own PUBACK");
        pubacks.insert(i, a);
    }
    let mut payloads = BTreeSet::new();
    while payloads.len() < usize::from(NODES) {
        let (_, p) = obs.next().await;
        payloads.insert(String::from_utf8(p).expect("utf-8"));
    }
    assert_eq!(
        payloads,
        (0..NODES).map(|i| format!("from node {i}")).collect::<BTreeSet<_>>()
    );
    wait_for("50 sessions", || gw.stats().sessions == usize::from(NODES)).await;
    gw.shutdown().await;
}

/// ADVERTISE on the UDP advertise address and on serial; SEARCHGW answered by GWINFO
/// on the serial line, and over UDP to the asker and the advertise address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertise_and_searchgw_on_udp_and_serial() {
    // No broker needed: discovery does not involve it.
    let nobody = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let listener = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let advertise_addr = listener.local_addr().expect("addr");
    let mut dev = Device::new(FramingKind::Cobs);
    let engine = EngineConfig {
        gateway_id: 42,
        advertise_interval: Some(Duration::from_secs(1)),
        udp_broadcast: Some(advertise_addr),
        ..engine_config()
    };
    let gw = start_gateway(nobody, engine, vec![dev.port()]).await;
    let gw_udp = gw.udp_addrs[0];

    let mut buf = [0u8; 64];
    // Two ADVERTISEs about a second apart, from the gateway's UDP listener.
    let mut times = Vec::new();
    while times.len() < 2 {
        let (n, from) = timeout(WAIT, listener.recv_from(&mut buf))
            .await
            .expect("ADVERTISE on UDP")
            .expect("recv");
        assert_eq!(from, gw_udp);
        if let Ok(Packet::Advertise(a)) = Packet::decode(&buf[..n]) {
            assert_eq!(a, Advertise { gw_id: 42, duration: 1 });
            times.push(Instant::now());
        }
    }
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(400) && gap <= Duration::from_secs(3),
        "{gap:?}"
    );

    // On serial: one when the port comes up, then every period.
    for _ in 0..2 {
        let a = dev
            .expect("ADVERTISE on serial", |p| match p {
                Packet::Advertise(a) => Some(a),
                _ => None,
            })
            .await;
        assert_eq!(a.gw_id, 42);
        assert!(a.duration <= 1);
    }

    // SEARCHGW on serial: GWINFO on the same line.
    dev.send(&Packet::SearchGw { radius: 1 }).await;
    dev.expect("GWINFO on serial", |p| {
        (p == Packet::GwInfo(GwInfo {
            gw_id: 42,
            gw_addr: &[],
        }))
        .then_some(())
    })
    .await;

    // SEARCHGW over UDP: GWINFO to the asker and to the advertise address.
    let asker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    asker
        .send_to(&encode(&Packet::SearchGw { radius: 1 }), gw_udp)
        .await
        .expect("send");
    let gwinfo = encode(&Packet::GwInfo(GwInfo {
        gw_id: 42,
        gw_addr: &[],
    }));
    let (n, from) = timeout(WAIT, asker.recv_from(&mut buf))
        .await
        .expect("GWINFO to the asker")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&gwinfo[..], gw_udp));
    loop {
        let (n, _) = timeout(WAIT, listener.recv_from(&mut buf))
            .await
            .expect("GWINFO on the advertise address")
            .expect("recv");
        if buf[..n] == gwinfo[..] {
            break;
        }
    }
    wait_for("the discovery counters", || {
        let m = gw.stats().metrics;
        m.searchgw == 2 && m.advertisements >= 4
    })
    .await;
    gw.shutdown().await;
}

/// A port that vanishes (the adapter unplugged) loses its sessions, whose wills are
/// published; every other port is served meanwhile; once the port is back (the
/// symlink the gateway is configured with points at a new pty), devices connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_port_loses_its_clients_and_is_reopened() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let dir = temp_dir("link");
    let link = dir.join("ttyUSB0");
    let mut dev = Device::new(FramingKind::Cobs);
    std::os::unix::fs::symlink(&dev.path, &link).expect("symlink");
    let mut other = Device::new(FramingKind::Cobs);
    let ports = vec![SerialPortConfig::new(&link), other.port()];
    let gw = start_gateway(mosquitto.addr(), engine_config(), ports).await;
    wait_open(&gw, 0).await;
    wait_open(&gw, 1).await;
    let mut obs = Observer::subscribed(mosquitto.addr(), "wills/#").await;

    // A device with a will on the port that will vanish; another on the other port.
    dev.send(&Packet::Connect(Connect {
        will: true,
        clean_session: true,
        duration: 60,
        client_id: "unplugged",
    }))
    .await;
    dev.expect("WILLTOPICREQ", |p| (p == Packet::WillTopicReq).then_some(()))
        .await;
    dev.send(&Packet::WillTopic(Some(WillTopic {
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "wills/unplugged",
    })))
    .await;
    dev.expect("WILLMSGREQ", |p| (p == Packet::WillMsgReq).then_some(()))
        .await;
    dev.send(&Packet::WillMsg(b"adapter gone")).await;
    dev.expect("CONNACK", |p| {
        (p == Packet::ConnAck(ReturnCode::Accepted)).then_some(())
    })
    .await;
    other.connect("stays").await;

    // Unplug: the path disappears first (as a device node does), then the line.
    std::fs::remove_file(&link).expect("remove symlink");
    drop(dev);
    assert_eq!(
        obs.next().await,
        ("wills/unplugged".to_string(), b"adapter gone".to_vec()),
        "the lost client's will is published"
    );
    wait_for("the port to be seen closed", || !port_stats(&gw, 0).open).await;
    wait_for("the client to be counted lost", || gw.stats().metrics.lost == 1).await;

    // The other port is served all along.
    other.send(&Packet::PingReq(None)).await;
    other
        .expect("PINGRESP", |p| (p == Packet::PingResp).then_some(()))
        .await;

    // The gateway keeps trying to reopen it meanwhile.
    wait_for("a failed attempt to reopen", || port_stats(&gw, 0).open_failures >= 1).await;

    // Plug back in: a new pty behind the same path.
    let mut dev = Device::new(FramingKind::Cobs);
    std::os::unix::fs::symlink(&dev.path, &link).expect("symlink");
    wait_for("the port to be reopened", || port_stats(&gw, 0).open).await;
    dev.connect("unplugged").await;
    let s = port_stats(&gw, 0);
    assert_eq!((s.opens, s.disconnects), (2, 1), "{s:?}");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
