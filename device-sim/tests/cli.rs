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
