//! `[[dtls]]` listeners and `--dtls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use super::tests::{cli, file, no_env};
use super::*;
use clap::Parser;

const DEVICES: &str = "[[device]]\nclient_id = \"s\"\npsk_identity = \"id-s\"\npsk = \"00112233\"\n";

/// A gateway file with `rest`, next to a registry file with `devices`.
fn load(rest: &str, devices: &str, flags: &[&str]) -> Result<Settings, ConfigErrors> {
    let (dir, path) = file("");
    let registry = path.with_file_name("devices.toml");
    std::fs::write(&registry, devices).unwrap();
    let text = format!("[auth]\ndevices_file = {:?}\n\n{rest}", registry.display().to_string());
    std::fs::write(&path, text).unwrap();
    let path = path.to_string_lossy().into_owned();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(flags);
    let result = Config::load_with_env(&cli(&args), no_env())?.validate_offline();
    drop(dir);
    result
}

#[test]
fn listeners_from_the_file_with_their_limits() {
    let s = load(
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\n\n[[dtls]]\naddress = \"127.0.0.1:10002\"\nmax_handshakes = 8\nidle_timeout_secs = 30\nhandshake_rate = 40\n",
        DEVICES,
        &[],
    )
    .expect("valid");
    assert_eq!(s.dtls.len(), 2);
    assert_eq!(s.dtls[0].address, SocketAddr::from(([127, 0, 0, 1], 10001)));
    assert_eq!(s.dtls[0].limits, crate::transport::dtls::DtlsLimits::default());
    assert_eq!(s.dtls[1].limits.max_handshakes, 8);
    assert_eq!(s.dtls[1].limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(s.dtls[1].limits.handshake_rate, 40);
}

#[test]
fn the_handshake_rate_flag_applies_to_every_dtls_flag_listener() {
    let s = load(
        "",
        DEVICES,
        &[
            "--dtls",
            "127.0.0.1:20001",
            "--dtls",
            "127.0.0.1:20002",
            "--dtls-handshake-rate",
            "7",
        ],
    )
    .expect("valid");
    let rates: Vec<u32> = s.dtls.iter().map(|d| d.limits.handshake_rate).collect();
    assert_eq!(rates, vec![7, 7]);
    let err = load(
        "",
        DEVICES,
        &["--dtls", "127.0.0.1:20001", "--dtls-handshake-rate", "0"],
    )
    .unwrap_err();
    assert!(err.mentions("handshake_rate"), "{err}");
}

#[test]
fn flags_replace_the_file_listeners() {
    let s = load(
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\n",
        DEVICES,
        &["--dtls", "127.0.0.1:20001", "--dtls", "[::1]:20002"],
    )
    .expect("valid");
    let got: Vec<SocketAddr> = s.dtls.iter().map(|d| d.address).collect();
    assert_eq!(
        got,
        vec!["127.0.0.1:20001".parse().unwrap(), "[::1]:20002".parse().unwrap()]
    );
    assert!(Cli::try_parse_from(["mqtt-sn-gateway", "--dtls", "nowhere"]).is_err());
}

#[test]
fn dtls_without_keys_is_an_error_naming_the_keys() {
    for devices in ["[[device]]\nclient_id = \"s\"\n", ""] {
        let err = load("[[dtls]]\naddress = \"127.0.0.1:10001\"\n", devices, &[]).unwrap_err();
        assert!(
            err.mentions("psk_identity") && err.mentions("auth.devices_file"),
            "{err}"
        );
    }
    // Open mode: no registry at all.
    let c = Config::parse("[[dtls]]\naddress = \"127.0.0.1:10001\"\n").unwrap();
    let err = c.validate_offline().unwrap_err();
    assert!(err.mentions("auth.mode = \"registry\""), "{err}");
}

#[test]
fn bad_listeners_are_clear_errors() {
    for (bad, names) in [
        ("[[dtls]]\nmax_handshakes = 4\n", "address is required"),
        (
            "[[dtls]]\naddress = \"127.0.0.1:1\"\nmax_handshakes = 0\n",
            "max_handshakes",
        ),
        (
            "[[dtls]]\naddress = \"127.0.0.1:1\"\nhandshake_rate = 0\n",
            "handshake_rate",
        ),
        (
            "[[dtls]]\naddress = \"127.0.0.1:1\"\nidle_timeout_secs = 0\n",
            "idle_timeout_secs",
        ),
        (
            "[[dtls]]\naddress = \"127.0.0.1:1\"\n[[dtls]]\naddress = \"127.0.0.1:1\"\n",
            "given twice",
        ),
        (
            "[udp]\nlisten = [\"127.0.0.1:1\"]\n[[dtls]]\naddress = \"127.0.0.1:1\"\n",
            "also in udp.listen",
        ),
    ] {
        let err = load(bad, DEVICES, &[]).unwrap_err();
        assert!(err.mentions(names), "{bad:?}: {err}");
    }
    assert!(Config::parse("[[dtls]]\naddress = \"127.0.0.1:1\"\ncipher = \"x\"\n").is_err());
}

#[test]
fn a_dtls_listener_alone_serves_something() {
    let s = load(
        "[udp]\nlisten = []\n[[dtls]]\naddress = \"127.0.0.1:10001\"\n",
        DEVICES,
        &[],
    )
    .expect("valid");
    assert!(s.udp.is_empty());
}

#[test]
fn missing_or_garbled_certificate_files_are_errors_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("gw-dtls-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.join("missing.pem");
    let table = |cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path| {
        format!(
            "[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        )
    };
    for (rest, names) in [
        (table(&missing, &junk, &junk), "dtls.cert: cannot read"),
        (table(&junk, &junk, &junk), "dtls.cert"),
        (table(&broken, &junk, &junk), "dtls.cert"),
        (
            "[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = \"c.pem\"\n".to_string(),
            "dtls.key, dtls.client_ca missing",
        ),
        (
            "[[dtls]]\naddress = \"127.0.0.1:10001\"\nidentity = \"serial\"\n".to_string(),
            "dtls.identity",
        ),
    ] {
        let err = load(&rest, DEVICES, &[]).unwrap_err();
        assert!(err.mentions(names) && err.mentions("[[dtls]] #1"), "{rest:?}: {err}");
    }
    // The flags give the --dtls listeners their files.
    let missing_flag = missing.display().to_string();
    let junk_flag = junk.display().to_string();
    let err = load(
        "",
        DEVICES,
        &[
            "--dtls",
            "127.0.0.1:20001",
            "--dtls-cert",
            &missing_flag,
            "--dtls-key",
            &junk_flag,
            "--dtls-client-ca",
            &junk_flag,
        ],
    )
    .unwrap_err();
    assert!(err.mentions("dtls.cert: cannot read"), "{err}");
    assert!(
        Cli::try_parse_from(["mqtt-sn-gateway", "--dtls-cert", "c.pem"]).is_err(),
        "needs --dtls"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_listener_without_certificates_has_none_and_psk_is_needed() {
    let s = load("[[dtls]]\naddress = \"127.0.0.1:10001\"\n", DEVICES, &[]).expect("valid");
    assert!(s.dtls[0].certificates.is_none());
    // cert_identity alone proves nothing on a listener without certificates.
    let err = load(
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\n",
        "[[device]]\nclient_id = \"s\"\ncert_identity = \"s\"\n",
        &[],
    )
    .unwrap_err();
    assert!(err.mentions("cert_identity"), "{err}");
}

#[test]
fn a_reload_that_changes_certificate_keys_needs_a_restart() {
    let running = Config::parse("[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = \"a.pem\"\n").unwrap();
    for changed in [
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = \"b.pem\"\n",
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = \"a.pem\"\nidentity = \"san\"\n",
        "[[dtls]]\naddress = \"127.0.0.1:10001\"\ncert = \"a.pem\"\nclient_ca = \"ca.pem\"\n",
    ] {
        let new = Config::parse(changed).unwrap();
        let changes = crate::config::Changes::between(&running, &new);
        assert_eq!(changes.needs_restart, ["dtls"], "{changed:?}");
    }
}
