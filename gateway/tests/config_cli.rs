//! The configuration as a user meets it through the binary: `--check-config`,
//! `--print-config`, start-up errors on one line, warnings at start, plain logs.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

fn gateway() -> Command {
    let mut c = Command::new(BIN);
    // A clean environment for the keys we test: no MQTT_SN_* leaking in from the caller.
    for (k, _) in std::env::vars() {
        if k.starts_with("MQTT_SN_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn check_config_accepts_a_good_configuration() {
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configuration OK");
}

/// Issue 9, item 5: a panic (exit 101) and silently half-configured gateways before.
#[test]
fn check_config_reports_every_error_and_exits_2() {
    let out = gateway()
        .args(["--check-config", "--retry-interval", "1e30", "--max-clients", "0"])
        .args(["--predefined", "7=a/b", "--predefined", "7=c/d"])
        .env("MQTT_SN_BROKER__INFLIGHT", "0")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("topic id 7 is given twice"), "{err}");

    let out = gateway()
        .args(["--check-config", "--retry-interval", "1e30", "--max-clients", "0"])
        .env("MQTT_SN_BROKER__INFLIGHT", "0")
        .env("MQTT_SN_BROKER__REQUEST_CAPACITY", "0")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "timers.retry_interval_secs",
        "limits.max_clients",
        "broker.inflight",
        "broker.request_capacity",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    assert_eq!(err.lines().count(), 4, "one line per error:\n{err}");

    // Without --check-config the same configuration stops before anything starts.
    let out = gateway()
        .args(["--max-clients", "0", "--udp", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unresolvable_broker_host_is_refused_at_start() {
    let out = gateway()
        .args(["--check-config", "--broker", "mqtt://no-such-host.invalid:1883"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-host.invalid"));
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let out = gateway()
        .args(["--print-config", "--max-retries", "9", "--username", "gw"])
        .env("MQTT_SN_BROKER__PASSWORD", "hunter2")
        .env("MQTT_SN_TIMERS__RETRY_INTERVAL_SECS", "4")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed: toml::Table = toml::from_str(&text).expect("TOML");
    assert_eq!(parsed["timers"]["max_retries"].as_integer(), Some(9));
    assert_eq!(parsed["timers"]["retry_interval_secs"].as_float(), Some(4.0));
    assert_eq!(parsed["udp"]["listen"][0].as_str(), Some("0.0.0.0:10000"));
    assert!(!text.contains("hunter2"), "the password is printed:\n{text}");
}

/// Issue 9, item 4: with the address taken, the gateway used to log "listening" and serve
/// through whatever broker held it.
#[test]
fn embedded_broker_address_in_use_fails_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let started = Instant::now();
    let out = gateway()
        .args(["--embedded-broker", "--embedded-broker-listen", &addr.to_string()])
        .args(["--udp", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&addr.to_string()) && lines[0].contains("in use"),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Issue 9, items 5 and 9: an unreachable broker is one WARN naming it; logs piped to a
/// file carry no colour codes.
#[test]
fn unreachable_broker_is_a_warning_and_logs_are_plain() {
    // A port nobody listens on: bind, note, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = gateway()
        .args(["--udp", "127.0.0.1:0", "--broker", &format!("mqtt://127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let warned = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains("WARN") && line.contains(&format!("127.0.0.1:{port}"));
                seen.push(line);
                if hit {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no WARN naming the broker:\n{}", seen.join("\n"));
    assert!(
        seen.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in piped logs:\n{}",
        seen.join("\n")
    );
}

/// `--check-config` loads the device registry: its errors name the file, the entry and
/// the key, and a password in it never shows in `--print-config`.
#[test]
fn check_config_reports_registry_errors() {
    let dir = std::env::temp_dir().join(format!("gw-cli-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let devices = dir.join("devices.toml");
    std::fs::write(
        &devices,
        "[[device]]\nclient_id = \"ok\"\nusername = \"u\"\npassword = \"hunter2\"\n\
         [[device]]\nclient_id = \"bad\"\naddresses = [\"10.0.0.0/99\"]\nsubscribe = [\"a/#/b\"]\n",
    )
    .expect("write");
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--devices",
        ])
        .arg(&devices)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let at = format!(
        "auth.devices_file: {}: [[device]] #2 (client_id \"bad\")",
        devices.display()
    );
    assert!(err.contains(&format!("{at}: addresses: \"10.0.0.0/99\"")), "{err}");
    assert!(err.contains(&format!("{at}: subscribe: \"a/#/b\"")), "{err}");

    std::fs::write(
        &devices,
        "[[device]]\nclient_id = \"ok\"\nusername = \"u\"\npassword = \"hunter2\"\n",
    )
    .expect("write");
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--devices",
        ])
        .arg(&devices)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = gateway()
        .args(["--print-config", "--devices"])
        .arg(&devices)
        .output()
        .expect("runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("devices_file") && !shown.contains("hunter2"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device's own TLS client certificate needs a TLS broker URL: with `mqtt://` the
/// entry is named as an error; with `mqtts://` the configuration is accepted.
#[test]
fn a_devices_client_certificate_needs_mqtts() {
    let testdata = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker/testdata");
    let dir = std::env::temp_dir().join(format!("gw-cli-device-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let devices = dir.join("devices.toml");
    std::fs::write(
        &devices,
        format!(
            "[[device]]\nclient_id = \"a\"\nclient_cert = {:?}\nclient_key = {:?}\n",
            testdata.join("client.pem").display().to_string(),
            testdata.join("client.key").display().to_string()
        ),
    )
    .expect("write");
    let check = |broker: &str| {
        gateway()
            .args([
                "--check-config",
                "--udp",
                "127.0.0.1:0",
                "--broker",
                broker,
                "--broker-ca",
            ])
            .arg(testdata.join("ca.pem"))
            .arg("--devices")
            .arg(&devices)
            .output()
            .expect("runs")
    };
    let out = check("mqtts://127.0.0.1:8883");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--devices",
        ])
        .arg(&devices)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("#1 (client_id \"a\"): client_cert is set, but the broker URL is not mqtts://"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
