//! Operations end to end: `GET /metrics` scraped and parsed with a Prometheus text
//! parser after real traffic through mosquitto, `GET /healthz` following the broker
//! down and back, and the UDP health probe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e::{
    init_logging, test_engine_config, Mosquitto, Packet, QoS, Register, ReturnCode, Rx, SnClient, TopicRef,
    PREDEFINED_ID, WAIT,
};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::{MetricsSettings, Settings, UdpProbe};
use gateway::runtime::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const PROBE_REQUEST: &[u8] = b"mqttsn-health?";
const PROBE_REPLY: &[u8] = b"healthy";

async fn gateway_with_metrics(broker: SocketAddr) -> Running {
    init_logging();
    let settings = Settings {
        engine: test_engine_config(),
        udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        broker: BrokerConfig {
            host: broker.ip().to_string(),
            port: broker.port(),
            connect_timeout_secs: 2,
            ..BrokerConfig::default()
        },
        embedded_broker: None,
        stats_interval: None,
        metrics: MetricsSettings {
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            udp_probe: Some(UdpProbe {
                request: PROBE_REQUEST.to_vec(),
                reply: PROBE_REPLY.to_vec(),
            }),
        },
        ..Settings::default()
    };
    gateway::runtime::start(settings).await.expect("the gateway starts")
}

/// One HTTP request over a plain TCP stream: the status code and the body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
        s.write_all(request.as_bytes()).await.expect("write the request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read the response");
        let text = String::from_utf8(raw).expect("a UTF-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        (status, body.to_string())
    })
    .await
    .expect("the endpoint answers in time")
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).await
}

/// Scrapes `/metrics` and parses it with prometheus-parse: name -> value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v) => {
                assert!(s.metric.ends_with("_total"), "counter {} ends in _total", s.metric);
                v
            }
            prometheus_parse::Value::Gauge(v) => v,
            // A histogram: its +Inf bucket (every observation) under its own name.
            prometheus_parse::Value::Histogram(buckets) => {
                assert!(s.metric.ends_with("_seconds"), "histogram {}", s.metric);
                let inf = buckets
                    .iter()
                    .find(|b| b.less_than == f64::INFINITY)
                    .expect("a +Inf bucket");
                assert!(
                    buckets.windows(2).all(|w| w[0].count <= w[1].count),
                    "cumulative buckets: {buckets:?}"
                );
                inf.count
            }
            // A histogram's _sum and _count lines.
            prometheus_parse::Value::Untyped(v) => {
                assert!(
                    s.metric.ends_with("_sum") || s.metric.ends_with("_count"),
                    "untyped {}",
                    s.metric
                );
                v
            }
            other => panic!("{}: unexpected sample type {other:?}", s.metric),
        };
        assert!(s.metric.starts_with("mqttsn_"), "{}", s.metric);
        out.insert(s.metric, v);
    }
    out
}

/// Polls `/healthz` until it answers `want`, returning the body.
async fn wait_health(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(addr, "/healthz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status} {body:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/metrics` until `pred` holds.
async fn wait_scrape(
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(addr).await;
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: metrics never matched: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_and_drops_by_reason() {
    let Some(broker) = Mosquitto::start() else { return };
    let running = gateway_with_metrics(broker.addr()).await;
    let http_addr = running.metrics_addr.expect("the metrics endpoint is bound");
    let udp = running.udp_addrs[0];
    assert_eq!(wait_health(http_addr, 200).await, "ok\n");

    let before = scrape(http_addr).await;
    for name in [
        "mqttsn_datagrams_in_total",
        "mqttsn_malformed_total",
        "mqttsn_topic_refused_total",
        "mqttsn_qos0_dropped_total",
        "mqttsn_qos0_dropped_broker_full_total",
        "mqttsn_qos0_dropped_broker_closed_total",
        "mqttsn_sessions_active",
        "mqttsn_sessions_asleep",
        "mqttsn_held_messages",
        "mqttsn_broker_connections",
    ] {
        assert!(before.contains_key(name), "{name} is exposed");
    }
    assert_eq!(before["mqttsn_broker_reachable"], 1.0);

    let mut dev = SnClient::bind(Ipv4Addr::LOCALHOST, udp, "metrics-dev").await;
    dev.connect(30, true).await;
    dev.publish(TopicRef::Predefined(PREDEFINED_ID), QoS::AtMostOnce, false, b"q0")
        .await;
    dev.publish_qos1(TopicRef::Predefined(PREDEFINED_ID), b"q1").await;
    // A datagram that does not decode.
    dev.send_raw(&[0x05, 0xFF, 0x00]).await;
    // A hostile topic name: a wildcard in a name to register.
    let msg_id = dev.msg_id();
    dev.send(&Packet::Register(Register {
        topic_id: 0,
        msg_id,
        topic_name: "bad/+/name",
    }))
    .await;
    match dev.recv().await {
        Rx::RegAck(a) => assert_eq!((a.msg_id, a.code), (msg_id, ReturnCode::NotSupported)),
        other => panic!("expected a REGACK refusal, got {other:?}"),
    }

    let after = wait_scrape(http_addr, "the traffic counted", |m| {
        m["mqttsn_topic_refused_total"] > before["mqttsn_topic_refused_total"]
            && m["mqttsn_malformed_total"] > before["mqttsn_malformed_total"]
            && m["mqttsn_publishes_in_total"] >= before["mqttsn_publishes_in_total"] + 2.0
    })
    .await;
    let moved = |name: &str| after[name] - before[name];
    assert_eq!(moved("mqttsn_malformed_total"), 1.0);
    assert_eq!(moved("mqttsn_topic_refused_total"), 1.0);
    assert_eq!(moved("mqttsn_connects_total"), 1.0);
    assert_eq!(moved("mqttsn_publishes_in_total"), 2.0);
    assert!(moved("mqttsn_datagrams_in_total") >= 5.0);
    assert!(moved("mqttsn_datagrams_out_total") >= 3.0);
    // Drops of other reasons did not move.
    assert_eq!(moved("mqttsn_unknown_peer_total"), 0.0);
    assert_eq!(moved("mqttsn_qos0_dropped_total"), 0.0);
    assert_eq!(moved("mqttsn_connack_latency_seconds_count"), 1.0);
    assert_eq!(moved("mqttsn_connack_latency_seconds"), 1.0, "the +Inf bucket");
    assert_eq!(
        moved("mqttsn_publish_ack_latency_seconds_count"),
        1.0,
        "the QoS 1 publish"
    );
    assert!(moved("mqttsn_publish_ack_latency_seconds_sum") > 0.0);
    assert_eq!(after["mqttsn_sessions_active"], 1.0);
    assert_eq!(after["mqttsn_broker_connections"], 1.0);

    // A session message from an address with no session.
    let stranger = SnClient::bind(Ipv4Addr::LOCALHOST, udp, "stranger").await;
    stranger
        .send_publish(
            false,
            TopicRef::Predefined(PREDEFINED_ID),
            QoS::AtLeastOnce,
            false,
            9,
            b"x",
        )
        .await;
    wait_scrape(http_addr, "the unknown peer counted", |m| {
        m["mqttsn_unknown_peer_total"] > before["mqttsn_unknown_peer_total"]
    })
    .await;

    // The HTTP edges.
    assert_eq!(get(http_addr, "/nope").await.0, 404);
    assert_eq!(http(http_addr, "POST /metrics HTTP/1.1\r\n\r\n").await.0, 405);

    dev.disconnect().await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_the_broker_and_the_udp_probe_answers() {
    let Some(broker) = Mosquitto::start() else { return };
    let port = broker.addr().port();
    let running = gateway_with_metrics(broker.addr()).await;
    let http_addr = running.metrics_addr.expect("the metrics endpoint is bound");
    assert_eq!(wait_health(http_addr, 200).await, "ok\n");

    // The UDP probe is answered with the reply, by every listener, and is not a datagram
    // for the engine.
    let before = running.stats().metrics;
    let lb = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    lb.send_to(PROBE_REQUEST, running.udp_addrs[0]).await.expect("send");
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, lb.recv_from(&mut buf))
        .await
        .expect("the probe is answered")
        .expect("recv");
    assert_eq!(&buf[..n], PROBE_REPLY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = running.stats().metrics;
    assert_eq!(
        after.datagrams_in, before.datagrams_in,
        "the probe did not reach the engine"
    );
    assert_eq!(after.malformed, before.malformed);

    // The broker goes away: 503 with the reason, and the gauge says so.
    drop(broker);
    let reason = wait_health(http_addr, 503).await;
    assert_eq!(reason, "broker unreachable\n");
    assert_eq!(scrape(http_addr).await["mqttsn_broker_reachable"], 0.0);

    // It comes back on the same port: 200 again.
    let Some(_back) = Mosquitto::start_at(port) else { return };
    assert_eq!(wait_health(http_addr, 200).await, "ok\n");
    running.shutdown().await;
}
