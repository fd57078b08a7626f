//! The state store as the binary uses it (`--state-dir`, docs/persistence.md): the real
//! gateway process killed with SIGKILL and started again on the same directory, against
//! a real mosquitto; a damaged store refused, or set aside with `--state-recover`; a
//! store of a newer schema refused.
//!
//! (These tests live in the gateway package, not in `tests/`, because they run the
//! gateway binary itself: only its own package's tests are given its path.)

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sn_codec::{
    Connect, Packet, PubAck, Publish, QoS, RegAck, Register, ReturnCode, SubAck, Subscribe, TopicFilter, TopicRef,
};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

/// How long anything that must happen may take (a loaded, shared machine).
const WAIT: Duration = Duration::from_secs(30);

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-persistence-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The gateway binary, its stderr collected line by line.
struct Gateway {
    child: Child,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

impl Gateway {
    /// Starts the binary with `args` (the environment's `MQTT_SN_*` removed).
    fn spawn(args: &[String]) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("RUST_LOG", "info");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MQTT_SN_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let lines = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            let (lock, cvar) = &*sink;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lock.lock().unwrap_or_else(|e| e.into_inner()).lines.push(line);
                cvar.notify_all();
            }
            lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            cvar.notify_all();
        });
        Gateway { child, lines }
    }

    /// Starts it and waits until it serves UDP.
    fn start(args: &[String]) -> Gateway {
        let gw = Self::spawn(args);
        gw.wait_line("listening for MQTT-SN on UDP");
        gw
    }

    fn log(&self) -> String {
        self.lines.0.lock().unwrap_or_else(|e| e.into_inner()).lines.join("\n")
    }

    /// Waits for a line containing `needle`. Fails if the gateway exits first.
    fn wait_line(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        let (lock, cvar) = &*self.lines;
        let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if lines.lines.iter().any(|l| l.contains(needle)) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !lines.closed,
                "no line containing {needle:?} (gateway exited: {}); stderr:\n{}",
                lines.closed,
                lines.lines.join("\n")
            );
            lines = cvar.wait_timeout(lines, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The exit status, waiting for it.
    fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader take the last lines.
                let (lock, cvar) = &*self.lines;
                let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !lines.closed {
                    lines = cvar.wait_timeout(lines, WAIT).unwrap_or_else(|e| e.into_inner()).0;
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, nothing flushed, as a crash or `kill -9`.
    fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status must be 0.
    fn stop(self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let log = self.lines.clone();
        let code = self.exit_code();
        let log = log.0.lock().unwrap_or_else(|e| e.into_inner()).lines.join("\n");
        assert_eq!(code, Some(0), "exit status; stderr:\n{log}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mosquitto process on a free loopback port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    /// Starts mosquitto from PATH or /usr/sbin. Not installed: a failure under
    /// `CI=true`, else `None` and a loud note (the test needs a broker that outlives the
    /// gateway, which the embedded one does not).
    fn start(dir: &Path) -> Option<Mosquitto> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let Some(bin) = std::env::split_paths(&path)
            .map(|d| d.join("mosquitto"))
            .chain([PathBuf::from("/usr/sbin/mosquitto")])
            .find(|p| p.is_file())
        else {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true" && v != "1"),
                "mosquitto is not installed: apt-get install -y mosquitto"
            );
            eprintln!("NOTE: mosquitto not found; the kill -9 restart test is NOT run");
            return None;
        };
        for _ in 0..5 {
            let port = free_tcp_port();
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
            )
            .expect("write mosquitto.conf");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run mosquitto");
            let mut m = Mosquitto { child, port };
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = m.child.try_wait() {
                    break; // The port was taken: try another.
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(m);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = m.child.kill();
        }
        panic!("mosquitto did not start");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT client at the broker: subscribed to `filter`, and able to publish.
struct Observer {
    messages: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    client: rumqttc::Client,
}

impl Observer {
    fn connect(port: u16, id: &str, filter: &str) -> Observer {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = rumqttc::Client::new(opts, 16);
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("queue subscribe");
        let (tx, messages) = std::sync::mpsc::channel();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        subscribed.recv_timeout(WAIT).expect("the observer's SUBACK");
        Observer { messages, client }
    }

    fn next(&self) -> (String, Vec<u8>) {
        self.messages.recv_timeout(WAIT).expect("a message at the broker")
    }
}

/// A device on a UDP socket of its own.
struct Device {
    socket: UdpSocket,
    gateway: SocketAddr,
}

impl Device {
    fn new(gateway: SocketAddr) -> Device {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind device");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("read timeout");
        Device { socket, gateway }
    }

    fn send(&self, p: &Packet<'_>) {
        let mut buf = vec![0; p.encoded_len()];
        let n = p.encode(&mut buf).expect("encode");
        self.socket.send_to(&buf[..n], self.gateway).expect("send");
    }

    /// The next datagram, waiting at most [`WAIT`].
    fn recv(&self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let mut rx = [0u8; 512];
        loop {
            assert!(Instant::now() < deadline, "nothing from the gateway");
            if let Ok(len) = self.socket.recv(&mut rx) {
                return rx[..len].to_vec();
            }
        }
    }

    /// Sends `p` (again every 300 ms) until an answer `want` accepts comes; that answer.
    fn exchange<T>(&self, p: &Packet<'_>, want: impl Fn(&Packet<'_>) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no answer to {:?}", p.msg_type());
            self.send(p);
            let mut rx = [0u8; 512];
            while let Ok(len) = self.socket.recv(&mut rx) {
                if let Some(got) = rx
                    .get(..len)
                    .and_then(|d| Packet::decode(d).ok())
                    .and_then(|p| want(&p))
                {
                    return got;
                }
            }
        }
    }

    fn connect(&self, client_id: &str, clean_session: bool) {
        let connect = Packet::Connect(Connect {
            will: false,
            clean_session,
            duration: 60,
            client_id,
        });
        self.exchange(&connect, |p| match p {
            Packet::ConnAck(ReturnCode::Accepted) => Some(()),
            Packet::ConnAck(code) => panic!("CONNACK {code:?}"),
            _ => None,
        });
    }

    /// CONNECT with a will (QoS 1): WILLTOPICREQ, WILLMSGREQ, then CONNACK.
    fn connect_with_will(&self, client_id: &str, topic: &str, message: &[u8]) {
        let connect = Packet::Connect(Connect {
            will: true,
            clean_session: true,
            duration: 60,
            client_id,
        });
        self.exchange(&connect, |p| matches!(p, Packet::WillTopicReq).then_some(()));
        let will_topic = Packet::WillTopic(Some(sn_codec::WillTopic {
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
        }));
        self.exchange(&will_topic, |p| matches!(p, Packet::WillMsgReq).then_some(()));
        self.exchange(&Packet::WillMsg(message), |p| match p {
            Packet::ConnAck(ReturnCode::Accepted) => Some(()),
            Packet::ConnAck(code) => panic!("CONNACK {code:?}"),
            _ => None,
        });
    }

    fn register(&self, name: &str, msg_id: u16) -> u16 {
        let reg = Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name: name,
        });
        self.exchange(&reg, |p| match p {
            Packet::RegAck(RegAck {
                topic_id,
                msg_id: m,
                code: ReturnCode::Accepted,
            }) if *m == msg_id => Some(*topic_id),
            _ => None,
        })
    }

    /// SUBSCRIBE by name at QoS 1; the topic id of the SUBACK.
    fn subscribe(&self, name: &str, msg_id: u16) -> u16 {
        self.subscribe_at(name, msg_id, QoS::AtLeastOnce)
    }

    /// SUBSCRIBE by name at `qos`; the topic id of the SUBACK.
    fn subscribe_at(&self, name: &str, msg_id: u16, qos: QoS) -> u16 {
        let sub = Packet::Subscribe(Subscribe {
            dup: false,
            qos,
            msg_id,
            topic: TopicFilter::Name(name),
        });
        self.exchange(&sub, |p| match p {
            Packet::SubAck(SubAck {
                topic_id,
                msg_id: m,
                code: ReturnCode::Accepted,
                ..
            }) if *m == msg_id => Some(*topic_id),
            _ => None,
        })
    }

    /// A QoS 1 PUBLISH; the PUBACK's return code.
    fn publish_qos1(&self, topic: TopicRef, msg_id: u16, data: &[u8]) -> ReturnCode {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            msg_id,
            data,
        });
        self.exchange(&p, |p| match p {
            Packet::PubAck(PubAck { msg_id: m, code, .. }) if *m == msg_id => Some(*code),
            Packet::Disconnect(_) => panic!("DISCONNECT: the session is gone"),
            _ => None,
        })
    }

    /// Receives the next broker message the gateway delivers (answering a REGISTER
    /// first if one comes, and acknowledging the PUBLISH): its topic reference and data,
    /// and the REGISTERs seen before it.
    fn receive(&self) -> (TopicRef, Vec<u8>, Vec<String>) {
        let mut registered = Vec::new();
        loop {
            let data = self.recv();
            match Packet::decode(&data) {
                Ok(Packet::Register(r)) => {
                    registered.push(r.topic_name.to_string());
                    self.send(&Packet::RegAck(RegAck {
                        topic_id: r.topic_id,
                        msg_id: r.msg_id,
                        code: ReturnCode::Accepted,
                    }));
                }
                Ok(Packet::Publish(p)) => {
                    if p.qos == QoS::AtLeastOnce {
                        self.send(&Packet::PubAck(PubAck {
                            topic_id: gateway::topics::raw_id(p.topic),
                            msg_id: p.msg_id,
                            code: ReturnCode::Accepted,
                        }));
                    }
                    return (p.topic, p.data.to_vec(), registered);
                }
                _ => {}
            }
        }
    }
}

/// What a restart test runs on: its temporary directory, a mosquitto that outlives the
/// gateway, the gateway's broker argument, state directory and UDP port.
struct Site {
    dir: PathBuf,
    mosquitto: Mosquitto,
    broker: String,
    state: PathBuf,
    udp: u16,
}

impl Site {
    /// `None`: mosquitto is not installed (and this is not CI; see [`Mosquitto::start`]).
    fn new(name: &str) -> Option<Site> {
        let dir = temp_dir(name);
        let mosquitto = Mosquitto::start(&dir)?;
        Some(Site {
            broker: format!("--broker mqtt://127.0.0.1:{}", mosquitto.port),
            state: dir.join("state"),
            udp: free_udp_port(),
            mosquitto,
            dir,
        })
    }
}

fn args(udp: u16, broker: &str, state: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--udp".into(),
        format!("127.0.0.1:{udp}"),
        "--advertise-interval".into(),
        "0".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    a.extend(broker.split(' ').map(String::from));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn after_kill_9_a_device_keeps_its_topic_ids_and_gets_what_was_queued() {
    let Some(Site {
        dir,
        mosquitto,
        broker,
        state,
        udp,
    }) = Site::new("kill9")
    else {
        return;
    };
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let gw = Gateway::start(&args(udp, &broker, &state, &[]));

    // A clean-session-false device registers a topic and subscribes (QoS 1); a
    // clean-session device registers one too.
    let keeper = Device::new(gw_addr);
    keeper.connect("keeper", false);
    let up = keeper.register("persist/keeper/up", 1);
    let down = keeper.subscribe("persist/keeper/down", 2);
    assert_ne!(down, 0, "a subscription by name gets a topic id");
    let fleeting = Device::new(gw_addr);
    fleeting.connect("fleeting", true);
    let fleeting_id = fleeting.register("persist/fleeting", 1);

    // The gateway dies. Meanwhile a QoS 1 message for the keeper reaches the broker,
    // which queues it in the keeper's session.
    gw.kill_9();
    let observer = Observer::connect(mosquitto.port, "persist-observer", "persist/+/up");
    observer
        .client
        .publish(
            "persist/keeper/down",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"while down".to_vec(),
        )
        .expect("queue publish");

    // Restarted on the same directory.
    let gw = Gateway::start(&args(udp, &broker, &state, &[]));
    gw.wait_line("state store opened");
    assert!(
        gw.log().contains("sessions=1"),
        "one stored session; stderr:\n{}",
        gw.log()
    );

    // The keeper reconnects: the queued message arrives under the topic id it had, with
    // no REGISTER (the gateway still knows the id), and its old id publishes.
    keeper.connect("keeper", false);
    let (topic, data, registered) = keeper.receive();
    assert_eq!(data, b"while down");
    assert!(
        registered.is_empty(),
        "REGISTERs for ids the device already has: {registered:?}"
    );
    assert_eq!(topic, TopicRef::Normal(down));
    assert_eq!(
        keeper.publish_qos1(TopicRef::Normal(up), 7, b"after restart"),
        ReturnCode::Accepted,
        "a publish with the topic id registered before the kill"
    );
    assert_eq!(
        observer.next(),
        ("persist/keeper/up".to_string(), b"after restart".to_vec())
    );

    // The clean-session device's registration was not kept.
    fleeting.connect("fleeting", true);
    assert_eq!(
        fleeting.publish_qos1(TopicRef::Normal(fleeting_id), 2, b"x"),
        ReturnCode::InvalidTopicId
    );
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded broker on a free port (for the tests that need no broker to outlive the
/// gateway).
fn embedded() -> String {
    format!(
        "--embedded-broker --embedded-broker-listen 127.0.0.1:{}",
        free_tcp_port()
    )
}

#[test]
fn a_damaged_store_stops_the_gateway_and_state_recover_sets_it_aside() {
    let dir = temp_dir("damaged");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let file = state.join("gateway.redb");
    // A store cut short: the start of a real one (its header), then nothing.
    let gw = Gateway::start(&args(free_udp_port(), &embedded(), &state, &[]));
    gw.wait_line("state store opened");
    gw.stop();
    let whole = std::fs::read(&file).expect("the store file");
    std::fs::write(&file, &whole[..whole.len().min(700)]).expect("truncate");
    let damaged = std::fs::read(&file).expect("read");

    let gw = Gateway::spawn(&args(free_udp_port(), &embedded(), &state, &[]));
    let log = gw.lines.clone();
    assert_eq!(gw.exit_code(), Some(1), "a damaged store: exit status 1");
    let log = log.0.lock().unwrap_or_else(|e| e.into_inner()).lines.join("\n");
    assert!(
        log.contains("is damaged") && log.contains(&file.display().to_string()),
        "the error names the file and the damage:\n{log}"
    );
    assert_eq!(std::fs::read(&file).expect("read"), damaged, "left as it was");

    let gw = Gateway::start(&args(free_udp_port(), &embedded(), &state, &["--state-recover"]));
    gw.wait_line("STATE STORE DAMAGED");
    gw.wait_line("state store opened");
    let aside: Vec<PathBuf> = std::fs::read_dir(&state)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains("gateway.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file kept aside: {aside:?}");
    assert_eq!(std::fs::read(&aside[0]).expect("read"), damaged);
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_store_of_a_newer_schema_is_refused_even_with_state_recover() {
    let dir = temp_dir("newer");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    {
        let db = redb::Database::create(state.join("gateway.redb")).expect("create");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .expect("meta")
            .insert("schema_version", 99)
            .expect("insert");
        txn.commit().expect("commit");
    }
    for extra in [&[][..], &["--state-recover"][..]] {
        let gw = Gateway::spawn(&args(free_udp_port(), &embedded(), &state, extra));
        let log = gw.lines.clone();
        assert_eq!(gw.exit_code(), Some(1));
        let log = log.0.lock().unwrap_or_else(|e| e.into_inner()).lines.join("\n");
        assert!(log.contains("schema version 99"), "{log}");
        assert!(log.contains("newer gateway"), "{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device asleep when the gateway is killed: the restarted gateway holds its session
/// asleep again (from the store), reopens its broker connection, and the device's next
/// PINGREQ gets what was held for it, under its old topic ids, then PINGRESP. In
/// transparent mode the broker's session also delivers what was published while the
/// gateway was down; in aggregating mode the shared connections are clean sessions, so
/// that is lost (docs/persistence.md), but what the gateway held at the crash is not.
fn a_device_asleep_at_the_crash_wakes_with_pingreq_after_the_restart(name: &str, mode: &[&str]) {
    let Some(Site {
        dir,
        mosquitto,
        broker,
        state,
        udp,
    }) = Site::new(name)
    else {
        return;
    };
    let transparent = mode.is_empty();
    let metrics = free_tcp_port();
    let metrics_arg = format!("127.0.0.1:{metrics}");
    let mut extra = vec!["--metrics", &metrics_arg];
    extra.extend_from_slice(mode);
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    let sleeper = Device::new(gw_addr);
    sleeper.connect("sleeper", false);
    let down = sleeper.subscribe("persist/sleeper/down", 1);
    let up = sleeper.register("persist/sleeper/up", 2);
    // Asleep for 10 minutes.
    sleeper.exchange(&Packet::Disconnect(Some(600)), |p| {
        matches!(p, Packet::Disconnect(_)).then_some(())
    });
    let observer = Observer::connect(mosquitto.port, &format!("{name}-observer"), "persist/sleeper/up");
    let publish = |data: &[u8]| {
        observer
            .client
            .publish("persist/sleeper/down", rumqttc::QoS::AtLeastOnce, false, data.to_vec())
            .expect("queue publish");
    };
    publish(b"held at the crash");
    wait_metric(metrics, "mqttsn_held_messages", 1.0);
    gw.kill_9();
    if transparent {
        publish(b"while down");
    }
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    gw.wait_line("state store opened");
    assert!(gw.log().contains("asleep=1"), "{}", gw.log());
    wait_metric(metrics, "mqttsn_sessions_asleep", 1.0);
    wait_metric(metrics, "mqttsn_held_messages", if transparent { 2.0 } else { 1.0 });

    // It wakes: held messages first (no REGISTER: its ids are kept), then PINGRESP.
    sleeper.send(&Packet::PingReq(Some("sleeper")));
    let (topic, data, registered) = sleeper.receive();
    assert_eq!(data, b"held at the crash");
    assert!(registered.is_empty(), "{registered:?}");
    assert_eq!(topic, TopicRef::Normal(down));
    if transparent {
        let (topic, data, _) = sleeper.receive();
        assert_eq!((topic, data.as_slice()), (TopicRef::Normal(down), &b"while down"[..]));
    }
    let resp = loop {
        match Packet::decode(&sleeper.recv()) {
            Ok(Packet::Publish(p)) => panic!("delivered again: {:?}", p.data),
            Ok(p) => break format!("{p:?}"),
            Err(_) => {}
        }
    };
    assert_eq!(resp, format!("{:?}", Packet::PingResp));
    // Awake for good: its registered id publishes.
    sleeper.connect("sleeper", false);
    assert_eq!(
        sleeper.publish_qos1(TopicRef::Normal(up), 9, b"awake"),
        ReturnCode::Accepted
    );
    assert_eq!(observer.next(), ("persist/sleeper/up".to_string(), b"awake".to_vec()));
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transparent_a_device_asleep_at_the_crash_wakes_with_pingreq_after_the_restart() {
    a_device_asleep_at_the_crash_wakes_with_pingreq_after_the_restart("asleep-transparent", &[]);
}

#[test]
fn aggregating_a_device_asleep_at_the_crash_wakes_with_pingreq_after_the_restart() {
    a_device_asleep_at_the_crash_wakes_with_pingreq_after_the_restart("asleep-aggregating", &["--mode", "aggregating"]);
}

/// The next PUBLISH the gateway sends (other packets skipped): message id, DUP, data.
fn next_publish(device: &Device) -> (u16, bool, Vec<u8>) {
    loop {
        if let Ok(Packet::Publish(p)) = Packet::decode(&device.recv()) {
            return (p.msg_id, p.dup, p.data.to_vec());
        }
    }
}

/// A QoS 2 message delivered to a device that had not answered PUBREC when the gateway
/// was killed goes out again after the restart under the same message id with DUP (so
/// the device, which remembers the id, passes it on once), and the exchange completes.
fn qos2_across_kill_9(name: &str, mode: &[&str]) {
    let Some(Site {
        dir,
        mosquitto,
        broker,
        state,
        udp,
    }) = Site::new(name)
    else {
        return;
    };
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let gw = Gateway::start(&args(udp, &broker, &state, mode));
    let device = Device::new(gw_addr);
    device.connect("exactly", false);
    device.subscribe_at("persist/q2/down", 1, QoS::ExactlyOnce);
    let observer = Observer::connect(mosquitto.port, &format!("{name}-observer"), "persist/q2/up");
    observer
        .client
        .publish(
            "persist/q2/down",
            rumqttc::QoS::ExactlyOnce,
            false,
            b"just once".to_vec(),
        )
        .expect("queue publish");
    let (msg_id, dup, data) = next_publish(&device);
    assert_eq!((dup, data.as_slice()), (false, &b"just once"[..]));
    // No PUBREC: the gateway dies with the exchange open.
    gw.kill_9();
    let gw = Gateway::start(&args(udp, &broker, &state, mode));
    gw.wait_line("state store opened");
    device.connect("exactly", false);
    let (again, dup, data) = next_publish(&device);
    assert_eq!(data, b"just once");
    assert_eq!((again, dup), (msg_id, true), "the same message id, with DUP");
    device.exchange(&Packet::PubRec(msg_id), |p| {
        matches!(p, Packet::PubRel(id) if *id == msg_id).then_some(())
    });
    device.send(&Packet::PubComp(msg_id));
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transparent_a_qos2_delivery_open_at_kill_9_goes_out_again_under_its_message_id() {
    qos2_across_kill_9("q2-transparent", &[]);
}

#[test]
fn aggregating_a_qos2_delivery_open_at_kill_9_goes_out_again_under_its_message_id() {
    qos2_across_kill_9("q2-aggregating", &["--mode", "aggregating"]);
}

/// Aggregating mode with a state store keeps the shared connection's MQTT session at the
/// broker (clean session false): what is published while the gateway is down is queued
/// by the broker and reaches the clean-session-false device after the restart, and a
/// filter only a clean-session device held is unsubscribed when the session is resumed.
#[test]
fn in_aggregating_mode_what_is_published_while_the_gateway_is_down_is_delivered() {
    let Some(Site {
        dir,
        mosquitto,
        broker,
        state,
        udp,
    }) = Site::new("outage")
    else {
        return;
    };
    let extra = ["--mode", "aggregating"];
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    let away = Device::new(gw_addr);
    away.connect("outage", false);
    let down = away.subscribe("agg/outage/down", 1);
    away.exchange(&Packet::Disconnect(None), |p| {
        matches!(p, Packet::Disconnect(_)).then_some(())
    });
    let passing = Device::new(gw_addr);
    passing.connect("passing", true);
    passing.subscribe("agg/passing/#", 2);
    gw.kill_9();

    let observer = Observer::connect(mosquitto.port, "outage-observer", "agg/none");
    observer
        .client
        .publish(
            "agg/outage/down",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"while down".to_vec(),
        )
        .expect("queue publish");
    // Published once the broker has it (the observer's PUBACK).
    std::thread::sleep(Duration::from_millis(300));
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    gw.wait_line("session_present=true");
    gw.wait_line("unsubscribing the filters no device holds any more");
    assert!(gw.log().contains("filters=1"), "{}", gw.log());
    away.connect("outage", false);
    let (topic, data, registered) = away.receive();
    assert_eq!(data, b"while down");
    assert_eq!(topic, TopicRef::Normal(down));
    assert!(registered.is_empty(), "{registered:?}");
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A metric's value from the gateway's /metrics (`None`: not served, or not there).
fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `name` reads `want` (the gateway refreshes its figures every 100 ms).
fn wait_metric(port: u16, name: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while metric(port, name) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{name} never reached {want}: {:?}",
            metric(port, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Aggregating mode, where the broker knows only the gateway: after `kill -9`, what the
/// gateway held for its clean-session-false devices (their subscriptions, a message
/// queued while one was away, a message delivered to another and not yet acknowledged)
/// is read back from the store.
#[test]
fn in_aggregating_mode_subscriptions_and_held_messages_survive_kill_9() {
    let Some(Site {
        dir,
        mosquitto,
        broker,
        state,
        udp,
    }) = Site::new("aggregating")
    else {
        return;
    };
    let metrics = free_tcp_port();
    let metrics_arg = format!("127.0.0.1:{metrics}");
    let extra = ["--mode", "aggregating", "--metrics", &metrics_arg];
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));

    // "away" subscribes and leaves (clean session false); "slow" stays, subscribed.
    let away = Device::new(gw_addr);
    away.connect("away", false);
    let away_down = away.subscribe("agg/away/down", 1);
    away.exchange(&Packet::Disconnect(None), |p| {
        matches!(p, Packet::Disconnect(_)).then_some(())
    });
    let slow = Device::new(gw_addr);
    slow.connect("slow", false);
    let slow_down = slow.subscribe("agg/slow/down", 2);
    wait_metric(metrics, "mqttsn_aggregate_away_devices", 1.0);
    // A clean-session device with a will is connected when the gateway dies.
    let willing = Device::new(gw_addr);
    willing.connect_with_will("willing", "agg/willing/up", b"lost with the gateway");

    let observer = Observer::connect(mosquitto.port, "agg-observer", "agg/+/up");
    let publish = |topic: &str, data: &[u8]| {
        observer
            .client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, data.to_vec())
            .expect("queue publish");
    };
    // Queued for the away device: the gateway acknowledges it to the broker only once it
    // is stored, and the figure is refreshed after that commit.
    publish("agg/away/down", b"queued while away");
    wait_metric(metrics, "mqttsn_aggregate_queued_messages", 1.0);
    // Delivered to the slow device, which never acknowledges it (stored as it went).
    publish("agg/slow/down", b"never acknowledged");
    let got = loop {
        if let Ok(Packet::Publish(p)) = Packet::decode(&slow.recv()) {
            break p.data.to_vec();
        }
    };
    assert_eq!(got, b"never acknowledged");

    gw.kill_9();
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    gw.wait_line("state store opened");
    // The broker knew no will for it (the gateway is its only client): the restarted
    // gateway publishes the stored one.
    assert_eq!(
        observer.next(),
        ("agg/willing/up".to_string(), b"lost with the gateway".to_vec())
    );

    // Both come back with clean session false: each gets what was held for it, under the
    // topic id it had (no REGISTER), and a live message on the restored subscription.
    away.connect("away", false);
    let (topic, data, registered) = away.receive();
    assert_eq!(data, b"queued while away");
    assert_eq!(topic, TopicRef::Normal(away_down));
    assert!(registered.is_empty(), "{registered:?}");
    slow.connect("slow", false);
    let (topic, data, _) = slow.receive();
    assert_eq!(data, b"never acknowledged", "delivered again after the restart");
    assert_eq!(topic, TopicRef::Normal(slow_down));
    // The subscription was put back at the broker by the gateway, not by the device.
    wait_metric(metrics, "mqttsn_aggregate_filters", 2.0);
    publish("agg/away/down", b"after restart");
    let (_, data, _) = away.receive();
    assert_eq!(data, b"after restart");
    // Published once: a second restart has no will left to publish.
    gw.kill_9();
    let gw = Gateway::start(&args(udp, &broker, &state, &extra));
    gw.wait_line("state store opened");
    away.connect("away", false);
    publish("agg/away/down", b"marker");
    loop {
        // "after restart" may come again: the kill may have come before the PUBACK for
        // it was stored (at least once).
        let (_, data, _) = away.receive();
        if data == b"marker" {
            break;
        }
        assert_eq!(data, b"after restart");
    }
    assert!(observer.messages.try_recv().is_err(), "the will was published again");
    gw.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
