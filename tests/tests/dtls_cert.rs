//! DTLS with certificates, end to end, with a DTLS client the project did not write:
//! `openssl s_client -dtls1_2 -cert … -key …` (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
//! against a DTLS listener configured with `cert`, `key` and `client_ca` (read through
//! the configuration, as the gateway reads them), speaking MQTT-SN through it to a real
//! broker. The certificates are made here with `openssl req` / `openssl x509` in a
//! temporary directory.
//!
//! - A device certificate from the CA whose CN the registry binds to a client id:
//!   CONNECT accepted, and a QoS 1 PUBLISH reaches mosquitto; s_client verifies the
//!   gateway's certificate against the same CA.
//! - The same certificate with a client id bound to another certificate, or to a PSK
//!   identity equal to its CN: CONNACK 0x03.
//! - A certificate from another CA, or an expired one: no session, counted.
//! - The listener keeps serving PSK devices beside certificates.
//! - `identity = "san"` takes the name from the subject alternative name.
//! - A key that is not the certificate's, or a broken certificate file: a configuration
//!   error naming the key.
//!
//! Needs `openssl` (and mosquitto for the broker test): without them the tests say so
//! and return, and under `CI=true` they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use e2e::openssl::{connect, have_openssl, OpensslDevice};
use e2e::tls::Openssl;
use e2e::{Harness, Mosquitto, Packet, QoS, ReturnCode, Rx, TopicRef};
use gateway::auth::Registry;
use sn_codec::Publish;

const DEVICES: &str = r##"
[[device]]
client_id = "sensor-7"
cert_identity = "dev-7"
publish = ["#"]

[[device]]
client_id = "sensor-8"
cert_identity = "dev-8"

# A PSK identity spelled like the CN of dev-7's certificate: the certificate does not
# stand for it.
[[device]]
client_id = "sensor-9"
psk_identity = "dev-7"
psk = "00112233445566778899aabbccddeeff"
"##;

/// The certificates of one test, in a temporary directory removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

impl Pki {
    /// `ca` and `other-ca`; the gateway's `server` certificate from `ca`; device
    /// certificates `dev-7` and `dev-8` from `ca`, `stranger` (CN dev-7) from
    /// `other-ca`, and `expired` (CN dev-7) from `ca`, whose notAfter has passed.
    fn generate() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "e2e-dtls-cert-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = Openssl::find().expect("openssl");
        // X.509 v3 (webpki takes nothing older), for TLS clients or servers.
        let client = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n";
        let server = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n";
        let san = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n\
                   subjectAltName = IP:127.0.0.1, DNS:dev-8, URI:urn:dev:other\n";
        openssl.ca(&dir, "ca");
        openssl.ca(&dir, "other-ca");
        openssl.leaf(&dir, "server", "gateway", "ca", "3", server);
        openssl.leaf(&dir, "dev-7", "dev-7", "ca", "3", client);
        openssl.leaf(&dir, "dev-8", "dev-8", "ca", "3", client);
        openssl.leaf(&dir, "stranger", "dev-7", "other-ca", "3", client);
        // -days -1: notAfter a day before notBefore (now), so expired from the start.
        openssl.leaf(&dir, "expired", "dev-7", "ca", "-1", client);
        // CN dev-7, but the SAN names sensor-8's certificate identity.
        openssl.leaf(&dir, "san-8", "dev-7", "ca", "3", san);
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// The configuration of a gateway with one DTLS listener: `cert` and `key` (files of
/// the PKI), `client_ca` = `ca.pem`, `extra` lines in its table, the registry above.
fn config(
    pki: &Pki,
    cert: &str,
    key: &str,
    extra: &str,
) -> Result<gateway::config::Settings, gateway::config::ConfigErrors> {
    let devices = pki.path("devices.toml");
    std::fs::write(&devices, DEVICES).unwrap();
    let text = format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:1883\"\n[udp]\nlisten = []\n[auth]\ndevices_file = {:?}\n\n\
         [[dtls]]\naddress = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{extra}",
        devices.display().to_string(),
        pki.path(cert).display().to_string(),
        pki.path(key).display().to_string(),
        pki.path("ca.pem").display().to_string(),
    );
    gateway::config::Config::parse(&text)
        .expect("the configuration parses")
        .validate_offline()
}

/// The gateway with one DTLS listener whose `cert`, `key` and `client_ca` come from a
/// configuration file (validated as at start), and the registry above.
async fn start(pki: &Pki, mosquitto: Option<Mosquitto>) -> Harness {
    start_with(pki, mosquitto, "").await
}

/// [`start`] with `extra` lines in the `[[dtls]]` table.
async fn start_with(pki: &Pki, mosquitto: Option<Mosquitto>, extra: &str) -> Harness {
    let settings = config(pki, "server.pem", "server.key", extra).expect("the configuration validates");
    let listener = settings.dtls[0].clone();
    assert!(listener.certificates.is_some(), "the listener has its certificates");
    let registry: Arc<Registry> = settings.engine.auth.registry.clone().expect("registry mode");
    Harness::start_custom(mosquitto, move |s| {
        s.engine.auth = gateway::auth::AuthConfig {
            registry: Some(registry),
            ..gateway::auth::AuthConfig::default()
        };
        s.dtls = vec![listener];
    })
    .await
    .expect("the gateway starts")
}

/// `openssl s_client` with the certificate `name.pem` / `name.key`, verifying the gateway
/// against `ca.pem`.
fn device_with_cert(to: SocketAddr, pki: &Pki, name: &str) -> OpensslDevice {
    let cert = pki.path(&format!("{name}.pem"));
    let key = pki.path(&format!("{name}.key"));
    let ca = pki.path("ca.pem");
    OpensslDevice::spawn(
        to,
        &[
            "-cipher",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
        ],
    )
}

#[tokio::test]
async fn a_device_certificate_from_the_ca_connects_and_publishes_qos1_to_mosquitto() {
    if !have_openssl() {
        return;
    }
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let pki = Pki::generate();
    let h = start(&pki, Some(mosquitto)).await;
    let mut observer = h.observe("dtls-cert/#").await;
    let mut device = device_with_cert(h.dtls[0], &pki, "dev-7");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    device
        .send(&Packet::Register(sn_codec::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "dtls-cert/t",
        }))
        .await;
    let Rx::RegAck(ack) = device.recv().await else {
        panic!("REGACK expected");
    };
    assert_eq!(ack.code, ReturnCode::Accepted);
    device
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Normal(ack.topic_id),
            msg_id: 2,
            data: b"signed by the ca",
        }))
        .await;
    let Rx::PubAck(puback) = device.recv().await else {
        panic!("PUBACK expected");
    };
    assert_eq!((puback.msg_id, puback.code), (2, ReturnCode::Accepted));
    observer.expect_msg_eq("dtls-cert/t", b"signed by the ca").await;
    let s = h.stats();
    assert_eq!(
        (s.dtls.certs_rejected, s.dtls.handshakes_failed, s.dtls.sessions),
        (0, 0, 1)
    );
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn the_certificate_with_a_client_id_bound_elsewhere_gets_connack_0x03() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    let h = start(&pki, None).await;
    let mut device = device_with_cert(h.dtls[0], &pki, "dev-7");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    // sensor-8 is dev-8's; sensor-9 is the PSK identity "dev-7", not the certificate.
    device.send(&connect("sensor-8")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    device.send(&connect("sensor-9")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    let s = h
        .wait_stats("both refusals counted", |s| s.metrics.auth_identity_refused == 2)
        .await;
    assert_eq!(s.sessions, 0);
    // Its own client id is still accepted on the same DTLS session.
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_makes_no_session_and_is_counted() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    let h = start(&pki, None).await;
    let mut device = device_with_cert(h.dtls[0], &pki, "stranger");
    let s = h
        .wait_stats("a refused certificate", |s| s.dtls.certs_rejected == 1)
        .await;
    assert_eq!(s.dtls.handshakes_failed, 1);
    assert_eq!((s.dtls.handshakes_ok, s.dtls.sessions, s.sessions), (0, 0, 0));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_certificate_makes_no_session_and_is_counted() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    let h = start(&pki, None).await;
    let mut device = device_with_cert(h.dtls[0], &pki, "expired");
    let s = h
        .wait_stats("a refused certificate", |s| s.dtls.certs_rejected == 1)
        .await;
    assert_eq!(s.dtls.handshakes_failed, 1);
    assert_eq!((s.dtls.handshakes_ok, s.dtls.sessions, s.sessions), (0, 0, 0));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn the_listener_with_certificates_still_serves_psk_devices() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    let h = start(&pki, None).await;
    let mut device = OpensslDevice::with_psk(h.dtls[0], "dev-7", "00112233445566778899aabbccddeeff");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    // The PSK identity "dev-7" is sensor-9's; the certificate name dev-7 is sensor-7's.
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    device.send(&connect("sensor-9")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn with_identity_san_the_first_dns_or_uri_name_is_the_identity() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    let h = start_with(&pki, None, "identity = \"san\"\n").await;
    // CN dev-7, SAN DNS dev-8 (after an IP address, which does not count): sensor-8's.
    let mut device = device_with_cert(h.dtls[0], &pki, "san-8");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    device.send(&connect("sensor-8")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    let _ = device.child.kill().await;
    // A certificate without a DNS or URI name is refused under this rule.
    let mut plain = device_with_cert(h.dtls[0], &pki, "dev-7");
    h.wait_stats("a refused certificate", |s| s.dtls.certs_rejected == 1)
        .await;
    let _ = plain.child.kill().await;
    h.shutdown().await;
}

#[test]
fn a_key_of_another_certificate_or_a_broken_file_is_a_configuration_error() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::generate();
    config(&pki, "server.pem", "server.key", "").expect("the right pair validates");
    let err = config(&pki, "server.pem", "dev-7.key", "").unwrap_err();
    assert!(
        err.mentions("dtls.key") && err.mentions("not the key of the certificate"),
        "{err}"
    );
    std::fs::write(pki.path("garbled.pem"), "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let err = config(&pki, "garbled.pem", "server.key", "").unwrap_err();
    assert!(err.mentions("dtls.cert"), "{err}");
    let err = config(&pki, "absent.pem", "server.key", "").unwrap_err();
    assert!(err.mentions("dtls.cert: cannot read"), "{err}");
}
