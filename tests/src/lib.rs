//! End-to-end test harness for the MQTT-SN gateway.
//!
//! - [`Mosquitto`]: a real broker started by the test on a free loopback port.
//! - [`Harness`]: the gateway started in-process on `127.0.0.1:0` with short timers,
//!   against mosquitto or against its embedded broker ([`BrokerKind`]).
//! - [`SnClient`]: an MQTT-SN test device speaking UDP from a loopback address.
//! - [`Observer`]: an MQTT 3.1.1 client on the broker side (rumqttc) that subscribes,
//!   collects messages and publishes.
//!
//! Every wait is bounded: things that must happen get [`WAIT`] (generous, for a loaded
//! machine); things that must not happen are watched for [`QUIET`].
//!
//! The test files run every case twice with [`broker_suite!`]: against mosquitto (a
//! failure under `CI=true` when it is not installed, a loud note and an early return
//! otherwise) and against the embedded broker. Known gap of the embedded broker
//! (rumqttd 0.20): it delivers every message at the subscription's QoS instead of the
//! lower of the publish's and the subscription's (MQTT 3.1.1, 3.8.4); see
//! [`Harness::delivery_qos`] and [`Harness::assert_published_qos`].

pub mod openssl;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::broker::mqtt::{BrokerConfig, LinkMode};
use gateway::config::Settings;
use gateway::runtime::Running;
use gateway::topics::Predefined;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, SubscribeReasonCode};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use gateway::engine::{EngineConfig, Stats};
pub use sn_codec::{
    Connect, Packet, PubAck, Publish, QoS, RegAck, Register, ReturnCode, SubAck, Subscribe, TopicFilter, TopicRef,
    Unsubscribe, WillTopic,
};

/// How long to wait for something that must happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(500);
/// Tretry of the gateway under test.
pub const RETRY: Duration = Duration::from_millis(300);
/// Nretry of the gateway under test.
pub const MAX_RETRIES: u32 = 3;
/// A predefined topic id configured in every test gateway.
pub const PREDEFINED_ID: u16 = 77;
/// The topic name of [`PREDEFINED_ID`].
pub const PREDEFINED_TOPIC: &str = "e2e/predefined";

static UNIQUE: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// Logs of the gateway go to the test's captured output; `RUST_LOG` selects them
/// (warnings by default).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------

/// A mosquitto process listening on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

/// A plain MQTT listener on 127.0.0.1.
fn plain_listener(port: u16) -> String {
    format!("listener {port} 127.0.0.1\n")
}

/// Whether this runs under CI (`CI=true` or `CI=1`): a missing tool is then a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn find_mosquitto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("mosquitto"))
        .chain([
            PathBuf::from("/usr/sbin/mosquitto"),
            PathBuf::from("/usr/local/sbin/mosquitto"),
        ])
        .find(|p| p.is_file())
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Mosquitto {
    /// Starts mosquitto. When it is not installed: a failure under `CI=true`, otherwise a
    /// loud note and `None` (the caller returns early; the test is not run).
    pub fn start() -> Option<Mosquitto> {
        Self::launch(None, &plain_listener, "")
    }

    /// [`Mosquitto::start`] with `extra` lines added to its configuration (e.g.
    /// `password_file` and `acl_file` with absolute paths).
    pub fn start_with_conf(extra: &str) -> Option<Mosquitto> {
        Self::launch(None, &plain_listener, extra)
    }

    /// [`Mosquitto::start`] with its one listener configured by `listener(port)` (the
    /// `listener PORT 127.0.0.1` line and what follows it, e.g. TLS files).
    pub fn start_with_listener(listener: &dyn Fn(u16) -> String) -> Option<Mosquitto> {
        Self::launch(None, listener, "")
    }

    /// [`Mosquitto::start`] on a given loopback port (e.g. the port of one that was
    /// stopped, to bring a broker back).
    pub fn start_at(port: u16) -> Option<Mosquitto> {
        Self::launch(Some(port), &plain_listener, "")
    }

    fn launch(fixed_port: Option<u16>, listener: &dyn Fn(u16) -> String, extra: &str) -> Option<Mosquitto> {
        let Some(bin) = find_mosquitto() else {
            if in_ci() {
                panic!(
                    "mosquitto is not installed (looked in PATH and /usr/sbin): the end-to-end suite needs it \
                     under CI=true; install it with `apt-get install -y mosquitto`"
                );
            }
            eprintln!(
                "\n**********************************************************************\n\
                 NOTE: mosquitto not found (PATH, /usr/sbin/mosquitto).\n\
                 This end-to-end test was NOT RUN against mosquitto.\n\
                 Install it with `apt-get install -y mosquitto` (CI=true makes this a failure).\n\
                 **********************************************************************\n"
            );
            return None;
        };
        let mut last_log = String::new();
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = fixed_port.unwrap_or_else(free_port);
            let dir = std::env::temp_dir().join(format!("e2e-mosquitto-{}-{}-{port}", std::process::id(), unique()));
            std::fs::create_dir_all(&dir).expect("creating the mosquitto directory");
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "{}allow_anonymous true\npersistence false\nmax_queued_messages 1000\n\
                     log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n{extra}\n",
                    listener(port)
                ),
            )
            .expect("writing mosquitto.conf");
            let log = dir.join("mosquitto.log");
            let log_file = std::fs::File::create(&log).expect("creating mosquitto.log");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file handle"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut m = Mosquitto { child, addr, dir };
            if m.wait_ready() {
                return Some(m);
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("mosquitto did not start; its last log:\n{last_log}");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // Exited: most likely the port was taken.
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Its temporary directory (configuration and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------

tokio::task_local! {
    /// The broker link mode of the gateways a test starts ([`aggregating`]).
    static LINK_MODE: LinkMode;
}

/// Runs `test` with every gateway it starts (through [`Harness`]) in aggregating mode.
pub async fn aggregating<F: std::future::Future>(test: F) -> F::Output {
    LINK_MODE.scope(LinkMode::Aggregating, test).await
}

/// The link mode for gateways started now: transparent unless inside [`aggregating`].
pub fn link_mode() -> LinkMode {
    LINK_MODE.try_with(|m| *m).unwrap_or_default()
}

/// Which broker the gateway is tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Debian's mosquitto, started by the harness.
    Mosquitto,
    /// The gateway's in-process rumqttd.
    Embedded,
}

/// The engine configuration of tests: short timers, one predefined topic.
pub fn test_engine_config() -> EngineConfig {
    EngineConfig {
        retry_interval: RETRY,
        max_retries: MAX_RETRIES,
        keep_alive_factor: 1.5,
        sleep_factor: 1.5,
        connect_timeout: Duration::from_secs(5),
        predefined: Arc::new(
            Predefined::new([(PREDEFINED_ID, PREDEFINED_TOPIC.to_string())]).expect("valid predefined topics"),
        ),
        ..EngineConfig::default()
    }
}

/// A running gateway (and broker) for one test.
pub struct Harness {
    /// The broker in use.
    pub kind: BrokerKind,
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// The broker's MQTT address.
    pub broker: SocketAddr,
    /// The gateway's DTLS addresses (`Settings::dtls`), in order.
    pub dtls: Vec<SocketAddr>,
    running: Option<Running>,
    // Dropped after the gateway.
    _mosquitto: Option<Mosquitto>,
}

impl Harness {
    /// Starts a broker of `kind` and the gateway with [`test_engine_config`]. `None` when
    /// mosquitto is not installed outside CI: the test returns early.
    pub async fn start(kind: BrokerKind) -> Option<Harness> {
        Self::start_with(kind, |_| {}).await
    }

    /// Like [`Harness::start`], with the engine configuration adjusted by `tweak`.
    pub async fn start_with(kind: BrokerKind, tweak: impl FnOnce(&mut EngineConfig)) -> Option<Harness> {
        let mosquitto = match kind {
            BrokerKind::Mosquitto => Some(Mosquitto::start()?),
            BrokerKind::Embedded => None,
        };
        Self::start_custom(mosquitto, |s| tweak(&mut s.engine)).await
    }

    /// The gateway against `mosquitto` (one started by the caller, e.g. with
    /// [`Mosquitto::start_with_conf`]), or the embedded broker when `None`, with the
    /// whole settings adjusted by `tweak` (the broker's address is filled in already).
    pub async fn start_custom(mosquitto: Option<Mosquitto>, tweak: impl FnOnce(&mut Settings)) -> Option<Harness> {
        init_logging();
        let engine = test_engine_config();
        let kind = if mosquitto.is_some() {
            BrokerKind::Mosquitto
        } else {
            BrokerKind::Embedded
        };
        let loopback0 = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let (mosquitto, broker, embedded_broker) = match mosquitto {
            Some(m) => {
                let broker = BrokerConfig {
                    host: m.addr().ip().to_string(),
                    port: m.addr().port(),
                    mode: link_mode(),
                    ..BrokerConfig::default()
                };
                (Some(m), broker, None)
            }
            None => {
                let broker = BrokerConfig {
                    host: loopback0.ip().to_string(),
                    port: 0,
                    mode: link_mode(),
                    ..BrokerConfig::default()
                };
                (None, broker, Some(loopback0))
            }
        };
        let mut settings = Settings {
            engine,
            udp: vec![loopback0],
            broker,
            embedded_broker,
            stats_interval: None,
            ..Settings::default()
        };
        tweak(&mut settings);
        let running = gateway::runtime::start(settings).await.expect("the gateway starts");
        let broker = match (&mosquitto, running.embedded_broker) {
            (Some(m), _) => m.addr(),
            (None, Some(addr)) => addr,
            (None, None) => panic!("the embedded broker did not start"),
        };
        let gateway = *running.udp_addrs.first().expect("one UDP listener");
        Some(Harness {
            kind,
            gateway,
            broker,
            dtls: running.dtls_addrs.clone(),
            running: Some(running),
            _mosquitto: mosquitto,
        })
    }

    /// The gateway with one DTLS listener on 127.0.0.1 (its address in
    /// [`Harness::dtls`]) and the device registry `devices` (TOML, as in a
    /// `devices_file`), against `mosquitto` or the embedded broker.
    pub async fn start_dtls(mosquitto: Option<Mosquitto>, devices: &str) -> Option<Harness> {
        let registry = match gateway::auth::Registry::parse(devices, "devices.toml", Path::new("/"), |_| None) {
            Ok(r) => r,
            Err(e) => panic!("the test's device registry does not parse: {e:?}"),
        };
        Self::start_custom(mosquitto, |s| {
            s.engine.auth = gateway::auth::AuthConfig {
                registry: Some(Arc::new(registry)),
                ..gateway::auth::AuthConfig::default()
            };
            s.dtls = vec![gateway::config::DtlsListener {
                address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                limits: gateway::transport::dtls::DtlsLimits::default(),
                certificates: None,
            }];
        })
        .await
    }

    /// A second gateway process's worth (its own engine, UDP listener and broker
    /// connections) on the broker of `other`, which keeps owning that broker: several
    /// gateways in front of one broker (docs/scaling.md).
    pub async fn start_beside(other: &Harness) -> Harness {
        init_logging();
        let settings = Settings {
            engine: test_engine_config(),
            udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            broker: BrokerConfig {
                host: other.broker.ip().to_string(),
                port: other.broker.port(),
                mode: link_mode(),
                // Its own shared connections' client ids, not the first gateway's.
                aggregate_client_id: format!("mqtt-sn-gw-beside-{}", unique()),
                ..BrokerConfig::default()
            },
            embedded_broker: None,
            stats_interval: None,
            ..Settings::default()
        };
        let running = gateway::runtime::start(settings)
            .await
            .expect("the second gateway starts");
        let gateway = *running.udp_addrs.first().expect("one UDP listener");
        Harness {
            kind: other.kind,
            gateway,
            dtls: running.dtls_addrs.clone(),
            broker: other.broker,
            running: Some(running),
            _mosquitto: None,
        }
    }

    /// A test device with its own UDP socket on 127.0.0.1.
    pub async fn device(&self, client_id: &str) -> SnClient {
        SnClient::bind(Ipv4Addr::LOCALHOST, self.gateway, client_id).await
    }

    /// A test device with its own UDP socket on the loopback address `ip` (127.0.0.0/8).
    pub async fn device_at(&self, ip: Ipv4Addr, client_id: &str) -> SnClient {
        SnClient::bind(ip, self.gateway, client_id).await
    }

    /// A broker-side MQTT client connected to the broker.
    pub async fn observer(&self) -> Observer {
        Observer::connect(self.broker, &format!("e2e-observer-{}", unique())).await
    }

    /// An observer already subscribed to `filter` (at QoS 2).
    pub async fn observe(&self, filter: &str) -> Observer {
        let mut o = self.observer().await;
        o.subscribe(filter, 2).await;
        o
    }

    /// The QoS a subscriber at `subscribed` gets a message published at `published` with:
    /// the lower of the two (MQTT 3.1.1, 3.8.4). Embedded-broker gap: rumqttd 0.20
    /// delivers at the subscription's QoS whatever the publish's, so that is what devices
    /// behind it receive.
    pub fn delivery_qos(&self, published: u8, subscribed: QoS) -> QoS {
        let subscribed_bits = subscribed.bits();
        match self.kind {
            BrokerKind::Mosquitto => QoS::from_bits(published.min(subscribed_bits)),
            BrokerKind::Embedded => subscribed,
        }
    }

    /// Asserts that a message seen by an observer subscribed at QoS 2 (as
    /// [`Harness::observe`] does) was published at `published`. Not checked on the
    /// embedded broker: rumqttd 0.20 delivers at the subscription's QoS (always 2 here),
    /// so the QoS the gateway published with cannot be seen through it.
    pub fn assert_published_qos(&self, m: &BrokerMsg, published: u8) {
        if self.kind == BrokerKind::Mosquitto {
            assert_eq!(m.qos, published, "QoS the gateway published {m:?} with");
        }
    }

    /// A recent snapshot of the gateway's gauges and counters (at most 100 ms old).
    pub fn stats(&self) -> Stats {
        self.running.as_ref().map(Running::stats).unwrap_or_default()
    }

    /// Waits (bounded by [`WAIT`]) until the gateway's stats satisfy `pred`.
    pub async fn wait_stats(&self, what: &str, pred: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("gateway stats never showed {what}: {s:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The running gateway (for reloads: `set_registry`, `set_predefined`).
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("the gateway runs until shutdown")
    }

    /// Stops the gateway.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The MQTT-SN test device
// ---------------------------------------------------------------------------------------

/// A PUBLISH received by a device, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pub {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic reference.
    pub topic: TopicRef,
    /// Message id.
    pub msg_id: u16,
    /// Payload.
    pub data: Vec<u8>,
}

/// A REGISTER received by a device, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reg {
    /// The topic id the gateway assigned.
    pub topic_id: u16,
    /// Message id.
    pub msg_id: u16,
    /// Topic name.
    pub topic_name: String,
}

/// A message from the gateway to a device, owned (decoded from the datagram).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rx {
    /// GWINFO with the gateway id.
    GwInfo(u8),
    /// CONNACK.
    ConnAck(ReturnCode),
    /// WILLTOPICREQ.
    WillTopicReq,
    /// WILLMSGREQ.
    WillMsgReq,
    /// REGISTER.
    Register(Reg),
    /// REGACK.
    RegAck(RegAck),
    /// PUBLISH.
    Publish(Pub),
    /// PUBACK.
    PubAck(PubAck),
    /// PUBREC.
    PubRec(u16),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBACK.
    UnsubAck(u16),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect(Option<u16>),
    /// WILLTOPICRESP.
    WillTopicResp(ReturnCode),
    /// WILLMSGRESP.
    WillMsgResp(ReturnCode),
    /// Anything a gateway should not send to a device (debug text).
    Other(String),
}

impl Rx {
    /// The owned form of a decoded packet.
    pub fn from_packet(p: &Packet<'_>) -> Rx {
        match *p {
            Packet::GwInfo(g) => Rx::GwInfo(g.gw_id),
            Packet::ConnAck(rc) => Rx::ConnAck(rc),
            Packet::WillTopicReq => Rx::WillTopicReq,
            Packet::WillMsgReq => Rx::WillMsgReq,
            Packet::Register(r) => Rx::Register(Reg {
                topic_id: r.topic_id,
                msg_id: r.msg_id,
                topic_name: r.topic_name.to_string(),
            }),
            Packet::RegAck(a) => Rx::RegAck(a),
            Packet::Publish(p) => Rx::Publish(Pub {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic: p.topic,
                msg_id: p.msg_id,
                data: p.data.to_vec(),
            }),
            Packet::PubAck(a) => Rx::PubAck(a),
            Packet::PubRec(id) => Rx::PubRec(id),
            Packet::PubRel(id) => Rx::PubRel(id),
            Packet::PubComp(id) => Rx::PubComp(id),
            Packet::SubAck(a) => Rx::SubAck(a),
            Packet::UnsubAck(id) => Rx::UnsubAck(id),
            Packet::PingResp => Rx::PingResp,
            Packet::Disconnect(d) => Rx::Disconnect(d),
            Packet::WillTopicResp(rc) => Rx::WillTopicResp(rc),
            Packet::WillMsgResp(rc) => Rx::WillMsgResp(rc),
            other => Rx::Other(format!("{other:?}")),
        }
    }
}

/// The two octets of a topic reference as PUBACK carries them.
pub fn raw_topic_id(t: TopicRef) -> u16 {
    match t {
        TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
        TopicRef::Short(b) => u16::from_be_bytes(b),
    }
}

/// Encodes a packet into a fresh buffer.
pub fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len()];
    let n = p.encode(&mut buf).expect("test packet encodes");
    buf.truncate(n);
    buf
}

/// A will as a test device declares it.
#[derive(Debug, Clone)]
pub struct WillSpec {
    /// Will topic.
    pub topic: String,
    /// Will QoS (0..=2).
    pub qos: QoS,
    /// Will RETAIN flag.
    pub retain: bool,
    /// Will message.
    pub message: Vec<u8>,
}

impl WillSpec {
    /// A non-retained will at QoS 1.
    pub fn new(topic: &str, message: &[u8]) -> WillSpec {
        WillSpec {
            topic: topic.to_string(),
            qos: QoS::AtLeastOnce,
            retain: false,
            message: message.to_vec(),
        }
    }
}

/// An MQTT-SN device over UDP, for tests: its own socket, connected to the gateway.
pub struct SnClient {
    socket: UdpSocket,
    /// The client id it connects with.
    pub client_id: String,
    next_msg_id: u16,
    /// The last PUBLISH acknowledged, to recognise retransmissions that crossed the
    /// acknowledgement.
    last_delivery: Option<Pub>,
}

impl SnClient {
    /// A device bound to `ip:0` talking to `gateway`.
    pub async fn bind(ip: Ipv4Addr, gateway: SocketAddr, client_id: &str) -> SnClient {
        let socket = UdpSocket::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("cannot bind a UDP socket on {ip}: {e}"));
        socket.connect(gateway).await.expect("UDP connect to the gateway");
        SnClient {
            socket,
            client_id: client_id.to_string(),
            next_msg_id: 0,
            last_delivery: None,
        }
    }

    /// This device's source address.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local address")
    }

    /// A fresh message id (never 0).
    pub fn msg_id(&mut self) -> u16 {
        self.next_msg_id = self.next_msg_id.wrapping_add(1).max(1);
        self.next_msg_id
    }

    /// Sends one packet.
    pub async fn send(&self, p: &Packet<'_>) {
        self.send_raw(&encode(p)).await;
    }

    /// Sends raw bytes as one datagram.
    pub async fn send_raw(&self, data: &[u8]) {
        self.socket.send(data).await.expect("UDP send");
    }

    /// The next datagram from the gateway as bytes (an encapsulated answer, say);
    /// panics after [`WAIT`].
    pub async fn recv_raw(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(WAIT, self.socket.recv(&mut buf)).await {
            Err(_) => panic!("device {}: no datagram within {WAIT:?}", self.client_id),
            Ok(Err(e)) => panic!("device {}: UDP receive failed: {e}", self.client_id),
            Ok(Ok(n)) => buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }

    /// The next message from the gateway, if one arrives within `within`. Panics on a
    /// datagram that does not decode: the gateway must only send valid messages.
    pub async fn recv_within(&mut self, within: Duration) -> Option<Rx> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(within, self.socket.recv(&mut buf)).await {
            Err(_) => None,
            Ok(Err(e)) => panic!("device {}: UDP receive failed: {e}", self.client_id),
            Ok(Ok(n)) => {
                let data = buf.get(..n).expect("received length within the buffer");
                match Packet::decode(data) {
                    Ok(p) => Some(Rx::from_packet(&p)),
                    Err(e) => panic!(
                        "device {}: gateway sent a malformed datagram ({e:?}): {data:02x?}",
                        self.client_id
                    ),
                }
            }
        }
    }

    /// The next message from the gateway (panics after [`WAIT`]).
    pub async fn recv(&mut self) -> Rx {
        match self.recv_within(WAIT).await {
            Some(rx) => rx,
            None => panic!(
                "device {}: nothing received from the gateway within {WAIT:?}",
                self.client_id
            ),
        }
    }

    /// Asserts that the next message is `want`.
    pub async fn expect(&mut self, want: Rx) {
        let got = self.recv().await;
        assert_eq!(got, want, "device {}: unexpected message", self.client_id);
    }

    /// Asserts that nothing arrives for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        self.expect_silence_for(QUIET).await;
    }

    /// Asserts that nothing arrives for `d`.
    pub async fn expect_silence_for(&mut self, d: Duration) {
        if let Some(rx) = self.recv_within(d).await {
            panic!("device {}: expected silence, got {rx:?}", self.client_id);
        }
    }

    /// The next message, which must be a PUBLISH.
    pub async fn expect_publish(&mut self) -> Pub {
        match self.recv().await {
            Rx::Publish(p) => p,
            other => panic!("device {}: expected PUBLISH, got {other:?}", self.client_id),
        }
    }

    /// The next message, which must be a REGISTER.
    pub async fn expect_register(&mut self) -> Reg {
        match self.recv().await {
            Rx::Register(r) => r,
            other => panic!("device {}: expected REGISTER, got {other:?}", self.client_id),
        }
    }

    fn connect_packet(&self, keep_alive: u16, clean_session: bool, will: bool) -> Vec<u8> {
        encode(&Packet::Connect(Connect {
            will,
            clean_session,
            duration: keep_alive,
            client_id: &self.client_id,
        }))
    }

    /// Sends CONNECT (no will) and returns the answer.
    pub async fn try_connect(&mut self, keep_alive: u16, clean_session: bool) -> Rx {
        let p = self.connect_packet(keep_alive, clean_session, false);
        self.send_raw(&p).await;
        self.recv().await
    }

    /// CONNECT without a will; asserts CONNACK accepted.
    pub async fn connect(&mut self, keep_alive: u16, clean_session: bool) {
        let got = self.try_connect(keep_alive, clean_session).await;
        assert_eq!(
            got,
            Rx::ConnAck(ReturnCode::Accepted),
            "device {}: CONNECT",
            self.client_id
        );
    }

    /// CONNECT with the will handshake; asserts each step and CONNACK accepted.
    pub async fn connect_with_will(&mut self, keep_alive: u16, clean_session: bool, will: &WillSpec) {
        let p = self.connect_packet(keep_alive, clean_session, true);
        self.send_raw(&p).await;
        self.expect(Rx::WillTopicReq).await;
        self.send(&Packet::WillTopic(Some(WillTopic {
            qos: will.qos,
            retain: will.retain,
            topic: &will.topic,
        })))
        .await;
        self.expect(Rx::WillMsgReq).await;
        self.send(&Packet::WillMsg(&will.message)).await;
        self.expect(Rx::ConnAck(ReturnCode::Accepted)).await;
    }

    /// REGISTER `name`; asserts REGACK accepted and returns the topic id.
    pub async fn register(&mut self, name: &str) -> u16 {
        let msg_id = self.msg_id();
        self.send(&Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name: name,
        }))
        .await;
        match self.recv().await {
            Rx::RegAck(a) if a.msg_id == msg_id && a.code == ReturnCode::Accepted && a.topic_id != 0 => a.topic_id,
            other => panic!(
                "device {}: REGISTER {name:?}: expected REGACK accepted, got {other:?}",
                self.client_id
            ),
        }
    }

    /// Sends a PUBLISH (a fresh message id for QoS 1 and 2) and returns its message id.
    pub async fn publish(&mut self, topic: TopicRef, qos: QoS, retain: bool, data: &[u8]) -> u16 {
        let msg_id = match qos {
            QoS::AtLeastOnce | QoS::ExactlyOnce => self.msg_id(),
            QoS::AtMostOnce | QoS::MinusOne => 0,
        };
        self.send_publish(false, topic, qos, retain, msg_id, data).await;
        msg_id
    }

    /// Sends a PUBLISH with every field given.
    pub async fn send_publish(&self, dup: bool, topic: TopicRef, qos: QoS, retain: bool, msg_id: u16, data: &[u8]) {
        self.send(&Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic,
            msg_id,
            data,
        }))
        .await;
    }

    /// PUBLISH QoS 1; asserts PUBACK accepted.
    pub async fn publish_qos1(&mut self, topic: TopicRef, data: &[u8]) {
        let msg_id = self.publish(topic, QoS::AtLeastOnce, false, data).await;
        let want = Rx::PubAck(PubAck {
            topic_id: raw_topic_id(topic),
            msg_id,
            code: ReturnCode::Accepted,
        });
        self.expect(want).await;
    }

    /// PUBLISH QoS 2; asserts PUBREC, sends PUBREL, asserts PUBCOMP.
    pub async fn publish_qos2(&mut self, topic: TopicRef, data: &[u8]) {
        let msg_id = self.publish(topic, QoS::ExactlyOnce, false, data).await;
        self.expect(Rx::PubRec(msg_id)).await;
        self.send(&Packet::PubRel(msg_id)).await;
        self.expect(Rx::PubComp(msg_id)).await;
    }

    /// SUBSCRIBE; asserts SUBACK accepted for this message id and returns it.
    pub async fn subscribe(&mut self, topic: TopicFilter<'_>, qos: QoS) -> SubAck {
        let msg_id = self.msg_id();
        self.send(&Packet::Subscribe(Subscribe {
            dup: false,
            qos,
            msg_id,
            topic,
        }))
        .await;
        match self.recv().await {
            Rx::SubAck(a) if a.msg_id == msg_id && a.code == ReturnCode::Accepted => a,
            other => panic!(
                "device {}: SUBSCRIBE {topic:?}: expected SUBACK accepted, got {other:?}",
                self.client_id
            ),
        }
    }

    /// UNSUBSCRIBE; waits for its UNSUBACK.
    pub async fn unsubscribe(&mut self, topic: TopicFilter<'_>) {
        let msg_id = self.msg_id();
        self.send(&Packet::Unsubscribe(Unsubscribe { msg_id, topic })).await;
        self.expect(Rx::UnsubAck(msg_id)).await;
    }

    /// Acknowledges a delivered PUBLISH: PUBACK for QoS 1, the PUBREC/PUBREL/PUBCOMP
    /// exchange for QoS 2, nothing for QoS 0.
    pub async fn ack(&mut self, p: &Pub) {
        match p.qos {
            QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(PubAck {
                    topic_id: raw_topic_id(p.topic),
                    msg_id: p.msg_id,
                    code: ReturnCode::Accepted,
                }))
                .await;
            }
            QoS::ExactlyOnce => {
                self.send(&Packet::PubRec(p.msg_id)).await;
                loop {
                    match self.recv().await {
                        Rx::PubRel(id) if id == p.msg_id => break,
                        // A retransmission of the PUBLISH crossed our PUBREC.
                        Rx::Publish(d) if d.dup && d.msg_id == p.msg_id => self.send(&Packet::PubRec(p.msg_id)).await,
                        other => panic!(
                            "device {}: expected PUBREL({}), got {other:?}",
                            self.client_id, p.msg_id
                        ),
                    }
                }
                self.send(&Packet::PubComp(p.msg_id)).await;
            }
            QoS::AtMostOnce | QoS::MinusOne => {}
        }
        self.last_delivery = Some(p.clone());
    }

    /// Whether `rx` repeats the last delivery (a retransmission that crossed our
    /// acknowledgement on a busy machine): if so it is acknowledged again, as a device
    /// does, and should be otherwise ignored.
    pub async fn answer_retransmission(&mut self, rx: &Rx) -> bool {
        let Some(last) = &self.last_delivery else {
            return false;
        };
        let (msg_id, topic, qos) = (last.msg_id, last.topic, last.qos);
        match rx {
            Rx::Publish(p) if p.dup && p.msg_id == msg_id && qos == QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(PubAck {
                    topic_id: raw_topic_id(topic),
                    msg_id,
                    code: ReturnCode::Accepted,
                }))
                .await;
                true
            }
            Rx::PubRel(id) if *id == msg_id && qos == QoS::ExactlyOnce => {
                self.send(&Packet::PubComp(msg_id)).await;
                true
            }
            _ => false,
        }
    }

    /// Asserts that nothing but retransmissions of the last delivery (answered again)
    /// arrives for [`QUIET`].
    pub async fn expect_nothing_new(&mut self) {
        let until = tokio::time::Instant::now() + QUIET;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let Some(rx) = self.recv_within(left).await else {
                return;
            };
            if !self.answer_retransmission(&rx).await {
                panic!("device {}: expected nothing new, got {rx:?}", self.client_id);
            }
        }
    }

    /// Accepts a REGISTER from the gateway.
    pub async fn regack(&mut self, r: &Reg) {
        self.send(&Packet::RegAck(RegAck {
            topic_id: r.topic_id,
            msg_id: r.msg_id,
            code: ReturnCode::Accepted,
        }))
        .await;
    }

    /// Receives one delivery: accepts REGISTERs on the way, acknowledges the PUBLISH.
    pub async fn receive(&mut self) -> Pub {
        loop {
            let rx = self.recv().await;
            if self.answer_retransmission(&rx).await {
                continue;
            }
            match rx {
                Rx::Register(r) => self.regack(&r).await,
                Rx::Publish(p) => {
                    self.ack(&p).await;
                    return p;
                }
                other => panic!("device {}: expected a delivery, got {other:?}", self.client_id),
            }
        }
    }

    /// PINGREQ without client id; asserts PINGRESP.
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq(None)).await;
        self.expect(Rx::PingResp).await;
    }

    /// DISCONNECT with a duration; asserts the DISCONNECT answer (now asleep).
    pub async fn sleep(&mut self, secs: u16) {
        self.send(&Packet::Disconnect(Some(secs))).await;
        self.expect(Rx::Disconnect(None)).await;
    }

    /// PINGREQ with this client id: collects (and acknowledges) every held message until
    /// PINGRESP, accepting REGISTERs on the way. Retransmissions of a message already
    /// acknowledged are answered again and not collected twice.
    pub async fn wake(&mut self) -> Vec<Pub> {
        let id = self.client_id.clone();
        self.send(&Packet::PingReq(Some(&id))).await;
        let mut got = Vec::new();
        loop {
            let rx = self.recv().await;
            if self.answer_retransmission(&rx).await {
                continue;
            }
            match rx {
                Rx::PingResp => return got,
                Rx::Register(r) => self.regack(&r).await,
                Rx::Publish(p) => {
                    self.ack(&p).await;
                    got.push(p);
                }
                other => panic!("device {}: while awake, got {other:?}", self.client_id),
            }
        }
    }

    /// DISCONNECT; asserts the DISCONNECT answer.
    pub async fn disconnect(&mut self) {
        self.send(&Packet::Disconnect(None)).await;
        self.expect(Rx::Disconnect(None)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The broker-side observer
// ---------------------------------------------------------------------------------------

/// A message an [`Observer`] received from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerMsg {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS it arrived with (0..=2).
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
}

#[derive(Debug)]
enum Ctrl {
    ConnAck,
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    PubComp,
    SentPublish,
    Closed(String),
}

/// An MQTT 3.1.1 client on the broker side.
pub struct Observer {
    id: String,
    client: AsyncClient,
    msgs: mpsc::UnboundedReceiver<BrokerMsg>,
    ctrl: mpsc::UnboundedReceiver<Ctrl>,
    task: JoinHandle<()>,
}

fn mqtt_qos(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

async fn drive_observer(
    mut eventloop: EventLoop,
    msgs: mpsc::UnboundedSender<BrokerMsg>,
    ctrl: mpsc::UnboundedSender<Ctrl>,
) {
    use rumqttc::Packet as P;
    loop {
        let c = match eventloop.poll().await {
            Ok(Event::Incoming(P::Publish(p))) => {
                let _ = msgs.send(BrokerMsg {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                    qos: p.qos as u8,
                    retain: p.retain,
                });
                continue;
            }
            Ok(Event::Incoming(P::ConnAck(_))) => Ctrl::ConnAck,
            Ok(Event::Incoming(P::SubAck(a))) => Ctrl::SubAck(a.return_codes),
            Ok(Event::Incoming(P::PubAck(_))) => Ctrl::PubAck,
            Ok(Event::Incoming(P::PubComp(_))) => Ctrl::PubComp,
            Ok(Event::Outgoing(Outgoing::Publish(_))) => Ctrl::SentPublish,
            Ok(_) => continue,
            Err(e) => {
                let _ = ctrl.send(Ctrl::Closed(e.to_string()));
                return;
            }
        };
        let _ = ctrl.send(c);
    }
}

impl Observer {
    /// Connects (clean session) to the broker at `addr` and waits for its CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Observer {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, eventloop) = AsyncClient::new(o, 1024);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (ctrl_tx, ctrl) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive_observer(eventloop, msg_tx, ctrl_tx));
        let mut obs = Observer {
            id: id.to_string(),
            client,
            msgs,
            ctrl,
            task,
        };
        obs.wait_ctrl("CONNACK", |c| matches!(c, Ctrl::ConnAck).then_some(()))
            .await;
        obs
    }

    async fn wait_ctrl<T>(&mut self, what: &str, mut pick: impl FnMut(&Ctrl) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ctrl.recv()).await {
                Err(_) => panic!("observer {}: no {what} from the broker within {WAIT:?}", self.id),
                Ok(None) => panic!("observer {}: connection task ended before {what}", self.id),
                Ok(Some(Ctrl::Closed(reason))) => {
                    panic!("observer {}: connection lost before {what}: {reason}", self.id)
                }
                Ok(Some(c)) => {
                    if let Some(t) = pick(&c) {
                        return t;
                    }
                }
            }
        }
    }

    /// Subscribes and waits for a successful SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        self.client
            .subscribe(filter, mqtt_qos(qos))
            .await
            .expect("observer subscribe queued");
        let codes = self.wait_ctrl("SUBACK", |c| match c {
            Ctrl::SubAck(codes) => Some(codes.clone()),
            _ => None,
        });
        let codes = codes.await;
        assert!(
            matches!(codes.first(), Some(SubscribeReasonCode::Success(_))),
            "observer {}: broker refused the subscription to {filter:?}: {codes:?}",
            self.id
        );
    }

    /// Publishes and waits until the broker has it (PUBACK/PUBCOMP; for QoS 0, until it
    /// is written to the connection).
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, mqtt_qos(qos), retain, payload.to_vec())
            .await
            .expect("observer publish queued");
        match qos {
            0 => {
                self.wait_ctrl("sent PUBLISH", |c| matches!(c, Ctrl::SentPublish).then_some(()))
                    .await
            }
            1 => {
                self.wait_ctrl("PUBACK", |c| matches!(c, Ctrl::PubAck).then_some(()))
                    .await
            }
            _ => {
                self.wait_ctrl("PUBCOMP", |c| matches!(c, Ctrl::PubComp).then_some(()))
                    .await
            }
        }
    }

    /// The next message received, if one arrives within `within`.
    pub async fn recv_within(&mut self, within: Duration) -> Option<BrokerMsg> {
        tokio::time::timeout(within, self.msgs.recv()).await.ok().flatten()
    }

    /// The next message received (panics after [`WAIT`]).
    pub async fn expect_msg(&mut self) -> BrokerMsg {
        match self.recv_within(WAIT).await {
            Some(m) => m,
            None => panic!("observer {}: no message from the broker within {WAIT:?}", self.id),
        }
    }

    /// Asserts that the next message has this topic and payload, and returns it.
    pub async fn expect_msg_eq(&mut self, topic: &str, payload: &[u8]) -> BrokerMsg {
        let m = self.expect_msg().await;
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            (topic, payload),
            "observer {}: unexpected message {m:?}",
            self.id
        );
        m
    }

    /// Asserts that no message arrives for [`QUIET`].
    pub async fn expect_none(&mut self) {
        self.expect_none_for(QUIET).await;
    }

    /// Asserts that no message arrives for `d`.
    pub async fn expect_none_for(&mut self, d: Duration) {
        if let Some(m) = self.recv_within(d).await {
            panic!("observer {}: expected no message, got {m:?}", self.id);
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the named async test functions (each taking a [`BrokerKind`]) once against
/// mosquitto (module `mosquitto`) and once against the embedded broker (module
/// `embedded`). A case preceded by `#[embedded_gap = "why"]` is marked ignored for the
/// embedded broker, with the reason: a feature rumqttd lacks.
#[macro_export]
macro_rules! broker_suite {
    ($( $(#[embedded_gap = $why:literal])? $name:ident ),* $(,)?) => {
        mod mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::BrokerKind::Mosquitto).await
                }
            )*
        }
        mod embedded {
            $(
                $(#[ignore = $why])?
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::BrokerKind::Embedded).await
                }
            )*
        }
        /// The same cases with the gateway in aggregating mode (`broker.mode`).
        mod aggregating_mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::aggregating(super::$name($crate::BrokerKind::Mosquitto)).await
                }
            )*
        }
        mod aggregating_embedded {
            $(
                $(#[ignore = $why])?
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::aggregating(super::$name($crate::BrokerKind::Embedded)).await
                }
            )*
        }
    };
}
