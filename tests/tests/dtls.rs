//! DTLS toward devices, end to end, with a DTLS client the project did not write:
//! `openssl s_client -dtls1_2` with a pre-shared key (TLS_PSK_WITH_AES_128_CCM_8) speaks
//! MQTT-SN through the gateway's DTLS listener to a real broker. Each write to its
//! standard input becomes one DTLS record (one MQTT-SN message); what it decrypts it
//! writes to its standard output.
//!
//! Needs `openssl` (and mosquitto for the broker test): without them the tests say so
//! and return, and under `CI=true` they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::openssl::{connect, have_openssl, OpensslDevice};
use e2e::{Harness, Mosquitto, Packet, QoS, ReturnCode, Rx, SnClient, TopicRef};
use gateway::auth::Registry;
use sn_codec::Publish;

const WAIT: Duration = Duration::from_secs(10);

const DEVICES: &str = r##"
[[device]]
client_id = "sensor-7"
psk_identity = "id-7"
psk = "00112233445566778899aabbccddeeff"
publish = ["#"]

[[device]]
client_id = "sensor-8"
psk_identity = "id-8"
psk = "ffeeddccbbaa99887766554433221100"

[[device]]
client_id = "locked"
psk_identity = "id-locked"
psk = "0102030405060708090a0b0c0d0e0f10"
dtls_only = true
"##;

const KEY_7: &str = "00112233445566778899aabbccddeeff";

/// The gateway with one DTLS listener and the registry above.
async fn start(mosquitto: Option<Mosquitto>) -> Option<Harness> {
    Harness::start_dtls(mosquitto, DEVICES).await
}

#[tokio::test]
async fn openssl_connects_and_publishes_qos1_through_dtls_to_mosquitto() {
    if !have_openssl() {
        return;
    }
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let h = start(Some(mosquitto)).await.expect("the gateway starts");
    let mut observer = h.observe("dtls/#").await;
    let mut device = OpensslDevice::with_psk(h.dtls[0], "id-7", KEY_7);
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    // A topic id for the name, then PUBLISH QoS 1 to it.
    device
        .send(&Packet::Register(sn_codec::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "dtls/t",
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
            data: b"over dtls",
        }))
        .await;
    let Rx::PubAck(puback) = device.recv().await else {
        panic!("PUBACK expected");
    };
    assert_eq!((puback.msg_id, puback.code), (2, ReturnCode::Accepted));
    observer.expect_msg_eq("dtls/t", b"over dtls").await;
    let s = h.stats();
    assert_eq!((s.dtls.cookies_sent, s.dtls.sessions), (1, 1));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_id_not_bound_to_the_psk_identity_gets_connack_0x03() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    let mut device = OpensslDevice::with_psk(h.dtls[0], "id-7", KEY_7);
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("sensor-8")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    let s = h
        .wait_stats("the refusal counted", |s| s.metrics.auth_identity_refused == 1)
        .await;
    assert_eq!(s.sessions, 0);
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_dtls_only_device_is_refused_on_the_plain_udp_listener_and_served_over_dtls() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    // The same gateway's plain UDP listener: its client id alone proves nothing.
    let mut plain = SnClient::bind(Ipv4Addr::LOCALHOST, h.gateway, "locked").await;
    plain.send(&connect("locked")).await;
    assert_eq!(plain.recv().await, Rx::ConnAck(ReturnCode::NotSupported));
    h.wait_stats("the refusal counted", |s| s.metrics.auth_identity_refused == 1)
        .await;
    // With its key, over DTLS, it connects.
    let mut device = OpensslDevice::with_psk(h.dtls[0], "id-locked", "0102030405060708090a0b0c0d0e0f10");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("locked")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_wrong_psk_makes_no_session_and_is_counted() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    let mut device = OpensslDevice::with_psk(h.dtls[0], "id-7", "000102030405060708090a0b0c0d0e0f");
    let s = h
        .wait_stats("a failed DTLS handshake", |s| s.dtls.handshakes_failed >= 1)
        .await;
    assert_eq!((s.dtls.handshakes_ok, s.dtls.sessions, s.sessions), (0, 0, 0));
    let _ = device.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_plain_mqtt_sn_connect_to_the_dtls_port_gets_no_answer_and_is_counted() {
    let h = start(None).await.expect("the gateway starts");
    let mut plain = SnClient::bind(Ipv4Addr::LOCALHOST, h.dtls[0], "sensor-7").await;
    plain.send(&connect("sensor-7")).await;
    h.wait_stats("a dropped plain datagram", |s| s.dtls.plaintext_dropped == 1)
        .await;
    plain.expect_silence().await;
    let s = h.stats();
    assert_eq!(
        (s.sessions, s.metrics.datagrams_in),
        (0, 0),
        "nothing reached the engine"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_registry_reload_gives_new_handshakes_the_new_keys() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    let reloaded =
        "[[device]]\nclient_id = \"sensor-9\"\npsk_identity = \"id-9\"\npsk = \"99999999999999999999999999999999\"\n";
    let registry = Registry::parse(reloaded, "devices.toml", Path::new("/"), |_| None).unwrap();
    h.running().set_registry(Arc::new(registry)).await.expect("applied");
    // The removed identity no longer handshakes; the new one does, and connects.
    let mut old = OpensslDevice::with_psk(h.dtls[0], "id-7", KEY_7);
    h.wait_stats("the old key refused", |s| s.dtls.handshakes_failed >= 1)
        .await;
    let _ = old.child.kill().await;
    let mut new = OpensslDevice::with_psk(h.dtls[0], "id-9", "99999999999999999999999999999999");
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    new.send(&connect("sensor-9")).await;
    assert_eq!(new.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    let _ = new.child.kill().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_disconnect_ends_the_dtls_session_with_close_notify_and_a_sleep_does_not() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    let mut device = OpensslDevice::with_psk(h.dtls[0], "id-7", KEY_7);
    h.wait_stats("a DTLS handshake", |s| s.dtls.handshakes_ok == 1).await;
    device.send(&connect("sensor-7")).await;
    assert_eq!(device.recv().await, Rx::ConnAck(ReturnCode::Accepted));
    // Asleep: the DTLS session stays (the wake needs it).
    device.send(&Packet::Disconnect(Some(60))).await;
    assert_eq!(device.recv().await, Rx::Disconnect(None));
    device.send(&Packet::PingReq(Some("sensor-7"))).await;
    assert_eq!(device.recv().await, Rx::PingResp);
    // A final DISCONNECT: answered, then close_notify, and s_client ends.
    device.send(&Packet::Disconnect(None)).await;
    assert_eq!(device.recv().await, Rx::Disconnect(None));
    tokio::time::timeout(WAIT, device.child.wait())
        .await
        .expect("s_client ends on close_notify")
        .expect("s_client's status");
    let s = h.wait_stats("the DTLS session gone", |s| s.dtls.sessions == 0).await;
    assert_eq!(s.sessions, 0);
    h.shutdown().await;
}
