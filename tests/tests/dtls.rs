//! DTLS toward devices, end to end, with a DTLS client the project did not write:
//! `openssl s_client -dtls1_2` with a pre-shared key (TLS_PSK_WITH_AES_128_CCM_8) speaks
//! MQTT-SN through the gateway's DTLS listener to a real broker. Each write to its
//! standard input becomes one DTLS record (one MQTT-SN message); what it decrypts it
//! writes to its standard output.
//!
//! A flood of ClientHellos (openssl's, with fresh randoms) from many addresses gets only
//! HelloVerifyRequests and leaves no state; the process's RSS is printed.
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

/// The resident set size of this process (the gateway runs in it), in kilobytes.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The first ClientHello of `openssl s_client -dtls1_2` with a PSK, as it sends it.
async fn openssl_client_hello() -> Vec<u8> {
    let catcher = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let mut device = OpensslDevice::with_psk(catcher.local_addr().unwrap(), "id-7", KEY_7);
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(WAIT, catcher.recv_from(&mut buf))
        .await
        .expect("s_client sends a ClientHello")
        .unwrap();
    let _ = device.child.kill().await;
    buf.truncate(n);
    // A handshake record (22), epoch 0, holding a ClientHello (1).
    assert_eq!((buf[0], buf[13]), (22, 1), "a ClientHello: {buf:02x?}");
    buf
}

/// Sources of the flood: distinct 127.x addresses.
const FLOOD_SOURCES: u32 = 200;
/// ClientHellos per source.
const FLOOD_ROUNDS: u32 = 100;

#[tokio::test]
async fn a_flood_of_client_hellos_from_many_addresses_keeps_no_session_and_memory_flat() {
    if !have_openssl() {
        return;
    }
    let h = start(None).await.expect("the gateway starts");
    let hello = openssl_client_hello().await;
    let mut sources = Vec::new();
    for i in 0..FLOOD_SOURCES {
        let ip = Ipv4Addr::new(127, 3, (i / 250) as u8, (i % 250 + 1) as u8);
        sources.push(SnClient::bind(ip, h.dtls[0], "flood").await);
    }
    let before = rss_kb();
    // Each round, one ClientHello from every source, each with its own random (offset
    // 27: after the record and handshake headers and client_version); every answer is
    // awaited, so no datagram is lost to a full socket buffer and each is counted.
    let mut n = 0u64;
    for round in 0..FLOOD_ROUNDS {
        for source in &sources {
            let mut h = hello.clone();
            h[27..35].copy_from_slice(&n.to_be_bytes());
            n += 1;
            source.send_raw(&h).await;
        }
        for source in &mut sources {
            let answer = source.recv_raw().await;
            assert_eq!(
                (answer[0], answer[13]),
                (22, 3),
                "round {round}: only HelloVerifyRequests"
            );
        }
    }
    let s = h
        .wait_stats("every ClientHello answered", |s| s.dtls.cookies_sent == n)
        .await;
    let after = rss_kb();
    eprintln!(
        "DTLS ClientHello flood: {n} ClientHellos from {FLOOD_SOURCES} addresses; RSS {before} kB before, {after} kB after ({:+} kB)",
        after as i64 - before as i64
    );
    assert_eq!(
        (
            s.dtls.sessions,
            s.dtls.handshaking,
            s.dtls.handshakes_ok,
            s.dtls.handshakes_failed
        ),
        (0, 0, 0, 0),
        "no state kept for ClientHellos without a cookie"
    );
    assert_eq!(s.dtls.cookies_sent, u64::from(FLOOD_SOURCES * FLOOD_ROUNDS));
    assert!(
        after < before + 50 * 1024,
        "RSS grew from {before} kB to {after} kB under the flood"
    );
    // Nothing was kept, so nothing is retransmitted (dimpl's first retransmission
    // would come after 1 s).
    sources[0].expect_silence_for(Duration::from_millis(1500)).await;
    h.shutdown().await;
}
