//! Access control in the engine ([`crate::auth`]): registry admission, topic ACLs, `$`
//! topics, address changes, mountpoint and registry reloads, with a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::{cfg, dev, msg, publish, T};
use super::*;
use crate::auth::{AddressChange, AuthConfig, Registry};
use crate::broker::DeliveryId;
use sn_codec::{Connect, PubAck, RegAck, Register, ReturnCode, SubAck, Subscribe, TopicFilter, TopicRef};

const DEVICES: &str = r#"
[[device]]
client_id = "dev-*"
addresses = ["127.0.0.1"]
publish = ["up/%c/#"]
subscribe = ["down/%c/#"]
username = "u-%c"
password = "pw"

[[device]]
client_id = "beacon"
addresses = ["127.0.0.9"]
publish = ["beacons/%c"]
"#;

fn registry(text: &str) -> Arc<Registry> {
    Arc::new(Registry::parse(text, "devices.toml", std::path::Path::new("/"), |_| None).unwrap())
}

fn with_auth(auth: AuthConfig) -> T {
    T::with(EngineConfig { auth, ..cfg() })
}

fn registry_mode(deny: bool) -> T {
    with_auth(AuthConfig {
        registry: Some(registry(DEVICES)),
        address_change: if deny {
            AddressChange::Deny
        } else {
            AddressChange::Allow
        },
        ..AuthConfig::default()
    })
}

fn at(ip: [u8; 4], port: u16) -> LinkAddr {
    LinkAddr::Udp(0, SocketAddr::from((ip, port)))
}

fn connect_packet(id: &str) -> Packet<'_> {
    Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 0,
        client_id: id,
    })
}

fn refused() -> Packet<'static> {
    Packet::ConnAck(ReturnCode::NotSupported)
}

fn register<'a>(name: &'a str, msg_id: u16) -> Packet<'a> {
    Packet::Register(Register {
        topic_id: 0,
        msg_id,
        topic_name: name,
    })
}

fn subscribe(name: &str, msg_id: u16) -> Packet<'_> {
    Packet::Subscribe(Subscribe {
        dup: false,
        qos: QoS::AtLeastOnce,
        msg_id,
        topic: TopicFilter::Name(name),
    })
}

#[test]
fn unknown_ids_and_wrong_addresses_get_connack_0x03_and_nothing_else() {
    let mut t = registry_mode(true);
    let d = dev(1);
    t.send(&d, connect_packet("stranger"));
    t.expect(&d, &[refused()]);
    let elsewhere = at([127, 0, 0, 3], 1);
    t.send(&elsewhere, connect_packet("dev-1"));
    t.expect(&elsewhere, &[refused()]);
    assert!(t.cmds().is_empty(), "a refused device gets no broker connection");
    let m = t.gw.stats().metrics;
    assert_eq!(
        (m.auth_unknown_client, m.auth_address_refused, m.connects_refused),
        (1, 1, 2)
    );
}

#[test]
fn per_device_credentials_go_with_the_broker_connect() {
    let mut t = registry_mode(true);
    let d = dev(1);
    t.send(&d, connect_packet("dev-1"));
    match t.cmds().as_slice() {
        [(_, Command::Connect(p))] => {
            let c = p.credentials.as_ref().expect("credentials");
            assert_eq!((c.username.as_str(), c.password.as_str()), ("u-dev-1", "pw"));
            assert!(!format!("{p:?}").contains("pw\""), "the password in a debug print");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn publish_and_subscribe_acls_with_client_id_substitution() {
    let mut t = registry_mode(true);
    let d = dev(1);
    let key = t.connect(&d, "dev-1", true, 0);
    // REGISTER outside the patterns: REGACK 0x03; inside: accepted.
    t.send(&d, register("up/dev-2/x", 1));
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 0,
            msg_id: 1,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&d, register("up/dev-1/x", 2));
    let got = t.tx();
    let Packet::RegAck(RegAck {
        topic_id,
        code: ReturnCode::Accepted,
        ..
    }) = Packet::decode(&got[0].1).unwrap()
    else {
        panic!("{got:?}")
    };
    t.send(
        &d,
        publish(QoS::AtLeastOnce, TopicRef::Normal(topic_id), 3, b"ok", false),
    );
    assert!(
        matches!(t.cmds().as_slice(), [(k, Command::Publish { topic, .. })] if *k == key && &**topic == "up/dev-1/x")
    );
    // A predefined topic outside the patterns: PUBACK 0x03 (QoS 1), a counted drop (QoS 0).
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Predefined(77), 4, b"no", false));
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 77,
            msg_id: 4,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"no", false));
    t.expect_nothing();
    // SUBSCRIBE: within its own tree only.
    t.send(&d, subscribe("down/dev-2/#", 5));
    t.expect(
        &d,
        &[Packet::SubAck(SubAck {
            qos: QoS::AtMostOnce,
            topic_id: 0,
            msg_id: 5,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&d, subscribe("#", 6));
    t.expect(
        &d,
        &[Packet::SubAck(SubAck {
            qos: QoS::AtMostOnce,
            topic_id: 0,
            msg_id: 6,
            code: ReturnCode::NotSupported,
        })],
    );
    assert!(t.cmds().is_empty(), "nothing denied reaches the broker");
    t.send(&d, subscribe("down/dev-1/+", 7));
    assert!(matches!(t.cmds().as_slice(), [(_, Command::Subscribe { filter, .. })] if filter == "down/dev-1/+"));
    let m = t.gw.stats().metrics;
    assert_eq!((m.auth_publish_denied, m.auth_subscribe_denied), (3, 2));
}

#[test]
fn dollar_topics_are_refused_in_open_mode_too() {
    let mut t = T::with(cfg());
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    t.send(&d, register("$SYS/broker/x", 1));
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 0,
            msg_id: 1,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Short(*b"$x"), 2, b"x", false));
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: u16::from_be_bytes(*b"$x"),
            msg_id: 2,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&dev(5), publish(QoS::MinusOne, TopicRef::Short(*b"$x"), 0, b"x", false));
    assert!(
        t.cmds().iter().all(|(_, c)| !matches!(c, Command::Publish { .. })),
        "nothing to $ reaches the broker"
    );
    assert_eq!(t.gw.stats().metrics.auth_dollar_refused, 3);
}

#[test]
fn qos_minus_one_senders_are_matched_by_address() {
    let mut t = registry_mode(true);
    let beacon = at([127, 0, 0, 9], 1);
    t.gw.set_predefined(Arc::new(
        Predefined::new([(1, "beacons/beacon".to_string()), (2, "beacons/other".to_string())]).unwrap(),
    ));
    t.send(
        &beacon,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"ok", false),
    );
    t.send(
        &beacon,
        publish(QoS::MinusOne, TopicRef::Predefined(2), 0, b"no", false),
    );
    t.send(
        &at([127, 0, 0, 8], 1),
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"no", false),
    );
    let topics: Vec<String> = t
        .cmds()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Command::Publish { topic, .. } => Some(topic.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(topics, ["beacons/beacon"]);
    let m = t.gw.stats().metrics;
    assert_eq!(
        (m.qos_minus_one_dropped, m.auth_publish_denied, m.auth_address_refused),
        (2, 1, 1)
    );
}

/// An attacker at another address who knows a sleeping victim's client id.
#[test]
fn takeover_and_wake_from_another_address_are_refused_under_deny() {
    let mut t = with_auth(AuthConfig {
        address_change: AddressChange::Deny,
        ..AuthConfig::default()
    });
    let victim = dev(1);
    let attacker = dev(2);
    let key = t.connect(&victim, "victim", true, 0);
    t.send(&victim, Packet::Disconnect(Some(60)));
    t.expect(&victim, &[Packet::Disconnect(None)]);
    t.event(key, msg("sensors/temp", "held", MqttQos::AtLeastOnce, 7));
    t.send(&attacker, Packet::PingReq(Some("victim")));
    t.expect(&attacker, &[Packet::Disconnect(None)]);
    t.send(&attacker, connect_packet("victim"));
    t.expect(&attacker, &[refused()]);
    assert!(t.cmds().is_empty(), "the victim's broker connection is untouched");
    assert_eq!(t.gw.session_state("victim"), Some(SessionState::Asleep));
    assert_eq!(t.gw.stats().held_messages, 1);
    let m = t.gw.stats().metrics;
    assert_eq!((m.auth_wake_refused, m.auth_takeover_refused, m.takeovers), (1, 1, 0));
    // The victim's own wake still gets its message.
    t.send(&victim, Packet::PingReq(Some("victim")));
    let got = t.tx();
    assert!(matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.data == b"held"));
}

#[test]
fn takeover_and_wake_from_another_address_are_accepted_under_allow() {
    let mut t = with_auth(AuthConfig::default());
    let (victim, other) = (dev(1), dev(2));
    let key = t.connect(&victim, "v", true, 0);
    t.send(&victim, Packet::Disconnect(Some(60)));
    t.tx();
    t.event(key, msg("sensors/temp", "held", MqttQos::AtMostOnce, 0));
    t.send(&other, Packet::PingReq(Some("v")));
    let got = t.tx();
    assert!(got.iter().all(|(to, _)| *to == other) && !got.is_empty());
    assert_eq!(t.gw.stats().metrics.auth_wake_refused, 0);
}

#[test]
fn allow_still_keeps_a_device_within_its_addresses() {
    let mut t = with_auth(AuthConfig {
        registry: Some(registry("[[device]]\nclient_id = \"d\"\naddresses = [\"127.0.0.1\"]\n")),
        address_change: AddressChange::Allow,
        ..AuthConfig::default()
    });
    let home = dev(1);
    t.connect(&home, "d", true, 0);
    t.send(&home, Packet::Disconnect(Some(60)));
    t.tx();
    let outside = at([127, 0, 0, 2], 1);
    t.send(&outside, Packet::PingReq(Some("d")));
    t.expect(&outside, &[Packet::Disconnect(None)]);
    // Another port of the same address is within its addresses (NAT rebinding).
    let moved = dev(3);
    t.send(&moved, Packet::PingReq(Some("d")));
    t.expect(&moved, &[Packet::PingResp]);
}

#[test]
fn mountpoint_both_ways() {
    let mut t = with_auth(AuthConfig {
        mountpoint: Some("site/%c/".into()),
        ..AuthConfig::default()
    });
    let d = dev(1);
    let key = t.connect(&d, "m1", true, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"x", false));
    assert!(matches!(t.cmds().as_slice(), [(_, Command::Publish { topic, .. })] if &**topic == "site/m1/sensors/temp"));
    t.send(&d, subscribe("cmd/#", 2));
    assert!(matches!(t.cmds().as_slice(), [(_, Command::Subscribe { filter, .. })] if filter == "site/m1/cmd/#"));
    // Delivered with the prefix stripped: by predefined id, since the device's name is
    // the predefined one.
    t.event(key, msg("site/m1/sensors/temp", "in", MqttQos::AtMostOnce, 0));
    let got = t.tx();
    assert!(matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.topic == TopicRef::Predefined(77)));
    // Outside the mountpoint: not delivered, released at the broker.
    t.event(key, msg("site/m2/sensors/temp", "no", MqttQos::AtLeastOnce, 9));
    t.expect_nothing();
    assert!(matches!(
        t.cmds().as_slice(),
        [(
            _,
            Command::Ack {
                delivery: DeliveryId(9)
            }
        )]
    ));
    assert_eq!(t.gw.stats().metrics.mountpoint_dropped, 1);
    // A client id that would escape its mountpoint is refused.
    t.send(&dev(2), connect_packet("x/+"));
    t.expect(&dev(2), &[refused()]);
}

#[test]
fn a_reload_applies_new_acls_to_running_sessions() {
    let mut t = registry_mode(true);
    let d = dev(1);
    t.connect(&d, "dev-1", true, 0);
    t.gw.set_registry(registry("[[device]]\nclient_id = \"dev-1\"\npublish = [\"other/#\"]\n"));
    t.send(&d, register("up/dev-1/x", 1));
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 0,
            msg_id: 1,
            code: ReturnCode::NotSupported,
        })],
    );
    assert_eq!(
        t.gw.session_state("dev-1"),
        Some(SessionState::Active),
        "the session is not dropped"
    );
    // Gone from the registry: the session keeps running, allowed nothing; a new CONNECT is refused.
    t.gw.set_registry(registry(""));
    t.send(&d, register("other/x", 2));
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 0,
            msg_id: 2,
            code: ReturnCode::NotSupported,
        })],
    );
    t.send(&dev(4), connect_packet("dev-9"));
    t.expect(&dev(4), &[refused()]);
    // New devices are admitted once added.
    t.gw.set_registry(registry("[[device]]\nclient_id = \"dev-9\"\n"));
    t.connect(&dev(4), "dev-9", true, 0);
}

#[test]
fn per_device_predefined_topics_sit_on_top_of_the_global_ones() {
    let mut t = with_auth(AuthConfig {
        registry: Some(registry(
            "[[device]]\nclient_id = \"own\"\npublish = [\"#\"]\nsubscribe = [\"#\"]\npredefined = { 5 = \"mine/p\", 77 = \"mine/override\" }\n\
             [[device]]\nclient_id = \"plain\"\npublish = [\"#\"]\n",
        )),
        ..AuthConfig::default()
    });
    let (d1, d2) = (dev(1), dev(2));
    let own = t.connect(&d1, "own", true, 0);
    let plain = t.connect(&d2, "plain", true, 0);
    t.send(&d1, publish(QoS::AtMostOnce, TopicRef::Predefined(5), 0, b"a", false));
    t.send(&d1, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"b", false));
    t.send(&d2, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"c", false));
    let topics: Vec<(ClientKey, String)> = t
        .cmds()
        .into_iter()
        .filter_map(|(k, c)| match c {
            Command::Publish { topic, .. } => Some((k, topic.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        topics,
        [
            (own, "mine/p".to_string()),
            (own, "mine/override".into()),
            (plain, "sensors/temp".into())
        ]
    );
    // Another device does not have id 5.
    t.send(&d2, publish(QoS::AtLeastOnce, TopicRef::Predefined(5), 3, b"d", false));
    t.expect(
        &d2,
        &[Packet::PubAck(PubAck {
            topic_id: 5,
            msg_id: 3,
            code: ReturnCode::InvalidTopicId,
        })],
    );
    // Delivery to the device uses its own id for the name.
    t.event(own, msg("mine/p", "in", MqttQos::AtMostOnce, 0));
    let got = t.tx();
    assert!(matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.topic == TopicRef::Predefined(5)));
    // A reload of the global table keeps the device's own ids on top.
    t.gw.set_predefined(Arc::new(Predefined::new([(6, "global/six".to_string())]).unwrap()));
    t.send(&d1, publish(QoS::AtMostOnce, TopicRef::Predefined(5), 0, b"e", false));
    t.send(&d1, publish(QoS::AtMostOnce, TopicRef::Predefined(6), 0, b"f", false));
    let topics: Vec<String> = t
        .cmds()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Command::Publish { topic, .. } => Some(topic.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(topics, ["mine/p", "global/six"]);
}
