//! Engine cost per message, without sockets or broker: what the gateway's single engine
//! task spends on each datagram and each broker message.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use divan::Bencher;
use gateway::broker::{BrokerEvent, Command, DeliveryId, Message, MqttQos};
use gateway::engine::{EngineConfig, Gateway, LinkAddr};
use sn_codec::{Connect, Packet, PubAck, Publish, QoS, ReturnCode, TopicRef};

fn main() {
    divan::main();
}

fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len()];
    let n = p.encode(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A gateway with `clients` connected clients; returns it with their addresses.
fn setup(clients: u16) -> (Gateway, Vec<LinkAddr>, Vec<u64>) {
    setup_with(EngineConfig::default(), clients)
}

/// [`setup`] with a configuration.
fn setup_with(cfg: EngineConfig, clients: u16) -> (Gateway, Vec<LinkAddr>, Vec<u64>) {
    let mut gw = Gateway::new(cfg);
    let now = Instant::now();
    let mut addrs = Vec::new();
    let mut keys = Vec::new();
    for i in 0..clients {
        let addr = LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 20000 + i)));
        let id = format!("dev{i}");
        let c = encode(&Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: &id,
        }));
        gw.handle_datagram(now, addr.clone(), &c);
        let (key, _) = gw.poll_command().unwrap();
        gw.handle_broker_event(now, key, BrokerEvent::Connected { session_present: false });
        while gw.poll_transmit().is_some() {}
        addrs.push(addr);
        keys.push(key);
    }
    (gw, addrs, keys)
}

/// Device to broker, QoS 0, short topic, 10-octet payload: decode, look up the session,
/// resolve the topic, queue the broker command.
#[divan::bench(args = [1, 1000])]
fn uplink_qos0(bencher: Bencher, clients: u16) {
    let (mut gw, addrs, _) = setup(clients);
    let p = encode(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Short(*b"t1"),
        msg_id: 0,
        data: b"0123456789",
    }));
    let now = Instant::now();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 1) % addrs.len();
        gw.handle_datagram(now, addrs[i].clone(), &p);
        divan::black_box(gw.poll_command());
    });
}

/// [`uplink_qos0`] in registry mode: each publish checked against the device's two
/// `publish` patterns (the second matches), 1,000 clients round-robin.
#[divan::bench]
fn uplink_qos0_registry(bencher: Bencher) {
    let registry = gateway::auth::Registry::parse(
        "[[device]]\nclient_id = \"dev*\"\npublish = [\"sensors/%c/#\", \"t1\"]\n",
        "bench",
        std::path::Path::new("/"),
        |_| None,
    )
    .unwrap();
    let cfg = EngineConfig {
        auth: gateway::auth::AuthConfig {
            registry: Some(std::sync::Arc::new(registry)),
            ..Default::default()
        },
        ..EngineConfig::default()
    };
    let (mut gw, addrs, _) = setup_with(cfg, 1000);
    let p = encode(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Short(*b"t1"),
        msg_id: 0,
        data: b"0123456789",
    }));
    let now = Instant::now();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 1) % addrs.len();
        gw.handle_datagram(now, addrs[i].clone(), &p);
        divan::black_box(gw.poll_command());
    });
}

/// Broker to device, QoS 1: the message is queued, published, acknowledged by the
/// device, and acknowledged to the broker.
#[divan::bench]
fn downlink_qos1_round_trip(bencher: Bencher) {
    let (mut gw, addrs, keys) = setup(1);
    let now = Instant::now();
    let payload = Bytes::from_static(b"0123456789");
    let topic: std::sync::Arc<str> = "ab".into();
    bencher.bench_local(|| {
        gw.handle_broker_event(
            now,
            keys[0],
            BrokerEvent::Message(Message {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: MqttQos::AtLeastOnce,
                retain: false,
                delivery: DeliveryId(1),
            }),
        );
        let t = gw.poll_transmit().unwrap();
        let Ok(Packet::Publish(p)) = Packet::decode(&t.data) else {
            panic!()
        };
        let ack = encode(&Packet::PubAck(PubAck {
            topic_id: 0,
            msg_id: p.msg_id,
            code: ReturnCode::Accepted,
        }));
        gw.handle_datagram(now, addrs[0].clone(), &ack);
        let Some((_, Command::Ack { .. })) = gw.poll_command() else {
            panic!()
        };
    });
}
