//! SIGHUP as the binary handles it (a real process, a real signal): the configuration
//! file is read again and `log.level` and `[predefined]` change without a restart;
//! other changes are named as needing a restart and not applied; a bad file keeps the
//! running settings and says why, with the text `--check-config` prints.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sn_codec::{Connect, GwInfo, Packet, PubAck, Publish, QoS, ReturnCode, TopicRef};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

/// How long anything that must happen may take (a loaded, shared machine).
const WAIT: Duration = Duration::from_secs(30);

/// A datagram that does not decode (its length octet says 5): logged at debug level as
/// "malformed datagram dropped", so it shows which level is in force.
const MALFORMED: &[u8] = b"\x05";
const MALFORMED_LINE: &str = "malformed datagram dropped";

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
    let dir = std::env::temp_dir().join(format!("gw-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes `text` to `path` as editors and configuration tools do: a new file renamed
/// over the old one, so the gateway never reads half a file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// The gateway binary with a configuration file, its stderr collected line by line.
struct Gateway {
    child: Child,
    config: PathBuf,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

/// What the gateway wrote to stderr, and whether it closed it (it exited).
#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

impl Gateway {
    /// Starts the binary with `--config <dir>/gateway.toml` holding `text` (and `flags`),
    /// and waits until it listens.
    fn start(dir: &Path, text: &str, flags: &[&str]) -> Gateway {
        Self::start_with_rust_log(dir, text, flags, None)
    }

    /// [`Gateway::start`], with `RUST_LOG` set to `rust_log` when given.
    fn start_with_rust_log(dir: &Path, text: &str, flags: &[&str], rust_log: Option<&str>) -> Gateway {
        let config = dir.join("gateway.toml");
        write_config(&config, text);
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&config).args(flags);
        // The environment is a configuration layer: nothing of the caller's may leak in.
        match rust_log {
            Some(v) => cmd.env("RUST_LOG", v),
            None => cmd.env_remove("RUST_LOG"),
        };
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
        let gw = Gateway { child, config, lines };
        gw.wait_line(0, "listening for MQTT-SN on UDP");
        gw
    }

    /// Lines written so far.
    fn mark(&self) -> usize {
        self.lines.0.lock().unwrap_or_else(|e| e.into_inner()).lines.len()
    }

    fn log(&self) -> String {
        self.lines.0.lock().unwrap_or_else(|e| e.into_inner()).lines.join("\n")
    }

    /// Lines `from..to`.
    fn lines(&self, from: usize, to: usize) -> Vec<String> {
        let lines = self.lines.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.lines.get(from..to).map(<[String]>::to_vec).unwrap_or_default()
    }

    /// Waits for a line at index `from` or later containing `needle`; its index. Fails
    /// at once if the gateway exits (closes stderr) first.
    fn wait_line(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + WAIT;
        let (lock, cvar) = &*self.lines;
        let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = lines.lines.iter().skip(from).position(|l| l.contains(needle)) {
                return from + i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !lines.closed,
                "no line containing {needle:?} after line {from} (gateway exited: {}); stderr:\n{}",
                lines.closed,
                lines.lines.join("\n")
            );
            lines = cvar.wait_timeout(lines, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn rewrite(&self, text: &str) {
        write_config(&self.config, text);
    }

    fn hup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Sends SIGHUP and waits for the reload to be done (its first line after `from`
    /// containing `needle`); the index of that line.
    fn reload(&self, needle: &str) -> usize {
        let from = self.mark();
        self.hup();
        self.wait_line(from, needle)
    }

    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("try_wait");
        assert!(
            status.is_none(),
            "the gateway exited: {status:?}; stderr:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then the exit status must be 0.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the gateway did not stop; stderr:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "exit status; stderr:\n{}", self.log());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    fn send_raw(&self, data: &[u8]) {
        self.socket.send_to(data, self.gateway).expect("send");
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

    /// SEARCHGW answered by GWINFO: the gateway's id. Also a fence: every datagram this
    /// device sent before has been handled by then (one socket, one queue, in order).
    fn search(&self) -> u8 {
        self.exchange(&Packet::SearchGw { radius: 0 }, |p| match p {
            Packet::GwInfo(GwInfo { gw_id, .. }) => Some(*gw_id),
            _ => None,
        })
    }

    fn connect(&self, client_id: &str) {
        let connect = Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id,
        });
        self.exchange(&connect, |p| match p {
            Packet::ConnAck(ReturnCode::Accepted) => Some(()),
            Packet::ConnAck(code) => panic!("CONNACK {code:?}"),
            _ => None,
        });
    }
}

fn publish(qos: QoS, topic: TopicRef, msg_id: u16, data: &[u8]) -> Packet<'_> {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        msg_id,
        data,
    })
}

/// A configuration serving UDP on `udp` with the embedded broker.
fn embedded(udp: u16, rest: &str) -> String {
    format!(
        "[udp]\nlisten = [\"127.0.0.1:{udp}\"]\n[broker]\nembedded = true\nembedded_listen = \"127.0.0.1:{}\"\n{rest}",
        free_tcp_port()
    )
}

fn udp_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[test]
fn sighup_changes_the_log_level() {
    let dir = temp_dir("level");
    let udp = free_udp_port();
    let base = embedded(udp, "");
    let gw = Gateway::start(&dir, &format!("{base}[log]\nlevel = \"info\"\n"), &[]);
    let dev = Device::new(udp_addr(udp));

    // At info, a malformed datagram writes nothing.
    dev.send_raw(MALFORMED);
    dev.search();
    gw.rewrite(&format!("{base}[log]\nlevel = \"debug\"\n"));
    let reloaded = gw.reload("reload: log.level info -> debug");
    let before = gw.lines(0, reloaded);
    assert!(
        !before.iter().any(|l| l.contains(MALFORMED_LINE)),
        "a debug line at info:\n{}",
        gw.log()
    );
    assert!(gw.log().contains(" INFO "), "the reload line is INFO:\n{}", gw.log());

    // At debug it is logged.
    dev.send_raw(MALFORMED);
    gw.wait_line(reloaded, MALFORMED_LINE);

    // And back to info: not logged any more. The second SIGHUP, with the file as it is,
    // changes nothing and fences the log.
    gw.rewrite(&format!("{base}[log]\nlevel = \"info\"\n"));
    let back = gw.reload("reload: log.level debug -> info");
    dev.send_raw(MALFORMED);
    dev.search();
    let fence = gw.reload("reload: nothing changed");
    let between = gw.lines(back, fence);
    assert!(
        !between.iter().any(|l| l.contains(MALFORMED_LINE)),
        "a debug line after the level went back to info:\n{}",
        gw.log()
    );
    gw.stop();
}

#[test]
fn rust_log_keeps_setting_the_level_at_a_reload() {
    let dir = temp_dir("rust-log");
    let udp = free_udp_port();
    let base = embedded(udp, "");
    let gw = Gateway::start_with_rust_log(&dir, &format!("{base}[log]\nlevel = \"info\"\n"), &[], Some("info"));
    let dev = Device::new(udp_addr(udp));
    gw.rewrite(&format!("{base}[log]\nlevel = \"debug\"\n"));
    let i = gw.reload("reload: log.level info -> debug not applied: RUST_LOG=info sets the level");
    assert!(gw.lines(i, i + 1).concat().contains(" WARN "));
    dev.send_raw(MALFORMED);
    dev.search();
    let fence = gw.reload("reload: nothing changed");
    assert!(
        !gw.lines(i, fence).iter().any(|l| l.contains(MALFORMED_LINE)),
        "log.level applied over RUST_LOG:\n{}",
        gw.log()
    );
    gw.stop();
}

/// The first line of each error `--check-config` reports for the file at `path`.
fn check_config_errors(path: &Path) -> Vec<String> {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .env_remove("RUST_LOG")
        .output()
        .expect("run --check-config");
    assert_eq!(out.status.code(), Some(2), "--check-config should refuse the file");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("error: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_bad_file_on_reload_keeps_the_running_settings() {
    let dir = temp_dir("bad");
    let udp = free_udp_port();
    let base = embedded(udp, "");
    let good = format!("{base}[log]\nlevel = \"debug\"\n[predefined]\n10 = \"a/b\"\n");
    let mut gw = Gateway::start(&dir, &good, &[]);
    let dev = Device::new(udp_addr(udp));
    let syntax = format!("{good}\n[gateway\nid = 3\n");
    let invalid = format!("{base}[log]\nlevel = \"loud\"\n[gateway]\nid = 3\n[timers]\nmax_retries = 100000\n");
    for (what, text) in [
        ("a syntax error", Some(syntax)),
        ("invalid values", Some(invalid)),
        ("a missing file", None),
    ] {
        match &text {
            Some(text) => gw.rewrite(text),
            None => std::fs::remove_file(&gw.config).expect("remove config"),
        }
        let expected = check_config_errors(&gw.config);
        assert!(!expected.is_empty(), "{what}: --check-config printed no error");
        let from = gw.mark();
        gw.hup();
        for error in &expected {
            let i = gw.wait_line(from, &format!("reload failed, running settings kept: {error}"));
            let line = gw.lines(i, i + 1).concat();
            assert!(line.contains(" ERROR "), "{what}: not an ERROR line: {line}");
        }
        // Still running, still serving, still at the old level (debug).
        gw.assert_running();
        dev.send_raw(MALFORMED);
        gw.wait_line(from, MALFORMED_LINE);
        assert_eq!(dev.search(), 1, "{what}: the gateway id changed");
    }
    // The predefined topic was kept too: a good file that removes it says so.
    gw.rewrite(&format!("{base}[log]\nlevel = \"debug\"\n"));
    gw.reload("reload: predefined +0 -1 ~0");
    gw.stop();
}

#[test]
fn a_change_that_needs_a_restart_is_named_and_not_applied() {
    let dir = temp_dir("restart");
    let (udp, other) = (free_udp_port(), free_udp_port());
    let tcp = free_tcp_port();
    let file = |udp: u16, id: u8, interval: u64| {
        format!(
            "[udp]\nlisten = [\"127.0.0.1:{udp}\"]\n[broker]\nembedded = true\nembedded_listen = \"127.0.0.1:{tcp}\"\n\
             [gateway]\nid = {id}\nstats_interval_secs = {interval}\n"
        )
    };
    // --gateway-id keeps its precedence over the file at a reload, as at start.
    let gw = Gateway::start(&dir, &file(udp, 3, 60), &["--gateway-id", "5"]);
    let dev = Device::new(udp_addr(udp));
    assert_eq!(dev.search(), 5);

    gw.rewrite(&file(other, 9, 30));
    let i = gw.reload("needs a restart, not applied");
    let line = gw.lines(i, i + 1).concat();
    assert!(line.contains(" WARN "), "not a warning: {line}");
    assert!(
        line.contains("reload: gateway.stats_interval_secs, udp.listen changed"),
        "the keys that changed (and only those; gateway.id is set by a flag): {line}"
    );
    // Not applied: the old address still serves, with the flag's id; the new address is
    // not the gateway's (this test can bind it).
    assert_eq!(dev.search(), 5);
    UdpSocket::bind(udp_addr(other)).expect("the new address must not have been bound by the gateway");
    gw.stop();
}

// ---------------------------------------------------------------------------------------
// Predefined topics, end to end through mosquitto.
// ---------------------------------------------------------------------------------------

/// A mosquitto process on a free loopback port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    /// Starts mosquitto from PATH or /usr/sbin. Not installed: a failure under
    /// `CI=true`, else `None` and a loud note (the caller then uses the embedded broker).
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
            eprintln!("NOTE: mosquitto not found; the predefined-topics reload test runs against the embedded broker");
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

/// An MQTT client at the broker, subscribed to `filter`.
struct Observer {
    messages: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    _client: rumqttc::Client,
}

impl Observer {
    fn subscribe(port: u16, filter: &str) -> Observer {
        let mut opts = rumqttc::MqttOptions::new("reload-observer", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = rumqttc::Client::new(opts, 16);
        client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .expect("queue subscribe");
        let (tx, messages) = std::sync::mpsc::channel();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // rumqttc reconnects on the next iteration; do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        subscribed.recv_timeout(WAIT).expect("the observer's SUBACK");
        Observer {
            messages,
            _client: client,
        }
    }

    fn next(&self) -> (String, Vec<u8>) {
        self.messages.recv_timeout(WAIT).expect("a message at the broker")
    }
}

#[test]
fn predefined_topics_change_on_reload() {
    let dir = temp_dir("predefined");
    let mosquitto = Mosquitto::start(&dir);
    let udp = free_udp_port();
    let (broker, port) = match &mosquitto {
        Some(m) => (format!("[broker]\nurl = \"mqtt://127.0.0.1:{}\"\n", m.port), m.port),
        None => {
            let port = free_tcp_port();
            (
                format!("[broker]\nembedded = true\nembedded_listen = \"127.0.0.1:{port}\"\n"),
                port,
            )
        }
    };
    let file = |predefined: &str| format!("[udp]\nlisten = [\"127.0.0.1:{udp}\"]\n{broker}[predefined]\n{predefined}");
    let gw = Gateway::start(&dir, &file("10 = \"reload/old\"\n"), &[]);
    let observer = Observer::subscribe(port, "reload/#");
    let sensor = Device::new(udp_addr(udp));

    // Before: id 10 reaches the broker (QoS -1, no connection needed).
    sensor.send(&publish(QoS::MinusOne, TopicRef::Predefined(10), 0, b"before"));
    assert_eq!(observer.next(), ("reload/old".to_string(), b"before".to_vec()));

    // 10 removed, 11 added.
    gw.rewrite(&file("11 = \"reload/new\"\n"));
    gw.reload("reload: predefined +1 -1 ~0");

    // QoS -1: 10 is dropped, 11 arrives (in order from one socket: the first message the
    // broker gets is the second one sent).
    sensor.send(&publish(QoS::MinusOne, TopicRef::Predefined(10), 0, b"removed"));
    sensor.send(&publish(QoS::MinusOne, TopicRef::Predefined(11), 0, b"added"));
    assert_eq!(observer.next(), ("reload/new".to_string(), b"added".to_vec()));

    // A connected device: QoS 1 to the removed id is refused with "invalid topic id";
    // QoS 0 to the added one reaches the broker.
    let device = Device::new(udp_addr(udp));
    device.connect("reload-device");
    let code = device.exchange(
        &publish(QoS::AtLeastOnce, TopicRef::Predefined(10), 7, b"refused"),
        |p| match p {
            Packet::PubAck(PubAck { msg_id: 7, code, .. }) => Some(*code),
            _ => None,
        },
    );
    assert_eq!(code, ReturnCode::InvalidTopicId);
    device.send(&publish(QoS::AtMostOnce, TopicRef::Predefined(11), 0, b"qos0"));
    assert_eq!(observer.next(), ("reload/new".to_string(), b"qos0".to_vec()));
    gw.stop();
}

impl Device {
    /// CONNECT (sent again every 300 ms until answered); the CONNACK's return code.
    fn try_connect(&self, client_id: &str) -> ReturnCode {
        let connect = Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id,
        });
        self.exchange(&connect, |p| match p {
            Packet::ConnAck(code) => Some(*code),
            _ => None,
        })
    }

    /// A QoS 1 PUBLISH; the PUBACK's return code (a device without a session would be
    /// answered DISCONNECT, which fails the test).
    fn publish_qos1(&self, topic: TopicRef, msg_id: u16) -> ReturnCode {
        self.exchange(&publish(QoS::AtLeastOnce, topic, msg_id, b"x"), |p| match p {
            Packet::PubAck(PubAck { msg_id: m, code, .. }) if *m == msg_id => Some(*code),
            Packet::Disconnect(_) => panic!("DISCONNECT: the session is gone"),
            _ => None,
        })
    }
}

#[test]
fn sighup_reloads_the_device_registry_while_devices_stay_connected() {
    let dir = temp_dir("devices");
    let udp = free_udp_port();
    let devices = dir.join("devices.toml");
    let entry = |id: &str| format!("[[device]]\nclient_id = \"{id}\"\npublish = [\"t/%c\"]\n");
    write_config(&devices, &entry("dev-a"));
    let config = embedded(
        udp,
        &format!(
            "[auth]\ndevices_file = {:?}\n[predefined]\n1 = \"t/dev-a\"\n2 = \"t/dev-b\"\n",
            devices.display().to_string()
        ),
    );
    let mut gw = Gateway::start(&dir, &config, &[]);
    let a = Device::new(udp_addr(udp));
    let b = Device::new(udp_addr(udp));
    a.connect("dev-a");
    assert_eq!(
        b.try_connect("dev-b"),
        ReturnCode::NotSupported,
        "not in the registry yet"
    );
    gw.wait_line(0, "CONNECT refused: no registry entry names the client id");

    // dev-b added: it connects, dev-a's session is untouched.
    write_config(&devices, &format!("{}{}", entry("dev-a"), entry("dev-b")));
    gw.reload("reload: devices +1 -0 ~0");
    assert_eq!(b.try_connect("dev-b"), ReturnCode::Accepted);
    assert_eq!(
        a.publish_qos1(TopicRef::Predefined(1), 1),
        ReturnCode::Accepted,
        "dev-a still connected"
    );
    assert_eq!(b.publish_qos1(TopicRef::Predefined(2), 1), ReturnCode::Accepted);

    // A bad file: logged, the registry in force kept.
    write_config(&devices, "[[device]]\nclient_id = \"dev-a\"\npublish = [\"a/#/b\"]\n");
    let from = gw.mark();
    gw.hup();
    gw.wait_line(from, "reload failed, running settings kept: auth.devices_file:");
    gw.assert_running();
    assert_eq!(b.publish_qos1(TopicRef::Predefined(2), 2), ReturnCode::Accepted);

    // dev-b removed: its session keeps running, allowed nothing; dev-a is unchanged.
    write_config(&devices, &entry("dev-a"));
    gw.reload("reload: devices +0 -1 ~0");
    assert_eq!(b.publish_qos1(TopicRef::Predefined(2), 3), ReturnCode::NotSupported);
    assert_eq!(a.publish_qos1(TopicRef::Predefined(1), 2), ReturnCode::Accepted);
    gw.stop();
}

/// The DTLS listener's certificate files are read again on SIGHUP: a device CA rotated
/// in place (same path, new contents) applies without a restart, and the same files
/// again change nothing.
#[test]
fn sighup_reads_the_dtls_certificates_again() {
    let dir = temp_dir("dtls-certs");
    let udp = free_udp_port();
    let dtls = free_udp_port();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker/testdata");
    let ca = dir.join("device-ca.pem");
    std::fs::copy(data.join("ca.pem"), &ca).expect("copy CA");
    let devices = dir.join("devices.toml");
    write_config(
        &devices,
        "[[device]]\nclient_id = \"sensor-*\"\ncert_identity = \"%c\"\n",
    );
    let config = embedded(
        udp,
        &format!(
            "[auth]\ndevices_file = {:?}\n[[dtls]]\naddress = \"127.0.0.1:{dtls}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            devices.display().to_string(),
            data.join("client.pem").display().to_string(),
            data.join("client.key").display().to_string(),
            ca.display().to_string(),
        ),
    );
    let gw = Gateway::start(&dir, &config, &[]);
    gw.reload("reload: nothing changed");
    // Rotated: another certificate is the device CA now.
    std::fs::copy(data.join("client.pem"), &ca).expect("rotate CA");
    gw.reload("reload: the certificates of [[dtls]] #1 changed");
    let fence = gw.reload("reload: nothing changed");
    assert!(fence > 0);
    gw.stop();
}
