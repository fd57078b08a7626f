//! The simulator's tools over DTLS 1.2 with a pre-shared key, against the real gateway's
//! DTLS listener (in-process) and a real mosquitto: `pub --psk-identity --psk` gets its
//! QoS 1 message to the broker; a wrong key gets no session and a clear error.

use std::net::SocketAddr;
use std::time::Duration;

use device_sim::dtls::{Credentials, Psk};
use device_sim::fleet::{self, FleetOptions};
use device_sim::keys::FleetKeys;
use device_sim::scenario::{Group, Scenario};
use device_sim::tools::{self, Common, PubArgs, TopicArg};
use device_sim::verifier::BrokerUrl;
use e2e::{Harness, Mosquitto};
use sn_codec::QoS;

const DEVICES: &str = r##"
[[device]]
client_id = "sim-dtls-7"
psk_identity = "id-7"
psk = "00112233445566778899aabbccddeeff"
publish = ["sim-dtls/#"]

# Every fleet device under one identity.
[[device]]
client_id = "sim-*"
psk_identity = "fleet"
psk = "0f0e0d0c0b0a09080706050403020100"
publish = ["simdtls/#"]
"##;

async fn start() -> Option<Harness> {
    Harness::start_dtls(Some(Mosquitto::start()?), DEVICES).await
}

fn common(gateway: SocketAddr, psk: Option<Psk>) -> Common {
    Common {
        gateway,
        client_id: "sim-dtls-7".into(),
        keep_alive: 30,
        timeout: Duration::from_secs(5),
        t_retry_ms: 1_000,
        n_retry: 3,
        dtls: psk.map(Credentials::Psk),
    }
}

fn publish(common: Common, message: &[u8]) -> PubArgs {
    PubArgs {
        common,
        topic: TopicArg::Name("sim-dtls/up".into()),
        message: message.to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_over_dtls_reaches_the_broker_and_a_wrong_key_does_not() {
    let Some(h) = start().await else { return };
    let dtls = *h.dtls.first().expect("a DTLS listener");
    let mut watch = h.observe("sim-dtls/#").await;

    let right = Psk::from_hex("id-7", "00112233445566778899aabbccddeeff").expect("valid");
    tools::publish(&publish(common(dtls, Some(right)), b"over dtls"))
        .await
        .expect("published over DTLS");
    watch.expect_msg_eq("sim-dtls/up", b"over dtls").await;
    h.wait_stats("a DTLS handshake counted", |s| s.dtls.handshakes_ok >= 1)
        .await;

    let wrong = Psk::from_hex("id-7", "ffeeddccbbaa99887766554433221100").expect("valid");
    let err = tools::publish(&publish(common(dtls, Some(wrong)), b"never"))
        .await
        .expect_err("a wrong key gets no session");
    assert!(err.to_string().contains("DTLS"), "{err}");
    h.wait_stats("the failed handshake counted", |s| s.dtls.handshakes_failed >= 1)
        .await;

    // Plain MQTT-SN to the DTLS port is never answered.
    let err = tools::publish(&publish(common(dtls, None), b"plain"))
        .await
        .expect_err("plain UDP to a DTLS listener");
    assert!(err.to_string().contains("answer"), "{err}");
    h.wait_stats("the plain datagrams dropped", |s| s.dtls.plaintext_dropped >= 1)
        .await;
    watch.expect_none().await;
    h.shutdown().await;
}

/// A fleet of `count` devices in group `group` through the harness's DTLS listener, for
/// `secs` seconds (and as long to drain), every device with `psk`.
fn fleet_over(h: &Harness, group: &str, count: usize, secs: u64, psk: Psk) -> FleetOptions {
    FleetOptions {
        gateway: *h.dtls.first().expect("a DTLS listener"),
        broker: BrokerUrl {
            host: h.broker.ip().to_string(),
            port: h.broker.port(),
            tls: None,
        },
        scenario: Scenario {
            groups: vec![Group {
                name: group.into(),
                count,
                ..Group::default()
            }],
            ..Scenario::default()
        },
        duration: Duration::from_secs(secs),
        seed: 3,
        drain: Duration::from_secs(secs),
        topic_prefix: "simdtls".into(),
        progress: false,
        echo: false,
        gateway_metrics: None,
        client_id: None,
        dtls: Some(FleetKeys::One(psk)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_dtls_keeps_its_guarantees() {
    let Some(h) = start().await else { return };
    let key = Psk::from_hex("fleet", "0f0e0d0c0b0a09080706050403020100").expect("valid");
    let report = fleet::run(fleet_over(&h, "d", 10, 3, key))
        .await
        .expect("the fleet runs");
    println!("{}", report.table());
    let t = &report.total.counts;
    assert!(report.ok(), "broken guarantees: {:#?}", report.violations);
    assert_eq!((t.devices, t.connected, t.dtls_failed), (10, 10, 0));
    assert!(t.published > 0 && t.arrived > 0, "{t:?}");
    let s = h
        .wait_stats("ten DTLS handshakes", |s| s.dtls.handshakes_ok >= 10)
        .await;
    assert_eq!(s.metrics.connects_refused, 0);

    // The wrong key: every device fails its handshake, counted as such.
    let wrong = Psk::from_hex("fleet", "ffff").expect("valid");
    let report = fleet::run(fleet_over(&h, "bad", 3, 1, wrong))
        .await
        .expect("the fleet runs");
    let t = &report.total.counts;
    assert_eq!((t.devices, t.connected, t.dtls_failed, t.socket_errors), (3, 0, 3, 0));
    h.shutdown().await;
}
