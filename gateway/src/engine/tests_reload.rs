//! Predefined topics replaced while sessions run ([`Gateway::set_predefined`], a SIGHUP
//! reload), with a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::{cfg, dev, msg, publish, T};
use super::*;
use sn_codec::{PubAck, RegAck, Register, ReturnCode, SubAck, Subscribe, TopicFilter, TopicRef};

fn table(entries: &[(u16, &str)]) -> Arc<Predefined> {
    Arc::new(Predefined::new(entries.iter().map(|(id, name)| (*id, (*name).to_string()))).unwrap())
}

/// The topic of the one broker publish queued for `key`.
fn published_topic(t: &mut T, key: ClientKey) -> String {
    match t.cmds().as_slice() {
        [(k, Command::Publish { topic, .. })] if *k == key => topic.to_string(),
        other => panic!("expected one publish for {key}, got {other:?}"),
    }
}

fn invalid_topic_id(topic_id: u16, msg_id: u16) -> Packet<'static> {
    Packet::PubAck(PubAck {
        topic_id,
        msg_id,
        code: ReturnCode::InvalidTopicId,
    })
}

#[test]
fn publishes_by_predefined_id_use_the_new_table() {
    let mut t = T::with(cfg());
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"1", false));
    assert_eq!(published_topic(&mut t, key), "sensors/temp");

    // 77 removed, 78 added, 79 renamed.
    t.gw.set_predefined(table(&[(78, "sensors/hum"), (79, "sensors/renamed")]));
    assert_eq!(t.gw.config().predefined.len(), 2);

    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Predefined(77), 5, b"2", false));
    t.expect(&d, &[invalid_topic_id(77, 5)]);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(77), 0, b"3", false));
    t.expect(&d, &[invalid_topic_id(77, 0)]);
    assert!(t.cmds().is_empty(), "nothing for a removed id reaches the broker");
    assert_eq!(t.gw.stats().metrics.invalid_topic, 2);

    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(78), 0, b"4", false));
    assert_eq!(published_topic(&mut t, key), "sensors/hum");
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Predefined(79), 0, b"5", false));
    assert_eq!(published_topic(&mut t, key), "sensors/renamed");
    t.expect_nothing();
}

#[test]
fn qos_minus_one_uses_the_new_table() {
    let mut t = T::with(cfg());
    let stranger = dev(9);
    t.gw.set_predefined(table(&[(78, "sensors/hum")]));
    t.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(77), 0, b"old", false),
    );
    t.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(78), 0, b"new", false),
    );
    let topics: Vec<String> = t
        .cmds()
        .into_iter()
        .filter_map(|(k, c)| match c {
            Command::Publish { topic, .. } if k == QOS_MINUS_ONE_KEY => Some(topic.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(topics, ["sensors/hum"]);
    assert_eq!(t.gw.stats().metrics.qos_minus_one_dropped, 1);
    t.expect_nothing();
}

#[test]
fn subscriptions_keep_their_topic_and_new_ones_use_the_new_table() {
    let mut t = T::with(cfg());
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    assert_eq!(
        t.subscribe(&d, key, TopicFilter::Predefined(77), QoS::AtMostOnce, 1),
        77
    );
    t.gw.set_predefined(table(&[(77, "sensors/new"), (80, "sensors/added")]));

    // The broker still delivers on the old name, which is no longer predefined: the
    // gateway registers a normal id for it first.
    t.event(key, msg("sensors/temp", "old", MqttQos::AtMostOnce, 0));
    let got = t.tx();
    let Packet::Register(Register {
        topic_id,
        msg_id,
        topic_name,
    }) = Packet::decode(&got[0].1).unwrap()
    else {
        panic!("expected REGISTER, got {got:?}")
    };
    assert_eq!(topic_name, "sensors/temp");
    t.send(
        &d,
        Packet::RegAck(RegAck {
            topic_id,
            msg_id,
            code: ReturnCode::Accepted,
        }),
    );
    let got = t.tx();
    assert!(
        matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.topic == TopicRef::Normal(topic_id) && p.data == b"old"),
        "{got:?}"
    );

    // A new SUBSCRIBE by id 77 subscribes the new name; its messages carry id 77.
    t.send(
        &d,
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 2,
            topic: TopicFilter::Predefined(77),
        }),
    );
    match t.cmds().as_slice() {
        [(k, Command::Subscribe { filter, .. })] if *k == key => assert_eq!(filter, "sensors/new"),
        other => panic!("expected a subscribe, got {other:?}"),
    }
    t.event(key, msg("sensors/new", "new", MqttQos::AtMostOnce, 0));
    let got = t.tx();
    assert!(
        matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.topic == TopicRef::Predefined(77)),
        "{got:?}"
    );
    // An id added by the reload can be subscribed to at once.
    assert_eq!(
        t.subscribe(&d, key, TopicFilter::Predefined(80), QoS::AtMostOnce, 3),
        80
    );
}

#[test]
fn subscribe_to_a_removed_id_is_refused() {
    let mut t = T::with(cfg());
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.gw.set_predefined(table(&[]));
    t.send(
        &d,
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: TopicFilter::Predefined(77),
        }),
    );
    assert!(t.cmds().is_empty(), "nothing asked of the broker for {key}");
    t.expect(
        &d,
        &[Packet::SubAck(SubAck {
            qos: QoS::AtMostOnce,
            topic_id: 0,
            msg_id: 1,
            code: ReturnCode::InvalidTopicId,
        })],
    );
}

#[test]
fn a_delivery_in_flight_keeps_its_predefined_id_on_retransmission() {
    let mut t = T::with(cfg());
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.event(key, msg("sensors/temp", "1", MqttQos::AtLeastOnce, 7));
    let got = t.tx();
    let Packet::Publish(first) = Packet::decode(&got[0].1).unwrap() else {
        panic!("expected PUBLISH, got {got:?}")
    };
    assert_eq!(first.topic, TopicRef::Predefined(77));
    let msg_id = first.msg_id;
    t.gw.set_predefined(table(&[]));
    t.at(cfg().retry_interval.as_secs_f64());
    let got = t.tx();
    let Packet::Publish(again) = Packet::decode(&got[0].1).unwrap() else {
        panic!("expected a retransmitted PUBLISH, got {got:?}")
    };
    assert_eq!(
        (again.topic, again.msg_id, again.dup),
        (TopicRef::Predefined(77), msg_id, true)
    );
    // The next message on that name, no longer predefined, is registered first.
    t.event(key, msg("sensors/temp", "2", MqttQos::AtMostOnce, 0));
    t.send(
        &d,
        Packet::PubAck(PubAck {
            topic_id: 77,
            msg_id,
            code: ReturnCode::Accepted,
        }),
    );
    let got = t.tx();
    assert!(
        matches!(Packet::decode(&got[0].1).unwrap(), Packet::Register(r) if r.topic_name == "sensors/temp"),
        "{got:?}"
    );
}
