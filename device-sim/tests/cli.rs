//! The binary's exit codes and messages (no gateway needed).

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqtt-sn-sim"))
}

#[test]
fn pub_without_a_gateway_fails_with_a_clear_message() {
    // Port 9 (discard) on loopback: nobody answers.
    let out = sim()
        .args([
            "pub",
            "-g",
            "127.0.0.1:9",
            "-t",
            "a/b",
            "-m",
            "x",
            "-q",
            "1",
            "--timeout",
            "300ms",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no answer from the gateway"), "{err}");
}

#[test]
fn bad_arguments_are_refused() {
    let out = sim()
        .args(["pub", "-g", "127.0.0.1:9", "-m", "x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give a topic"));
    let out = sim()
        .args(["pub", "-g", "127.0.0.1:9", "-t", "a", "-m", "x", "-q", "-1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("QoS -1 needs"));
    let out = sim()
        .args(["pub", "-q", "3", "-t", "a", "-m", "x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
}

#[test]
fn qos_minus_one_needs_no_answer() {
    let out = sim()
        .args(["pub", "-g", "127.0.0.1:9", "--short", "ab", "-m", "x", "-q", "-1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn conformance_lists_its_checks() {
    let out = sim().args(["conformance", "--list"]).output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sleep-and-wake") && text.contains("hostile-input"),
        "{text}"
    );
    // Name, section and needs on one line.
    let line = text.lines().find(|l| l.starts_with("sleep-and-wake")).expect("listed");
    assert!(line.contains("6.14") && line.contains("broker"), "{line}");
    let line = text.lines().find(|l| l.starts_with("discovery")).expect("listed");
    assert!(line.contains("discovery-addr"), "{line}");
}

#[test]
fn conformance_refuses_unknown_check_names() {
    let out = sim().args(["conformance", "--only", "sleep"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown check \"sleep\"") && err.contains("sleep-and-wake"),
        "{err}"
    );
}

#[test]
fn conformance_reports_a_silent_gateway_as_failed() {
    // Port 9 (discard) on loopback: nobody answers.
    let out = sim()
        .args([
            "conformance",
            "-g",
            "127.0.0.1:9",
            "--only",
            "connect",
            "--timeout",
            "300ms",
            "--json",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json[0]["name"], "connect");
    assert_eq!(json[0]["outcome"], "fail");
    assert_eq!(json[0]["section"], "6.2");
}

#[test]
fn conformance_without_a_broker_skips_the_broker_checks() {
    let out = sim()
        .args(["conformance", "-g", "127.0.0.1:9", "--only", "publish-qos1", "--json"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json[0]["outcome"], "skipped");
    assert!(json[0]["detail"].as_str().unwrap_or("").contains("--broker"), "{json}");
}

#[test]
fn run_with_a_bad_scenario_fails() {
    let dir = std::env::temp_dir().join(format!("device-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[group]]\n[group.radio]\nloss = 7.0\n").expect("written");
    let out = sim().args(["run", "--scenario"]).arg(&path).output().expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loss"));
}

/// A file in a fresh temporary directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("device-sim-cli-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("written");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// 50 sleepy devices against the in-process echo gateway for 2 s.
const SLEEPY: &str = "[[group]]\nname = \"sleepy\"\ncount = 50\npublish_interval = \"500ms\"\n\
    ramp = \"200ms\"\nt_retry = \"300ms\"\nsleep = { duration = \"1s\", awake = \"100ms\" }\n";

fn sleepy_fleet(log: &str) -> (std::process::Output, String) {
    let scenario = TempFile::new("sleepy.toml", SLEEPY);
    let out = sim()
        .args(["run", "--echo", "-d", "2s", "--drain", "1s", "--scenario"])
        .arg(&scenario.0)
        .env("RUST_LOG", log)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, err)
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal() {
    let (out, err) = sleepy_fleet("debug");
    assert!(out.status.success(), "{err}");
    assert!(err.lines().count() > 50, "debug has per-device lines:\n{err}");
    assert!(!err.contains("\x1b["), "ANSI escapes in piped stderr:\n{err}");
}

#[test]
fn a_sleepy_fleet_at_info_writes_no_per_device_lines() {
    let (out, err) = sleepy_fleet("info");
    assert!(out.status.success(), "{err}");
    // A summary every 10 s at most (none in a run this short), nothing per device.
    assert!(
        err.lines().count() <= 2,
        "{} lines at info:\n{err}",
        err.lines().count()
    );
    assert!(!err.contains("device="), "{err}");
    // The report is on stdout, starting on a line of its own.
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.starts_with("run "), "{report}");
}

/// The error, on one line, and nothing else on stderr.
fn single_error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    err
}

#[test]
fn user_errors_are_one_line_even_with_rust_backtrace() {
    let out = sim()
        .args(["run", "--scenario", "/nonexistent/scenario.toml"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("runs");
    let err = single_error_line(&out);
    assert!(err.contains("cannot read /nonexistent/scenario.toml"), "{err}");
    // The cause once, not repeated.
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    let out = sim()
        .args(["pub", "-g", "nowhere", "-t", "a", "-m", "x"])
        .env("RUST_BACKTRACE", "full")
        .output()
        .expect("runs");
    single_error_line(&out);
}

#[test]
fn a_broker_that_is_down_is_one_clear_error_at_once() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let started = std::time::Instant::now();
    let out = sim()
        .args(["run", "-g", "127.0.0.1:9", "-n", "5", "-d", "2s", "-b"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "info")
        .output()
        .expect("runs");
    let err = single_error_line(&out);
    assert!(
        err.contains(&format!("cannot verify at the broker 127.0.0.1:{port}")) && err.contains("refused"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
