//! The graceful stop, and broker connect failures, with a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::T;
use super::*;
use crate::broker::Will;
use sn_codec::{Connect, PubAck, Publish, ReturnCode, TopicRef, WillTopic};

fn udp(n: u16) -> LinkAddr {
    LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 21000 + n)))
}

fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len()];
    let n = p.encode(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn connect(id: &str, will: bool) -> Vec<u8> {
    encode(&Packet::Connect(Connect {
        will,
        clean_session: true,
        duration: 60,
        client_id: id,
    }))
}

fn cfg() -> EngineConfig {
    EngineConfig {
        predefined: Arc::new(Predefined::new([(77, "sensors/temp".to_string())]).unwrap()),
        ..EngineConfig::default()
    }
}

fn decoded(tx: &[(LinkAddr, Vec<u8>)]) -> Vec<(LinkAddr, Packet<'_>)> {
    tx.iter()
        .map(|(a, d)| (a.clone(), Packet::decode(d).unwrap()))
        .collect()
}

/// Connects a client with a will; its key.
fn connect_with_will(t: &mut T, from: &LinkAddr, id: &str) -> ClientKey {
    t.feed(from, &connect(id, true));
    t.feed(
        from,
        &encode(&Packet::WillTopic(Some(WillTopic {
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "wills/x",
        }))),
    );
    t.tx();
    t.connected(from, &encode(&Packet::WillMsg(b"gone")))
}

fn disconnects(cmds: &[(ClientKey, Command)]) -> Vec<(ClientKey, Option<Will>)> {
    cmds.iter()
        .filter_map(|(k, c)| match c {
            Command::Disconnect { will } => Some((*k, will.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn broker_refusal_is_rejected_and_unreachable_is_congestion() {
    let mut t = T::with(cfg());
    for (n, refused, code) in [(1, true, ReturnCode::NotSupported), (2, false, ReturnCode::Congestion)] {
        let d = udp(n);
        t.feed(&d, &connect(&format!("c{n}"), false));
        let cmds = t.cmds();
        let [(key, Command::Connect(_))] = cmds.as_slice() else {
            panic!("{cmds:?}")
        };
        t.gw.handle_broker_event(
            t.now,
            *key,
            BrokerEvent::ConnectFailed {
                reason: "no".into(),
                refused,
            },
        );
        assert_eq!(decoded(&t.tx()), [(d, Packet::ConnAck(code))]);
        assert_eq!(t.gw.stats().sessions, 0);
    }
}

#[test]
fn qos0_publishes_the_link_cannot_take_are_counted_by_reason() {
    let mut t = T::with(cfg());
    let d = udp(1);
    let key = t.connected(&d, &connect("c", false));
    for reason in [RejectReason::Full, RejectReason::Full, RejectReason::Closed] {
        t.gw.handle_broker_event(t.now, key, BrokerEvent::Rejected { token: 0, reason });
    }
    let m = t.gw.stats().metrics;
    assert_eq!(
        (
            m.qos0_dropped_broker_full,
            m.qos0_dropped_broker_closed,
            m.broker_rejected
        ),
        (2, 1, 3)
    );
    assert!(t.tx().is_empty(), "nothing to tell a QoS 0 publisher");
}

#[test]
fn shutdown_disconnects_awake_closes_sleeping_and_refuses_new() {
    let mut t = T::with(cfg());
    let awake = udp(1);
    let sleeper = udp(2);
    let ka = connect_with_will(&mut t, &awake, "awake");
    let ks = connect_with_will(&mut t, &sleeper, "sleeper");
    t.feed(&sleeper, &encode(&Packet::Disconnect(Some(600))));
    t.tx();
    let connecting = udp(3);
    t.feed(&connecting, &connect("connecting", false));
    let kc = t.cmds()[0].0;

    t.gw.shutdown(t.now, false);
    let raw = t.tx();
    let mut tx = decoded(&raw);
    tx.sort_by_key(|(a, _)| a.clone());
    assert_eq!(
        tx,
        [
            (awake.clone(), Packet::Disconnect(None)),
            (connecting.clone(), Packet::ConnAck(ReturnCode::Congestion)),
        ]
    );
    let mut closed = disconnects(&t.cmds());
    closed.sort_by_key(|(k, _)| *k);
    assert_eq!(
        closed,
        [(ka, None), (ks, None), (kc, None)],
        "no will on a planned stop"
    );
    assert!(t.gw.is_shut_down());

    // No new sessions.
    let late = udp(4);
    t.feed(&late, &connect("late", false));
    assert_eq!(decoded(&t.tx()), [(late, Packet::ConnAck(ReturnCode::Congestion))]);
    assert!(t.cmds().is_empty());
}

#[test]
fn shutdown_can_publish_wills() {
    let mut t = T::with(cfg());
    let awake = udp(1);
    let sleeper = udp(2);
    connect_with_will(&mut t, &awake, "awake");
    connect_with_will(&mut t, &sleeper, "sleeper");
    t.feed(&sleeper, &encode(&Packet::Disconnect(Some(600))));
    t.tx();
    t.gw.shutdown(t.now, true);
    let closed = disconnects(&t.cmds());
    assert_eq!(closed.len(), 2);
    for (_, will) in closed {
        let will = will.expect("a will on the way out");
        assert_eq!((will.topic.as_str(), &will.message[..]), ("wills/x", &b"gone"[..]));
    }
}

/// The device publishes at QoS 1 (msg id 9, predefined topic 77).
fn publish_qos1(t: &mut T, d: &LinkAddr) {
    t.feed(
        d,
        &encode(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Predefined(77),
            msg_id: 9,
            data: b"x",
        })),
    );
}

#[test]
fn shutdown_waits_for_an_uplink_publish_in_flight() {
    let mut t = T::with(cfg());
    let d = udp(1);
    let key = t.connected(&d, &connect("c", false));
    publish_qos1(&mut t, &d);
    let cmds = t.cmds();
    let [(_, Command::Publish { token, .. })] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    t.gw.shutdown(t.now, false);
    assert!(t.tx().is_empty(), "DISCONNECT before the broker acknowledged");
    assert!(t.cmds().is_empty());
    assert!(!t.gw.is_shut_down());

    t.gw.handle_broker_event(t.now, key, BrokerEvent::Published { token: *token });
    assert_eq!(
        decoded(&t.tx()),
        [
            (
                d.clone(),
                Packet::PubAck(PubAck {
                    topic_id: 77,
                    msg_id: 9,
                    code: ReturnCode::Accepted
                })
            ),
            (d, Packet::Disconnect(None)),
        ]
    );
    assert_eq!(disconnects(&t.cmds()), [(key, None)]);
    assert!(t.gw.is_shut_down());
}

#[test]
fn shutdown_timeout_ends_what_is_still_in_flight() {
    let mut t = T::with(cfg());
    let d = udp(1);
    let key = t.connected(&d, &connect("c", false));
    publish_qos1(&mut t, &d);
    t.cmds();
    t.gw.shutdown(t.now, false);
    assert!(!t.gw.is_shut_down());
    t.gw.finish_shutdown(t.now);
    assert_eq!(decoded(&t.tx()), [(d, Packet::Disconnect(None))]);
    assert_eq!(disconnects(&t.cmds()), [(key, None)]);
    assert!(t.gw.is_shut_down());
}
