//! `--dtls` through the binary: a DTLS listener needs the device registry's keys, and
//! says so before anything starts.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

fn gateway() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("MQTT_SN_") {
            c.env_remove(k);
        }
    }
    c
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dtls-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn dtls_without_a_registry_of_keys_is_refused_naming_the_keys() {
    let out = gateway()
        .args([
            "--check-config",
            "--dtls",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[[dtls]]") && err.contains("psk_identity") && err.contains("auth.devices_file"),
        "{err}"
    );

    let dir = scratch("nokeys");
    let devices = dir.join("devices.toml");
    std::fs::write(&devices, "[[device]]\nclient_id = \"s\"\n").expect("write");
    let out = gateway()
        .args([
            "--check-config",
            "--dtls",
            "127.0.0.1:0",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .arg("--devices")
        .arg(&devices)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dtls_with_keys_checks_out_and_prints_its_listener() {
    let dir = scratch("keys");
    let devices = dir.join("devices.toml");
    std::fs::write(
        &devices,
        "[[device]]\nclient_id = \"s\"\npsk_identity = \"id-s\"\npsk = \"00112233\"\n",
    )
    .expect("write");
    let out = gateway()
        .args([
            "--check-config",
            "--dtls",
            "127.0.0.1:10001",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .arg("--devices")
        .arg(&devices)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = gateway()
        .args([
            "--print-config",
            "--dtls",
            "127.0.0.1:10001",
            "--broker",
            "mqtt://127.0.0.1:1",
        ])
        .arg("--devices")
        .arg(&devices)
        .output()
        .expect("runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("[[dtls]]") && printed.contains("address = \"127.0.0.1:10001\""),
        "{printed}"
    );
}
