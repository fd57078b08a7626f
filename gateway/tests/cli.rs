//! The binary as a user runs it: `--help`, bad configuration, and the README's
//! "nothing else installed" command with the embedded broker.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sn_codec::{Connect, Packet, ReturnCode};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn help_documents_the_flags() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--udp",
        "--broker",
        "--config",
        "--predefined",
        "--embedded-broker",
        "--retry-interval",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("sn-gw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[broker]\nurl = \"mqtt://127.0.0.1:1883\"\nbogus = 1\n").expect("write");
    let out = Command::new(BIN).arg("--config").arg(&path).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "error does not name the bad key: {err}");
    let out = Command::new(BIN)
        .args(["--predefined", "nonsense"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
}

/// What the Debian package installs in /etc passes `--check-config` (the package test,
/// scripts/package-test.sh, checks the installed copy the same way).
#[test]
fn packaged_configuration_passes_check_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/gateway.toml");
    let out = Command::new(BIN)
        .args(["--check-config", "-c", path])
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{path}: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configuration OK");
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The README's "nothing else installed" command: a device connects through the
/// embedded broker.
#[test]
fn embedded_broker_serves_a_device_end_to_end() {
    let (_gw, _dev) = gateway_with_a_device("cli-test");
}

/// Starts the binary with its embedded broker and connects one device; the gateway
/// process and the device's socket.
fn gateway_with_a_device(client_id: &str) -> (Kill, UdpSocket) {
    let udp = free_udp_port();
    let tcp = free_tcp_port();
    let gw = Kill(
        Command::new(BIN)
            .args([
                "--embedded-broker",
                "--embedded-broker-listen",
                &format!("127.0.0.1:{tcp}"),
                "--udp",
                &format!("127.0.0.1:{udp}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gateway"),
    );
    let dev = UdpSocket::bind("127.0.0.1:0").expect("bind");
    dev.connect(("127.0.0.1", udp)).expect("connect");
    dev.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let connect = Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 30,
        client_id,
    });
    let mut buf = [0u8; 64];
    let n = connect.encode(&mut buf).expect("encode");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The gateway needs a moment to start: CONNECT is retried as a device would.
    loop {
        assert!(Instant::now() < deadline, "no CONNACK from the gateway binary");
        let _ = dev.send(&buf[..n]);
        let mut rx = [0u8; 64];
        if let Ok(len) = dev.recv(&mut rx) {
            assert_eq!(Packet::decode(&rx[..len]), Ok(Packet::ConnAck(ReturnCode::Accepted)));
            break;
        }
    }
    (gw, dev)
}

/// What systemd and Docker send (SIGTERM), and Ctrl-C (SIGINT): the awake device is told
/// (DISCONNECT) and the process exits 0.
#[test]
fn sigterm_and_sigint_stop_gracefully_with_exit_0() {
    for signal in ["-TERM", "-INT"] {
        let (mut gw, dev) = gateway_with_a_device(&format!("cli-stop{signal}"));
        let status = Command::new("kill")
            .args([signal, &gw.0.id().to_string()])
            .status()
            .expect("runs kill");
        assert!(status.success());
        dev.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut rx = [0u8; 64];
        let len = dev.recv(&mut rx).expect("DISCONNECT from the stopping gateway");
        assert_eq!(Packet::decode(&rx[..len]), Ok(Packet::Disconnect(None)), "{signal}");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = gw.0.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "{signal}: the gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "{signal}: exit status {status:?}");
    }
}
