//! `--log-format` and `log.level` as the binary applies them: JSON lines on stderr, a
//! configured level that silences INFO, and bad values refused with exit status 2.

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn gateway(extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--embedded-broker",
        "--embedded-broker-listen",
        &format!("127.0.0.1:{}", free_tcp_port()),
        "--udp",
        &format!("127.0.0.1:{}", free_udp_port()),
    ])
    .args(extra)
    .env_remove("RUST_LOG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

/// Runs the gateway until it has logged `want` lines (or for at most 10 s), stops it
/// with SIGTERM and returns what it wrote to stderr.
fn run_and_stop(mut child: Child, settle: Duration) -> String {
    std::thread::sleep(settle);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let status = child.wait().expect("wait");
    let mut log = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut log);
    }
    assert_eq!(status.code(), Some(0), "exit status {status:?}, stderr:\n{log}");
    log
}

#[test]
fn json_format_writes_one_object_per_line() {
    let child = gateway(&["--log-format", "json", "--stats-interval", "1"])
        .spawn()
        .expect("spawn gateway");
    let log = run_and_stop(child, Duration::from_millis(2500));
    let lines: Vec<&str> = log.lines().collect();
    // At least the start line, a statistics line and the stop line.
    assert!(lines.len() >= 3, "too few lines:\n{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nall:\n{log}"));
        let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(obj.get("level").and_then(|l| l.as_str()).is_some(), "no level: {line}");
        assert!(
            obj.get("message").and_then(|m| m.as_str()).is_some(),
            "no message: {line}"
        );
        assert!(obj.contains_key("timestamp"), "no timestamp: {line}");
    }
    assert!(log.contains("\"level\":\"INFO\""), "no INFO line:\n{log}");
}

#[test]
fn text_format_is_the_default() {
    let child = gateway(&[]).spawn().expect("spawn gateway");
    let log = run_and_stop(child, Duration::from_millis(1000));
    assert!(log.lines().any(|l| l.contains(" INFO ")), "no INFO text line:\n{log}");
    assert!(!log.trim_start().starts_with('{'), "JSON by default:\n{log}");
}

#[test]
fn a_warn_level_in_the_file_silences_info() {
    let dir = std::env::temp_dir().join(format!("sn-gw-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("warn.toml");
    std::fs::write(&path, "[log]\nlevel = \"warn\"\n").expect("write");
    let child = gateway(&["--config", path.to_str().expect("utf-8"), "--stats-interval", "1"])
        .spawn()
        .expect("spawn gateway");
    let log = run_and_stop(child, Duration::from_millis(2500));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!log.contains("INFO"), "INFO lines at level warn:\n{log}");
}

#[test]
fn bad_format_or_level_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("sn-gw-badlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let bad_level = dir.join("bad-level.toml");
    std::fs::write(&bad_level, "[log]\nlevel = \"gateway=loud\"\n").expect("write");
    let bad_format = dir.join("bad-format.toml");
    std::fs::write(&bad_format, "[log]\nformat = \"xml\"\n").expect("write");
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--config", bad_level.to_str().expect("utf-8")], "log.level"),
        (vec!["--config", bad_format.to_str().expect("utf-8")], "log.format"),
        (vec!["--log-level", "loud"], "log.level"),
        (vec!["--log-format", "yaml"], "log.format"),
    ];
    for (args, key) in cases {
        let out = gateway(&args).stderr(Stdio::piped()).output().expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(key), "{args:?}: the error does not name {key}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fatal error at start (here the embedded broker's address is taken) is an ERROR
/// object in a JSON log, not a plain `error:` line.
#[test]
fn a_fatal_error_in_a_json_log_is_json_too() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(BIN)
        .args(["--embedded-broker", "--embedded-broker-listen", &addr])
        .args(["--udp", "127.0.0.1:0", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let mut errors = 0;
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nall:\n{err}"));
        if v["level"] == "ERROR" {
            errors += 1;
            assert!(v["message"].as_str().is_some_and(|m| m.contains("in use")), "{line}");
        }
    }
    assert_eq!(errors, 1, "{err}");
}
