//! `gateway::broker::conn`, our own MQTT 3.1.1 connection task, against a real mosquitto
//! (an observer on its own rumqttc connection sees what reaches the broker) and against
//! stand-in brokers on loopback sockets for what mosquitto will not do (refuse with a
//! given code, go silent, send garbage).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use e2e::{free_port, init_logging, Mosquitto, Observer, QUIET, WAIT};
use gateway::broker::conn::{self, ConnEvent, ConnOptions, ConnRequest};
use gateway::broker::{MqttQos, Will};
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

fn opts(addr: SocketAddr, id: &str) -> ConnOptions {
    ConnOptions {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: None,
        source: None,
        client_id: id.to_owned(),
        clean_session: true,
        keep_alive: Duration::from_secs(30),
        credentials: None,
        will: None,
        connect_timeout: Duration::from_secs(5),
        inflight: 64,
        max_packet_size: 256 * 1024,
    }
}

/// A running connection task with its two channels.
struct Conn {
    tx: conn::Requests,
    rx: mpsc::UnboundedReceiver<ConnEvent>,
    task: JoinHandle<()>,
}

fn start(o: ConnOptions) -> Conn {
    init_logging();
    let (tx, requests) = conn::queue(1024, usize::MAX);
    let (events, rx) = mpsc::unbounded_channel();
    let task = conn::spawn(o, requests, events);
    Conn { tx, rx, task }
}

impl Conn {
    async fn next(&mut self) -> ConnEvent {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("an event in time")
            .expect("the task reports before it ends")
    }

    async fn connected(o: ConnOptions) -> Conn {
        let mut c = start(o);
        assert_eq!(c.next().await, ConnEvent::Connected { session_present: false });
        c
    }

    async fn send(&self, r: ConnRequest) {
        self.tx.try_send(r).expect("the task takes requests");
    }

    async fn publish(&self, tag: u64, topic: &str, payload: &[u8], qos: MqttQos) {
        self.send(ConnRequest::Publish {
            tag: Some(tag),
            topic: Arc::from(topic),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain: false,
        })
        .await;
    }

    /// Disconnect, then the task reports Closed and ends.
    async fn disconnect(mut self) {
        self.send(ConnRequest::Disconnect).await;
        loop {
            match self.next().await {
                ConnEvent::Closed { reason } => {
                    assert_eq!(reason, "disconnected");
                    break;
                }
                ConnEvent::Published { .. } | ConnEvent::Message { .. } => {}
                e => panic!("unexpected {e:?} before Closed"),
            }
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the task ends")
            .expect("no panic");
    }
}

fn qos_of(n: u8) -> MqttQos {
    match n {
        0 => MqttQos::AtMostOnce,
        1 => MqttQos::AtLeastOnce,
        _ => MqttQos::ExactlyOnce,
    }
}

#[tokio::test]
async fn connects_and_disconnects() {
    let Some(m) = Mosquitto::start() else { return };
    let c = Conn::connected(opts(m.addr(), "conn-basic")).await;
    c.disconnect().await;
}

/// A stand-in broker: accepts one connection and reads its CONNECT.
async fn stand_in() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Accepts one client and reads its CONNECT; returns the stream and the client's address.
async fn accept_connect(l: &TcpListener) -> (TcpStream, SocketAddr, rumqttc::mqttbytes::v4::Connect) {
    let (mut s, peer) = l.accept().await.unwrap();
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match Packet::read(&mut buf, 1 << 16) {
            Ok(Packet::Connect(c)) => return (s, peer, c),
            Ok(p) => panic!("expected CONNECT, got {p:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad CONNECT: {e}"),
        }
        assert_ne!(
            s.read_buf(&mut buf).await.unwrap(),
            0,
            "the client closed before CONNECT"
        );
    }
}

#[tokio::test]
async fn refused_is_told_from_unreachable() {
    // A broker answering CONNACK 0x05 (not authorized).
    let (l, addr) = stand_in().await;
    let broker = tokio::spawn(async move {
        let (mut s, _, c) = accept_connect(&l).await;
        assert_eq!(c.client_id, "conn-refused");
        assert_eq!(
            c.login.map(|l| (l.username, l.password)),
            Some(("dev".into(), "wrong".into()))
        );
        s.write_all(&[0x20, 0x02, 0x00, 0x05]).await.unwrap();
        // Keep the socket open: the refusal must come from the CONNACK, not from EOF.
        tokio::time::sleep(WAIT).await;
    });
    let mut o = opts(addr, "conn-refused");
    o.credentials = Some(("dev".into(), "wrong".into()));
    let mut c = start(o);
    match c.next().await {
        ConnEvent::ConnectFailed { refused: true, reason } => assert!(reason.contains("NotAuthorized"), "{reason}"),
        e => panic!("expected a refusal, got {e:?}"),
    }
    tokio::time::timeout(WAIT, c.task).await.unwrap().unwrap();
    broker.abort();

    // Nobody listening.
    let mut c = start(opts(
        SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        "conn-nobody",
    ));
    match c.next().await {
        ConnEvent::ConnectFailed { refused: false, .. } => {}
        e => panic!("expected unreachable, got {e:?}"),
    }

    // Listening but never answering: the connect timeout.
    let (l, addr) = stand_in().await;
    let mut o = opts(addr, "conn-silent");
    o.connect_timeout = Duration::from_millis(300);
    let mut c = start(o);
    let (_s, _, _) = accept_connect(&l).await;
    match c.next().await {
        ConnEvent::ConnectFailed { refused: false, reason } => assert!(reason.contains("no answer"), "{reason}"),
        e => panic!("expected a timeout, got {e:?}"),
    }
}

#[tokio::test]
async fn refused_by_mosquitto_without_credentials() {
    let Some(m) = Mosquitto::start_with_conf("allow_anonymous false\n") else {
        return;
    };
    let mut c = start(opts(m.addr(), "conn-anon"));
    match c.next().await {
        ConnEvent::ConnectFailed { refused: true, .. } => {}
        e => panic!("expected a refusal, got {e:?}"),
    }
}

#[tokio::test]
async fn qos_0_1_2_both_ways() {
    let Some(m) = Mosquitto::start() else { return };
    let mut obs = Observer::connect(m.addr(), "conn-obs").await;
    obs.subscribe("conn/out/#", 2).await;
    let mut c = Conn::connected(opts(m.addr(), "conn-qos")).await;
    c.send(ConnRequest::Subscribe {
        tag: 9,
        filters: vec![(Arc::from("conn/in/#"), MqttQos::ExactlyOnce)],
    })
    .await;
    assert_eq!(
        c.next().await,
        ConnEvent::SubAck {
            tag: 9,
            granted: vec![Some(MqttQos::ExactlyOnce)]
        }
    );

    for q in 0..=2u8 {
        // Outgoing: the broker has it (Published for QoS 1/2) and the observer gets it.
        c.publish(u64::from(q), &format!("conn/out/{q}"), &[q], qos_of(q)).await;
        if q > 0 {
            assert_eq!(c.next().await, ConnEvent::Published { tag: u64::from(q) });
        }
        let msg = obs.expect_msg_eq(&format!("conn/out/{q}"), &[q]).await;
        assert_eq!(msg.qos, q);

        // Incoming: more messages than mosquitto keeps in flight to one client (20), so
        // every one arriving proves our acks (PUBACK; PUBREC then PUBCOMP) reached it.
        for i in 0..30u8 {
            obs.publish(&format!("conn/in/{q}"), q, false, &[q, i]).await;
        }
        for i in 0..30u8 {
            match c.next().await {
                ConnEvent::Message {
                    topic,
                    payload,
                    qos,
                    retain: false,
                    dup: false,
                    pkid,
                } => {
                    assert_eq!(&*topic, format!("conn/in/{q}"));
                    assert_eq!(&payload[..], &[q, i]);
                    assert_eq!(qos, qos_of(q));
                    assert_eq!(pkid == 0, q == 0);
                    c.send(ConnRequest::Ack { pkid, qos }).await;
                }
                e => panic!("expected a message, got {e:?}"),
            }
        }
    }
    obs.expect_none().await;
    c.disconnect().await;
}

#[tokio::test]
async fn burst_of_500_qos2_publishes_with_inflight_64() {
    // Mosquitto takes at most `max_inflight_messages` (default 20) QoS 2 PUBLISHes in
    // flight from one MQTT 3.1.1 client and drops any beyond, answering PUBREC all the
    // same: a broker's limit the inflight bound must respect.
    let Some(m) = Mosquitto::start_with_conf("max_inflight_messages 64\n") else {
        return;
    };
    let mut obs = Observer::connect(m.addr(), "conn-burst-obs").await;
    obs.subscribe("burst/#", 1).await;
    let mut o = opts(m.addr(), "conn-burst");
    o.inflight = 64;
    let mut c = Conn::connected(o).await;
    const N: u64 = 500;
    for i in 0..N {
        c.publish(i, &format!("burst/{}", i % 7), &i.to_be_bytes(), MqttQos::ExactlyOnce)
            .await;
    }
    let mut tags = HashMap::new();
    while tags.len() < N as usize {
        match c.next().await {
            ConnEvent::Published { tag } => {
                assert!(tag < N);
                assert!(tags.insert(tag, ()).is_none(), "tag {tag} answered twice");
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    let mut seen = HashMap::new();
    for _ in 0..N {
        let Some(msg) = obs.recv_within(WAIT).await else {
            panic!(
                "{} of {N} messages reached the observer; missing: {:?}",
                seen.len(),
                (0..N).filter(|i| !seen.contains_key(i)).collect::<Vec<_>>()
            );
        };
        let i = u64::from_be_bytes(msg.payload.as_slice().try_into().unwrap());
        assert!(seen.insert(i, ()).is_none(), "message {i} delivered twice");
    }
    obs.expect_none().await;
    c.disconnect().await;
}

#[tokio::test]
async fn two_hundred_subscribes_amid_publishes_each_answered_with_its_tag() {
    let Some(m) = Mosquitto::start() else { return };
    let mut o = opts(m.addr(), "conn-subs");
    o.inflight = 16;
    let mut c = Conn::connected(o).await;
    // SUBSCRIBEs and QoS 1 publishes share the id space: interleaved, none may take an
    // id in use by another.
    for i in 0..200u64 {
        let q = qos_of((i % 3) as u8);
        c.send(ConnRequest::Subscribe {
            tag: i,
            filters: vec![(Arc::from(format!("subs/{i}").as_str()), q)],
        })
        .await;
        c.publish(1000 + i, "subs/none", b"x", MqttQos::AtLeastOnce).await;
    }
    let mut subacks = HashMap::new();
    let mut published = HashMap::new();
    while subacks.len() < 200 || published.len() < 200 {
        match c.next().await {
            ConnEvent::SubAck { tag, granted } => {
                assert_eq!(granted, vec![Some(qos_of((tag % 3) as u8))], "tag {tag}");
                assert!(subacks.insert(tag, ()).is_none(), "SUBACK for {tag} twice");
            }
            ConnEvent::Published { tag } => {
                assert!((1000..1200).contains(&tag));
                assert!(published.insert(tag, ()).is_none(), "tag {tag} answered twice");
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    c.send(ConnRequest::Unsubscribe {
        tag: 7,
        filters: vec![Arc::from("subs/7")],
    })
    .await;
    assert_eq!(c.next().await, ConnEvent::UnsubAck { tag: 7 });
    c.disconnect().await;
}

fn will(topic: &str) -> Will {
    Will {
        topic: topic.into(),
        message: Bytes::from_static(b"gone"),
        qos: MqttQos::AtLeastOnce,
        retain: false,
    }
}

#[tokio::test]
async fn will_when_dropped_none_after_disconnect() {
    let Some(m) = Mosquitto::start() else { return };
    let mut obs = Observer::connect(m.addr(), "conn-will-obs").await;
    obs.subscribe("will/#", 1).await;

    let mut o = opts(m.addr(), "conn-will-a");
    o.will = Some(will("will/a"));
    let c = Conn::connected(o).await;
    c.task.abort();
    obs.expect_msg_eq("will/a", b"gone").await;

    let mut o = opts(m.addr(), "conn-will-b");
    o.will = Some(will("will/b"));
    let c = Conn::connected(o).await;
    c.disconnect().await;
    obs.expect_none_for(QUIET * 2).await;
}

#[tokio::test]
async fn keep_alive_pings_and_loses_a_silent_broker() {
    let (l, addr) = stand_in().await;
    let mut o = opts(addr, "conn-ka");
    o.keep_alive = Duration::from_secs(1);
    let mut c = start(o);
    let (mut s, _, connect) = accept_connect(&l).await;
    assert_eq!(connect.keep_alive, 1);
    s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    assert_eq!(c.next().await, ConnEvent::Connected { session_present: false });
    // The broker reads but never answers: the task pings, then gives up.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    match c.next().await {
        ConnEvent::Closed { reason } => assert!(reason.contains("keep-alive"), "{reason}"),
        e => panic!("expected Closed, got {e:?}"),
    }
    let got = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(got, [0xC0, 0x00], "one PINGREQ, then the connection closed");
}

/// Connects to a stand-in that sends `bytes` after CONNACK; returns the Closed reason.
async fn closed_after(bytes: &'static [u8]) -> String {
    let (l, addr) = stand_in().await;
    let mut c = start(opts(addr, "conn-bad"));
    let (mut s, _, _) = accept_connect(&l).await;
    s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    assert_eq!(c.next().await, ConnEvent::Connected { session_present: false });
    s.write_all(bytes).await.unwrap();
    let reason = match c.next().await {
        ConnEvent::Closed { reason } => reason,
        e => panic!("expected Closed, got {e:?}"),
    };
    tokio::time::timeout(WAIT, c.task).await.unwrap().unwrap();
    reason
}

#[tokio::test]
async fn garbage_or_an_unknown_ack_ends_the_connection_with_a_reason() {
    let r = closed_after(&[0xF0, 0x00]).await;
    assert!(r.contains("malformed"), "{r}");
    // A remaining length of five continuation bytes.
    let r = closed_after(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).await;
    assert!(r.contains("malformed"), "{r}");
    // PUBACK for an id never used.
    let r = closed_after(&[0x40, 0x02, 0x00, 0x4D]).await;
    assert!(r.contains("PUBACK for packet id 77"), "{r}");
    // A packet brokers never send.
    let r = closed_after(&[0xC0, 0x00]).await;
    assert!(r.contains("PINGREQ"), "{r}");
}

#[tokio::test]
async fn binds_the_source_address() {
    let (l, addr) = stand_in().await;
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut o = opts(addr, "conn-source");
    o.source = Some(source);
    let mut c = start(o);
    let (mut s, peer, _) = accept_connect(&l).await;
    assert_eq!(peer.ip(), source);
    s.write_all(&[0x20, 0x02, 0x01, 0x00]).await.unwrap();
    assert_eq!(c.next().await, ConnEvent::Connected { session_present: true });
}

fn vm_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Memory per idle connection: 2,000 connections to mosquitto, VmRSS before and after.
/// `cargo nextest run --release -p e2e --test broker_conn --run-ignored only --no-capture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run on demand"]
async fn memory_per_idle_connection() {
    let Some(m) = Mosquitto::start_with_conf("max_connections -1\n") else {
        return;
    };
    const N: usize = 2000;
    // Warm up the runtime and allocator with one connection first.
    let warm = Conn::connected(opts(m.addr(), "conn-mem-warm")).await;
    let before = vm_rss_kb();
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut o = opts(m.addr(), &format!("conn-mem-{i}"));
        o.keep_alive = Duration::from_secs(600);
        conns.push(Conn::connected(o).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = vm_rss_kb();
    println!(
        "VmRSS before {before} kB, after {after} kB: {:.2} KB per idle connection ({N} connections)",
        (after - before) as f64 / N as f64
    );
    drop(conns);
    warm.disconnect().await;
}

#[tokio::test]
async fn tls_with_a_client_certificate_and_a_refused_server_certificate() {
    let Some(pki) = e2e::tls::Pki::generate() else { return };
    let Some(m) = e2e::tls::TlsMosquitto::start(&pki, true) else {
        return;
    };
    let good = pki.broker_config(m.addr(), &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let mut o = opts(m.addr(), "conn-tls");
    o.tls = Some(good.tls.as_ref().unwrap().config());
    let mut c = Conn::connected(o).await;
    c.send(ConnRequest::Subscribe {
        tag: 1,
        filters: vec![(Arc::from("tls/#"), MqttQos::AtLeastOnce)],
    })
    .await;
    assert_eq!(
        c.next().await,
        ConnEvent::SubAck {
            tag: 1,
            granted: vec![Some(MqttQos::AtLeastOnce)]
        }
    );
    c.publish(2, "tls/x", b"over tls", MqttQos::AtLeastOnce).await;
    let mut published = false;
    let mut received = false;
    while !(published && received) {
        match c.next().await {
            ConnEvent::Published { tag: 2 } => published = true,
            ConnEvent::Message {
                topic,
                payload,
                pkid,
                qos,
                ..
            } => {
                assert_eq!((&*topic, &payload[..]), ("tls/x", &b"over tls"[..]));
                c.send(ConnRequest::Ack { pkid, qos }).await;
                received = true;
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    c.disconnect().await;

    // Trusting another CA only: the broker's certificate is refused.
    let bad = pki.broker_config(m.addr(), &pki.other_ca, Some((&pki.client_cert, &pki.client_key)));
    let mut o = opts(m.addr(), "conn-tls-bad");
    o.tls = Some(bad.tls.as_ref().unwrap().config());
    let mut c = start(o);
    match c.next().await {
        ConnEvent::ConnectFailed { refused: true, reason } => assert!(reason.contains("TLS"), "{reason}"),
        e => panic!("expected a TLS refusal, got {e:?}"),
    }
}

/// Reads whole packets from a stand-in's stream until `n` have arrived.
async fn read_packets(s: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Packet> {
    let mut out = Vec::new();
    while out.len() < n {
        match Packet::read(buf, 1 << 16) {
            Ok(p) => out.push(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                let read = tokio::time::timeout(WAIT, s.read_buf(buf))
                    .await
                    .expect("packets in time")
                    .unwrap();
                assert_ne!(read, 0, "the client closed");
            }
            Err(e) => panic!("bad packet from the client: {e}"),
        }
    }
    out
}

#[tokio::test]
async fn requests_beyond_inflight_wait_in_order() {
    let (l, addr) = stand_in().await;
    let mut o = opts(addr, "conn-inflight");
    o.inflight = 4;
    let mut c = start(o);
    let (mut s, _, _) = accept_connect(&l).await;
    s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    assert_eq!(c.next().await, ConnEvent::Connected { session_present: false });
    for i in 0..10u64 {
        c.publish(i, "t", &[i as u8], MqttQos::AtLeastOnce).await;
    }
    // Behind the publishes, a QoS 0 publish waits too: requests keep their order.
    c.publish(99, "t", b"qos0", MqttQos::AtMostOnce).await;
    let mut buf = BytesMut::new();
    let first = read_packets(&mut s, &mut buf, 4).await;
    let mut ids = Vec::new();
    for (i, p) in first.iter().enumerate() {
        match p {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], &[i as u8]);
                ids.push(p.pkid);
            }
            p => panic!("expected PUBLISH, got {p:?}"),
        }
    }
    // Nothing beyond the bound while nothing is acknowledged.
    tokio::time::sleep(QUIET).await;
    assert!(Packet::read(&mut buf, 1 << 16).is_err(), "nothing more was sent");
    let mut more = [0u8; 16];
    assert!(
        tokio::time::timeout(QUIET, s.read(&mut more)).await.is_err(),
        "nothing more was sent"
    );
    // Each PUBACK lets one more through, with an id not in use.
    for (k, id) in ids.clone().into_iter().enumerate() {
        s.write_all(&[0x40, 0x02, (id >> 8) as u8, id as u8]).await.unwrap();
        assert_eq!(c.next().await, ConnEvent::Published { tag: k as u64 });
        let next = read_packets(&mut s, &mut buf, 1).await;
        match &next[0] {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], &[(k + 4) as u8]);
                assert!(!ids[k + 1..].contains(&p.pkid), "id {} is in use", p.pkid);
                ids.push(p.pkid);
            }
            p => panic!("expected PUBLISH, got {p:?}"),
        }
    }
}

#[tokio::test]
async fn qos_2_publishes_right_before_disconnect_are_delivered() {
    // mosquitto hands an incoming QoS 2 message on at PUBREL: a DISCONNECT sent before
    // the exchange completes would lose it, so Disconnect waits for what is in flight.
    let Some(m) = Mosquitto::start() else { return };
    let mut obs = Observer::connect(m.addr(), "conn-last-obs").await;
    obs.subscribe("last/#", 1).await;
    let mut o = opts(m.addr(), "conn-last");
    o.inflight = 10;
    let c = Conn::connected(o).await;
    for i in 0..10u8 {
        c.publish(u64::from(i), "last/x", &[i], MqttQos::ExactlyOnce).await;
    }
    c.disconnect().await;
    for i in 0..10u8 {
        obs.expect_msg_eq("last/x", &[i]).await;
    }
}

/// `broker.source_addresses`: the transparent link makes its device connections from the
/// addresses in turn, so each address carries its share (and its own ephemeral ports).
#[tokio::test]
async fn transparent_connections_spread_over_the_source_addresses() {
    use gateway::broker::mqtt::{BrokerConfig, MqttLinks};
    use gateway::broker::{BrokerEvent, BrokerLink, Command, ConnectParams};
    init_logging();
    let (l, addr) = stand_in().await;
    let sources: Vec<IpAddr> = (2..=4).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let cfg = BrokerConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        source_addresses: sources.clone(),
        ..BrokerConfig::default()
    };
    let (tx, mut events) = mpsc::channel(64);
    let mut links = MqttLinks::new(cfg, tx);
    for key in 1..=6u64 {
        let params = ConnectParams {
            client_id: format!("src-{key}"),
            clean_session: true,
            keep_alive: 30,
            will: None,
            credentials: None,
            client_identity: None,
        };
        assert_eq!(links.execute(key, Command::Connect(params)), None);
    }
    // The stand-in broker accepts all six and answers each CONNACK.
    let mut from: HashMap<IpAddr, usize> = HashMap::new();
    let mut held = Vec::new();
    for _ in 0..6 {
        let (mut s, peer, _) = accept_connect(&l).await;
        s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        *from.entry(peer.ip()).or_default() += 1;
        held.push(s);
    }
    for _ in 0..6 {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some((_, BrokerEvent::Connected { .. }))) => {}
            other => panic!("expected Connected, got {other:?}"),
        }
    }
    for ip in &sources {
        assert_eq!(from.get(ip), Some(&2), "two connections from {ip}: {from:?}");
    }
    assert_eq!(from.len(), 3, "{from:?}");
}

/// Aggregating mode: shared connection n is made from source address n (modulo their
/// number), on our own connection task too.
#[tokio::test]
async fn shared_connections_spread_over_the_source_addresses() {
    use gateway::broker::mqtt::{BrokerConfig, LinkMode};
    use gateway::broker::shared::SharedLinks;
    init_logging();
    let (l, addr) = stand_in().await;
    let sources: Vec<IpAddr> = (2..=4).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let cfg = BrokerConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        source_addresses: sources.clone(),
        mode: LinkMode::Aggregating,
        connections: 3,
        ..BrokerConfig::default()
    };
    let (tx, _events) = mpsc::channel(64);
    let _links = SharedLinks::new(cfg, tx, None);
    let mut from: HashMap<String, IpAddr> = HashMap::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, peer, c) = tokio::time::timeout(WAIT, accept_connect(&l)).await.expect("a CONNECT");
        from.insert(c.client_id, peer.ip());
        held.push(s);
    }
    for (n, ip) in sources.iter().enumerate() {
        assert_eq!(from.get(&format!("mqtt-sn-gw-1-{n}")), Some(ip), "{from:?}");
    }
}
