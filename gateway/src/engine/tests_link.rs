//! Links coming and going, and gateway discovery (spec 6.1), with a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::T;
use super::*;
use crate::broker::Will;
use bytes::Bytes;
use sn_codec::{Advertise, Connect, GwInfo, WillTopic};

const BCAST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(255, 255, 255, 255)), 10000);

fn udp(n: u16) -> LinkAddr {
    LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 20000 + n)))
}

fn encode(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len()];
    let n = p.encode(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn encapsulated(radius: u8, node: &[u8], p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0; p.encoded_len() + node.len() + 3];
    let n = sn_codec::encode_encapsulated(radius, node, p, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn connect(id: &str, will: bool, keep_alive: u16) -> Packet<'_> {
    Packet::Connect(Connect {
        will,
        clean_session: true,
        duration: keep_alive,
        client_id: id,
    })
}

fn will() -> Will {
    Will {
        topic: "wills/s0".into(),
        message: Bytes::from_static(b"unplugged"),
        qos: MqttQos::AtLeastOnce,
        retain: false,
    }
}

#[test]
fn link_down_loses_every_session_on_that_link_only() {
    let mut t = T::with(EngineConfig::default());
    let s0 = LinkAddr::Serial(0);
    let s1 = LinkAddr::Serial(1);

    // On serial 0: a client with a will...
    t.feed(&s0, &encode(&connect("with-will", true, 60)));
    t.tx();
    t.feed(
        &s0,
        &encode(&Packet::WillTopic(Some(WillTopic {
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "wills/s0",
        }))),
    );
    t.tx();
    t.feed(&s0, &encode(&Packet::WillMsg(b"unplugged")));
    let key_will = t.cmds()[0].0;
    t.gw.handle_broker_event(t.now, key_will, BrokerEvent::Connected { session_present: false });
    t.tx();
    // ...two nodes behind a radio coordinator on the same port, one of them asleep...
    let node_a = t.connected(&s0, &encapsulated(0, b"\x0a", &connect("node-a", false, 60)));
    let node_b = t.connected(&s0, &encapsulated(0, b"\x0b", &connect("node-b", false, 60)));
    t.feed(&s0, &encapsulated(0, b"\x0b", &Packet::Disconnect(Some(600))));
    t.tx();
    assert_eq!(t.gw.session_state("node-b"), Some(SessionState::Asleep));
    // ...and one still in its will handshake (no broker connection yet).
    t.feed(&s0, &encapsulated(0, b"\x0c", &connect("handshaking", true, 60)));
    t.tx();
    assert!(t.cmds().is_empty());
    // Elsewhere: serial 1 and UDP.
    t.connected(&s1, &encode(&connect("other-port", false, 60)));
    t.connected(&udp(1), &encode(&connect("udp", false, 60)));
    assert_eq!(t.gw.stats().sessions, 6);

    t.gw.link_down(t.now, &s0);

    let mut cmds = t.cmds();
    cmds.sort_by_key(|(k, _)| *k);
    assert_eq!(
        cmds,
        vec![
            (key_will, Command::Disconnect { will: Some(will()) }),
            (node_a, Command::Disconnect { will: None }),
            (node_b, Command::Disconnect { will: None }),
        ],
        "connected and sleeping clients are lost (will published); the handshake just ends"
    );
    assert!(t.tx().is_empty(), "nothing is sent to a link that is gone");
    for gone in ["with-will", "node-a", "node-b", "handshaking"] {
        assert_eq!(t.gw.session_state(gone), None, "{gone}");
    }
    assert_eq!(t.gw.session_state("other-port"), Some(SessionState::Active));
    assert_eq!(t.gw.session_state("udp"), Some(SessionState::Active));
    let m = t.gw.stats().metrics;
    assert_eq!((m.lost, m.links_down), (3, 1));
    assert_eq!(t.gw.stats().sessions, 2);
    // No timer of a removed session is left behind.
    t.at(10_000.0);
    assert!(t.cmds().iter().all(|(k, _)| ![key_will, node_a, node_b].contains(k)));

    // The port comes back: a device connects again on it.
    t.gw.link_up(t.now, &s0);
    t.tx();
    t.connected(&s0, &encode(&connect("with-will", false, 0)));
    assert_eq!(t.gw.session_state("with-will"), Some(SessionState::Active));
}

#[test]
fn advertise_every_period_on_udp_broadcast_and_serial_links_that_are_up() {
    let mut t = T::with(EngineConfig {
        gateway_id: 7,
        advertise_interval: Some(Duration::from_secs(60)),
        udp_broadcast: Some(BCAST),
        ..EngineConfig::default()
    });
    let adv = |duration| encode(&Packet::Advertise(Advertise { gw_id: 7, duration }));
    let b = LinkAddr::Udp(0, BCAST);

    assert_eq!(t.gw.poll_timeout(), None, "nothing before start");
    t.gw.start(t.now);
    assert_eq!(t.tx(), vec![(b.clone(), adv(60))]);
    assert_eq!(t.gw.poll_timeout(), Some(t.t0 + Duration::from_secs(60)));

    // A port that comes up hears at once how long until the next one.
    t.at(10.0);
    t.gw.link_up(t.now, &LinkAddr::Serial(0));
    t.gw.link_up(t.now, &LinkAddr::Serial(3));
    assert_eq!(
        t.tx(),
        vec![(LinkAddr::Serial(0), adv(50)), (LinkAddr::Serial(3), adv(50))]
    );

    t.at(59.0);
    assert!(t.tx().is_empty());
    t.at(60.0);
    assert_eq!(
        t.tx(),
        vec![
            (b.clone(), adv(60)),
            (LinkAddr::Serial(0), adv(60)),
            (LinkAddr::Serial(3), adv(60))
        ]
    );
    assert_eq!(t.gw.poll_timeout(), Some(t.t0 + Duration::from_secs(120)));

    // A port that went away is not advertised on.
    t.gw.link_down(t.now, &LinkAddr::Serial(3));
    t.at(120.0);
    assert_eq!(t.tx(), vec![(b.clone(), adv(60)), (LinkAddr::Serial(0), adv(60))]);
    // A stalled process catches up with one ADVERTISE, not a burst.
    t.at(1000.0);
    assert_eq!(t.tx().len(), 2);
    assert_eq!(t.gw.poll_timeout(), Some(t.t0 + Duration::from_secs(1060)));
    assert_eq!(t.gw.stats().metrics.advertisements, 1 + 2 + 3 + 2 + 2);

    // Session timers and the advertisement timer share poll_timeout.
    t.connected(&udp(1), &encode(&connect("c", false, 10)));
    assert_eq!(t.gw.poll_timeout(), Some(t.now + Duration::from_secs(15)));
}

#[test]
fn no_advertise_when_turned_off_or_without_broadcast_links() {
    let mut t = T::with(EngineConfig {
        advertise_interval: None,
        udp_broadcast: Some(BCAST),
        ..EngineConfig::default()
    });
    t.gw.start(t.now);
    t.gw.link_up(t.now, &LinkAddr::Serial(0));
    assert!(t.tx().is_empty());
    assert_eq!(t.gw.poll_timeout(), None);

    // Advertising on, but no UDP broadcast address and no serial port: nothing to send.
    let mut t = T::with(EngineConfig::default());
    t.gw.start(t.now);
    assert!(t.tx().is_empty());
    assert!(t.gw.poll_timeout().is_some());
}

#[test]
fn searchgw_is_answered_by_gwinfo_broadcast_as_far_as_the_link_allows() {
    let mut t = T::with(EngineConfig {
        gateway_id: 9,
        udp_broadcast: Some(BCAST),
        ..EngineConfig::default()
    });
    let info = encode(&Packet::GwInfo(GwInfo { gw_id: 9, gw_addr: &[] }));

    // UDP: to the asker, and to the broadcast address for everyone else.
    t.feed(&udp(1), &encode(&Packet::SearchGw { radius: 1 }));
    assert_eq!(
        t.tx(),
        vec![(udp(1), info.clone()), (LinkAddr::Udp(0, BCAST), info.clone())]
    );

    // Serial: once, on the same port, where every device hears it.
    t.feed(&LinkAddr::Serial(2), &encode(&Packet::SearchGw { radius: 1 }));
    assert_eq!(t.tx(), vec![(LinkAddr::Serial(2), info.clone())]);

    // Through a forwarder: encapsulated, with the search's radius in the Ctrl octet.
    let search = Packet::SearchGw { radius: 2 };
    t.feed(&LinkAddr::Serial(0), &encapsulated(0, b"\x42", &search));
    let got = t.tx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, LinkAddr::Serial(0));
    let Packet::Encapsulated(e) = Packet::decode(&got[0].1).unwrap() else {
        panic!("expected an encapsulated answer")
    };
    assert_eq!((e.radius, e.node_id, e.inner), (2, &b"\x42"[..], &info[..]));
    // A radius the Ctrl octet cannot carry is capped.
    t.feed(
        &LinkAddr::Serial(0),
        &encapsulated(0, b"\x42", &Packet::SearchGw { radius: 9 }),
    );
    let got = t.tx();
    let Packet::Encapsulated(e) = Packet::decode(&got[0].1).unwrap() else {
        panic!("expected an encapsulated answer")
    };
    assert_eq!(e.radius, 3);
    assert_eq!(t.gw.stats().metrics.searchgw, 4);
}

#[test]
fn link_down_of_an_unused_link_changes_nothing_else() {
    let mut t = T::with(EngineConfig::default());
    t.connected(&udp(1), &encode(&connect("c", false, 0)));
    t.gw.link_down(t.now, &LinkAddr::Serial(1));
    assert!(t.cmds().is_empty());
    assert_eq!(t.gw.session_state("c"), Some(SessionState::Active));
    // Whatever comes on that port later is served normally.
    t.connected(&LinkAddr::Serial(1), &encode(&connect("back", false, 0)));
    assert_eq!(t.gw.session_state("back"), Some(SessionState::Active));
}
