//! TLS to the broker, end to end: mosquitto with a TLS listener on a CA made by the test
//! (openssl), the gateway in-process over `mqtts://`.
//!
//! - With that CA the gateway delivers both ways (device to broker, broker to device).
//! - With another CA, or a URL host the certificate does not name, the device gets
//!   CONNACK 0x03 (rejected) and the gateway logs one clear TLS line per interval.
//! - With `require_certificate`, the gateway's client certificate from the CA is
//!   accepted; none, or one from another CA, is refused (CONNACK 0x03).
//! - A device with its own client certificate in the device registry presents it (the
//!   gateway has none): it is accepted, a device without one is refused.
//! - The health probe does a TLS handshake: it fails on the wrong CA.
//!
//! mosquitto or openssl missing: a failure under `CI=true`, otherwise a note and the test
//! returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e::tls::{capture_logs, LogCapture, Pki, TlsMosquitto, TlsObserver};
use e2e::{init_logging, test_engine_config, QoS, ReturnCode, Rx, SnClient, TopicFilter, TopicRef};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::Settings;
use gateway::runtime::Running;

/// Starts the gateway against `broker`.
async fn gateway_to(broker: BrokerConfig) -> (Running, SocketAddr) {
    gateway_with(broker, test_engine_config()).await
}

/// Starts the gateway against `broker` with `engine`.
async fn gateway_with(broker: BrokerConfig, engine: gateway::engine::EngineConfig) -> (Running, SocketAddr) {
    let settings = Settings {
        engine,
        udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        broker,
        embedded_broker: None,
        stats_interval: None,
        ..Settings::default()
    };
    let running = gateway::runtime::start(settings).await.expect("the gateway starts");
    let addr = running.udp_addrs[0];
    (running, addr)
}

async fn device(gateway: SocketAddr, id: &str) -> SnClient {
    SnClient::bind(Ipv4Addr::LOCALHOST, gateway, id).await
}

/// A device publishes through the gateway (QoS 1) and a TLS observer sees it; the
/// observer publishes and the subscribed device receives it.
async fn both_ways(gateway: SocketAddr, observer: &mut TlsObserver, id: &str) {
    observer.subscribe(&format!("tls/{id}/up")).await;
    let mut d = device(gateway, id).await;
    d.connect(30, true).await;
    let topic = d.register(&format!("tls/{id}/up")).await;
    d.publish_qos1(TopicRef::Normal(topic), b"over tls").await;
    let m = observer.expect_msg().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        (format!("tls/{id}/up").as_str(), &b"over tls"[..])
    );

    let sub = d
        .subscribe(TopicFilter::Name(&format!("tls/{id}/down")), QoS::AtLeastOnce)
        .await;
    observer.publish(&format!("tls/{id}/down"), b"to the device").await;
    let p = d.receive().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(sub.topic_id), &b"to the device"[..])
    );
    d.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_brokers_ca_the_gateway_delivers_both_ways() {
    init_logging();
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, false) else {
        return;
    };
    let cfg = pki.broker_config(broker.addr(), &pki.ca, None);
    let mut observer = TlsObserver::connect(&cfg, "e2e-tls-observer").await;
    let (running, gateway) = gateway_to(cfg).await;
    both_ways(gateway, &mut observer, "tls-dev").await;
    running.shutdown().await;
}

/// Connects `n` devices and expects CONNACK 0x03 for each, then returns the log.
async fn refused_devices(gateway: SocketAddr, n: usize, capture: &LogCapture) -> String {
    for i in 0..n {
        let mut d = device(gateway, &format!("refused-{i}")).await;
        assert_eq!(
            d.try_connect(30, true).await,
            Rx::ConnAck(ReturnCode::NotSupported),
            "device {i}: a TLS failure is a rejection (0x03), not congestion; the log:\n{}",
            capture.wait_for("CONNACK").await
        );
    }
    capture.wait_for("TLS with the broker failed").await
}

/// The gateway's warnings about refused broker connections, one per line.
fn refusal_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("broker refused a device's connection"))
        .collect()
}

// Current-thread runtime: the gateway's tasks run on the test's thread, where the log
// capture is the default subscriber.
#[tokio::test(flavor = "current_thread")]
async fn another_ca_is_a_clear_tls_error_and_connack_rejected() {
    let capture = LogCapture::default();
    let _logs = capture_logs(&capture);
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, false) else {
        return;
    };
    let (running, gateway) = gateway_to(pki.broker_config(broker.addr(), &pki.other_ca, None)).await;
    let started = std::time::Instant::now();
    let log = refused_devices(gateway, 3, &capture).await;
    let lines = refusal_lines(&log);
    // One warning per 10 s interval (however loaded the machine, that is the bound).
    let intervals = 1 + started.elapsed().as_secs() / 10;
    assert!(
        !lines.is_empty() && lines.len() as u64 <= intervals,
        "one warning per interval for three refusals:\n{log}"
    );
    assert!(
        lines[0]
            .contains("TLS with the broker failed: the broker's certificate is not signed by a CA the gateway trusts")
            && lines[0].contains("UnknownIssuer"),
        "{log}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_host_the_certificate_does_not_name_is_refused() {
    let capture = LogCapture::default();
    let _logs = capture_logs(&capture);
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, false) else {
        return;
    };
    // The certificate names IP address 127.0.0.1 only; "localhost" reaches the same
    // listener but is not a name the certificate gives.
    let mut cfg = pki.broker_config(broker.addr(), &pki.ca, None);
    cfg.host = "localhost".into();
    let (running, gateway) = gateway_to(cfg).await;
    let log = refused_devices(gateway, 1, &capture).await;
    assert!(
        log.contains("TLS with the broker failed: the broker's certificate does not name \"localhost\""),
        "{log}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_the_ca_is_accepted_when_required() {
    init_logging();
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, true) else {
        return;
    };
    let cfg = pki.broker_config(broker.addr(), &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let mut observer = TlsObserver::connect(&cfg, "e2e-tls-observer-cert").await;
    let (running, gateway) = gateway_to(cfg).await;
    both_ways(gateway, &mut observer, "tls-cert-dev").await;
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn no_client_certificate_or_a_foreign_one_is_refused_when_required() {
    let capture = LogCapture::default();
    let _logs = capture_logs(&capture);
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, true) else {
        return;
    };

    let (running, gateway) = gateway_to(pki.broker_config(broker.addr(), &pki.ca, None)).await;
    let log = refused_devices(gateway, 1, &capture).await;
    assert!(
        log.contains("TLS with the broker failed: the broker requires a client certificate"),
        "{log}\nmosquitto:\n{}",
        broker.log()
    );
    running.shutdown().await;

    let foreign = Some((pki.other_client_cert.as_path(), pki.other_client_key.as_path()));
    let (running, gateway) = gateway_to(pki.broker_config(broker.addr(), &pki.ca, foreign)).await;
    let before = capture.text().len();
    let mut d = device(gateway, "foreign-cert").await;
    assert_eq!(d.try_connect(30, true).await, Rx::ConnAck(ReturnCode::NotSupported));
    let log = capture.wait_for("refused the gateway's client certificate").await;
    assert!(
        log[before..].contains("TLS with the broker failed: the broker refused the gateway's client certificate"),
        "{log}\nmosquitto:\n{}",
        broker.log()
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_does_a_tls_handshake() {
    init_logging();
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, false) else {
        return;
    };
    let wait = Duration::from_secs(5);
    let good = pki.broker_config(broker.addr(), &pki.ca, None);
    assert_eq!(gateway::ops::reach_broker(&good, wait).await, Ok(()));
    let wrong = pki.broker_config(broker.addr(), &pki.other_ca, None);
    let err = gateway::ops::reach_broker(&wrong, wait).await.expect_err("wrong CA");
    assert!(err.contains("not signed by a CA the gateway trusts"), "{err}");
    // A plain-TCP probe of the same listener would say "reachable".
    let plain = BrokerConfig { tls: None, ..wrong };
    assert_eq!(gateway::ops::reach_broker(&plain, wait).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_own_client_certificate_from_the_registry_is_presented() {
    use gateway::auth::registry::Registry;
    use gateway::auth::AuthConfig;
    init_logging();
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, true) else {
        return;
    };
    // The gateway itself has no client certificate: only the device's entry gives one.
    let cfg = pki.broker_config(broker.addr(), &pki.ca, None);
    let devices = format!(
        "[[device]]\nclient_id = \"cert-dev\"\npublish = [\"tls/%c/#\"]\nsubscribe = [\"tls/%c/#\"]\nclient_cert = {:?}\nclient_key = {:?}\n\n[[device]]\nclient_id = \"plain-dev\"\npublish = [\"tls/%c/#\"]\n",
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let registry = Registry::parse(&devices, "devices.toml", std::path::Path::new("/"), |_| None)
        .expect("the test registry is valid");
    let mut engine = test_engine_config();
    engine.auth = AuthConfig {
        registry: Some(std::sync::Arc::new(registry)),
        ..AuthConfig::default()
    };
    let observer_cfg = pki.broker_config(broker.addr(), &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let mut observer = TlsObserver::connect(&observer_cfg, "e2e-tls-observer-device-cert").await;
    let (running, gateway) = gateway_with(cfg, engine).await;
    both_ways(gateway, &mut observer, "cert-dev").await;
    let mut plain = device(gateway, "plain-dev").await;
    assert_eq!(
        plain.try_connect(30, true).await,
        Rx::ConnAck(ReturnCode::NotSupported),
        "a device without a certificate is refused by a broker that requires one\nmosquitto:\n{}",
        broker.log()
    );
    running.shutdown().await;
}
