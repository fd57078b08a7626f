//! TLS to the broker as a user meets it through the binary: `--broker mqtts://...` with
//! `--broker-ca`, and a CA or client file that cannot be used is a start-up error (exit
//! 2, in `--check-config` too) naming the key and the file.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

fn gateway() -> Command {
    let mut c = Command::new(BIN);
    // No MQTT_SN_* leaking in from the caller (an unknown one is a start-up error).
    for (k, _) in std::env::vars() {
        if k.starts_with("MQTT_SN_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_BACKTRACE", "1");
    c
}

fn testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/broker/testdata")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_accepts_mqtts_with_a_ca_and_a_client_certificate() {
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtts://127.0.0.1:1",
        ])
        .args(["--broker-ca", &testdata("ca.pem")])
        .args([
            "--broker-cert",
            &testdata("client.pem"),
            "--broker-key",
            &testdata("client.key"),
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configuration OK");
}

#[test]
fn an_unreadable_ca_is_an_error_naming_key_and_file() {
    for check in [true, false] {
        let mut c = gateway();
        if check {
            c.arg("--check-config");
        }
        let out = c
            .args(["--udp", "127.0.0.1:0", "--broker", "mqtts://127.0.0.1:1"])
            .args(["--broker-ca", "/nonexistent/broker-ca.pem"])
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2), "check={check}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("error: broker.ca_file: cannot read /nonexistent/broker-ca.pem"),
            "check={check}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_invalid_ca_or_a_foreign_key_is_an_error_naming_key_and_file() {
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtts://127.0.0.1:1",
        ])
        .args(["--broker-ca", &testdata("client.key")])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("error: broker.ca_file: ") && err.contains("client.key: no PEM certificate"),
        "{err}"
    );

    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtts://127.0.0.1:1",
        ])
        .args(["--broker-ca", &testdata("ca.pem")])
        .args([
            "--broker-cert",
            &testdata("client.pem"),
            "--broker-key",
            &testdata("other.key"),
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("error: broker.client_key: ") && err.contains("other.key"),
        "{err}"
    );
}

#[test]
fn a_ca_for_a_plain_broker_is_an_error() {
    let out = gateway()
        .args([
            "--check-config",
            "--udp",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .args(["--broker-ca", &testdata("ca.pem")])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("error: broker.ca_file set, but the broker URL is not mqtts:// (TLS)"),
        "{err}"
    );
}
