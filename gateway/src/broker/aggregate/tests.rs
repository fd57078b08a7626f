//! The aggregator against a scripted broker: what goes to the broker, what to each session.

use super::*;
use crate::broker::Will;

use MqttQos::{AtLeastOnce as Q1, AtMostOnce as Q0, ExactlyOnce as Q2};

fn params(id: &str, clean: bool) -> ConnectParams {
    ConnectParams {
        client_id: id.into(),
        clean_session: clean,
        keep_alive: 30,
        will: None,
        credentials: None,
        client_identity: None,
    }
}

/// An aggregator whose connection is up, and the outputs so far drained.
fn up() -> Aggregator {
    let mut a = Aggregator::new(10, 4);
    a.connecting();
    a.connected();
    assert!(drain(&mut a).is_empty());
    a
}

fn drain(a: &mut Aggregator) -> Vec<Output> {
    std::iter::from_fn(|| a.poll_output()).collect()
}

fn connect(a: &mut Aggregator, key: ClientKey, id: &str, clean: bool) -> Vec<Output> {
    a.command(key, Command::Connect(params(id, clean)));
    drain(a)
}

/// Subscribes `key` to `filter` and answers as the broker (granting what was asked);
/// returns the QoS asked at the broker and the session's SUBACK.
fn subscribe(a: &mut Aggregator, key: ClientKey, token: Token, filter: &str, qos: MqttQos) -> (MqttQos, BrokerEvent) {
    a.command(
        key,
        Command::Subscribe {
            token,
            filter: filter.into(),
            qos,
        },
    );
    let (tag, asked) = match drain(a).as_slice() {
        [Output::Broker(Request::Subscribe { tag, qos, filter: f })] if &**f == filter => (*tag, *qos),
        other => panic!("expected one SUBSCRIBE, got {other:?}"),
    };
    a.subscribed(&[(tag, Some(asked))]);
    match drain(a).as_slice() {
        [Output::Session(k, e)] if *k == key => (asked, e.clone()),
        other => panic!("expected the SUBACK, got {other:?}"),
    }
}

/// A delivery as a test looks at it: session, QoS, RETAIN, delivery id.
type Delivered = (ClientKey, MqttQos, bool, DeliveryId);

/// The messages each session got, and the broker acknowledgements, from `outs`.
fn messages(outs: &[Output]) -> (Vec<Delivered>, Vec<(u16, MqttQos)>) {
    let mut m = Vec::new();
    let mut acks = Vec::new();
    for o in outs {
        match o {
            Output::Session(k, BrokerEvent::Message(msg)) => m.push((*k, msg.qos, msg.retain, msg.delivery)),
            Output::Broker(Request::Ack { pkid, qos }) => acks.push((*pkid, *qos)),
            _ => {}
        }
    }
    m.sort();
    (m, acks)
}

fn message(a: &mut Aggregator, topic: &str, qos: MqttQos, retain: bool, pkid: u16) -> Vec<Output> {
    a.message(topic.into(), Bytes::from_static(b"x"), qos, retain, pkid);
    drain(a)
}

#[test]
fn overlapping_filters_deliver_once_each_at_the_right_qos_and_ack_after_the_last_device() {
    let mut a = up();
    connect(&mut a, 1, "one", true);
    connect(&mut a, 2, "two", true);
    assert_eq!(subscribe(&mut a, 1, 10, "s/#", Q2).0, Q2);
    // One device with two overlapping filters: still one copy, at its higher QoS.
    subscribe(&mut a, 2, 20, "s/+", Q0);
    let (asked, ack) = subscribe(&mut a, 2, 21, "s/t", Q1);
    assert_eq!(asked, Q1);
    assert_eq!(
        ack,
        BrokerEvent::SubAck {
            token: 21,
            granted: Some(Q1)
        }
    );
    let outs = message(&mut a, "s/t", Q2, false, 7);
    let (m, acks) = messages(&outs);
    assert_eq!(m.len(), 2, "each device once: {m:?}");
    assert_eq!((m[0].0, m[0].1), (1, Q2));
    assert_eq!((m[1].0, m[1].1), (2, Q1));
    assert!(acks.is_empty(), "not acknowledged before the devices have it");
    a.command(1, Command::Ack { delivery: m[0].3 });
    assert!(drain(&mut a).is_empty());
    a.command(2, Command::Ack { delivery: m[1].3 });
    assert_eq!(
        drain(&mut a),
        [Output::Broker(Request::Ack { pkid: 7, qos: Q2 })],
        "PUBREC once every device has it"
    );
    // A message only QoS 0 subscribers get is acknowledged at once.
    let (m, acks) = messages(&message(&mut a, "s/u", Q1, false, 8));
    assert_eq!(m.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(), [(1, Q1), (2, Q0)]);
    assert!(acks.is_empty());
    a.command(1, Command::Ack { delivery: m[0].3 });
    assert_eq!(drain(&mut a), [Output::Broker(Request::Ack { pkid: 8, qos: Q1 })]);
    let (m, acks) = messages(&message(&mut a, "other", Q1, false, 9));
    assert!(m.is_empty());
    assert_eq!(acks, [(9, Q1)], "a message nobody wants is released at once");
}

#[test]
fn retained_messages_after_a_subscribe_go_to_its_device_alone() {
    let mut a = up();
    connect(&mut a, 1, "one", true);
    connect(&mut a, 2, "two", true);
    subscribe(&mut a, 1, 1, "r/#", Q1);
    let (m, _) = messages(&message(&mut a, "r/x", Q0, true, 0));
    assert_eq!(m.iter().map(|x| (x.0, x.2)).collect::<Vec<_>>(), [(1, true)]);
    // The second device subscribes to the held filter: passed on to the broker, which
    // sends the retained message again, for it alone.
    subscribe(&mut a, 2, 2, "r/#", Q1);
    let (m, acks) = messages(&message(&mut a, "r/x", Q1, true, 5));
    assert_eq!(m.iter().map(|x| (x.0, x.2)).collect::<Vec<_>>(), [(2, true)]);
    assert!(acks.is_empty());
    a.command(2, Command::Ack { delivery: m[0].3 });
    assert_eq!(drain(&mut a), [Output::Broker(Request::Ack { pkid: 5, qos: Q1 })]);
    // A live message (RETAIN clear) goes to both.
    let (m, _) = messages(&message(&mut a, "r/x", Q0, false, 0));
    assert_eq!(
        m.iter().map(|x| (x.0, x.2)).collect::<Vec<_>>(),
        [(1, false), (2, false)]
    );
}

#[test]
fn the_broker_subscription_goes_with_the_last_device() {
    let mut a = up();
    connect(&mut a, 1, "one", true);
    connect(&mut a, 2, "two", true);
    subscribe(&mut a, 1, 1, "f", Q0);
    subscribe(&mut a, 2, 2, "f", Q0);
    a.command(
        1,
        Command::Unsubscribe {
            token: 3,
            filter: "f".into(),
        },
    );
    assert_eq!(drain(&mut a), [Output::Session(1, BrokerEvent::UnsubAck { token: 3 })]);
    let (m, _) = messages(&message(&mut a, "f", Q0, false, 0));
    assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), [2]);
    // The last device goes without unsubscribing (clean session): UNSUBSCRIBE at the broker.
    a.command(2, Command::Disconnect { will: None });
    assert_eq!(
        drain(&mut a),
        [Output::Broker(Request::Unsubscribe { filter: "f".into() })]
    );
    assert_eq!(a.stats().filters, 0);
    assert_eq!(a.stats().devices, 1);
}

#[test]
fn wills_are_published_for_a_lost_device_only() {
    let mut a = up();
    connect(&mut a, 1, "one", true);
    connect(&mut a, 2, "two", true);
    a.command(1, Command::Disconnect { will: None });
    assert!(drain(&mut a).is_empty(), "a clean DISCONNECT publishes nothing");
    let will = Will {
        topic: "w".into(),
        message: Bytes::from_static(b"gone"),
        qos: Q1,
        retain: true,
    };
    a.command(2, Command::Disconnect { will: Some(will) });
    match drain(&mut a).as_slice() {
        [Output::Broker(Request::Publish {
            tag: Some(tag),
            topic,
            qos: Q1,
            retain: true,
            ..
        })] if &**topic == "w" => {
            a.published(*tag);
            assert!(drain(&mut a).is_empty(), "the will's PUBACK concerns no session");
        }
        other => panic!("expected the will, got {other:?}"),
    }
}

#[test]
fn a_device_away_with_clean_session_false_keeps_its_subscriptions_and_messages() {
    let mut a = up();
    connect(&mut a, 1, "p", false);
    subscribe(&mut a, 1, 1, "q/#", Q1);
    // Delivered but not acknowledged when it goes: kept for it, and off the broker's hands.
    let (m, _) = messages(&message(&mut a, "q/1", Q1, false, 1));
    assert_eq!(m.len(), 1);
    a.command(1, Command::Disconnect { will: None });
    assert_eq!(drain(&mut a), [Output::Broker(Request::Ack { pkid: 1, qos: Q1 })]);
    // While away: QoS 1 kept and released at the broker, QoS 0 not kept.
    let (m, acks) = messages(&message(&mut a, "q/2", Q1, false, 2));
    assert!(m.is_empty());
    assert_eq!(acks, [(2, Q1)]);
    assert!(message(&mut a, "q/3", Q0, false, 0).is_empty());
    assert_eq!(a.stats().queued, 2);
    assert_eq!(a.stats().away, 1);
    // Back: session present, the two messages in order, no new broker SUBSCRIBE.
    let outs = connect(&mut a, 5, "p", false);
    assert_eq!(
        outs[0],
        Output::Session(5, BrokerEvent::Connected { session_present: true })
    );
    let topics: Vec<&str> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Session(5, BrokerEvent::Message(m)) => Some(&*m.topic),
            _ => None,
        })
        .collect();
    assert_eq!(topics, ["q/1", "q/2"]);
    assert_eq!(outs.len(), 3);
    let (m, _) = messages(&message(&mut a, "q/4", Q1, false, 4));
    assert_eq!(
        m.iter().map(|x| x.0).collect::<Vec<_>>(),
        [5],
        "the subscription is kept"
    );
    // With clean session, it all goes.
    a.command(5, Command::Disconnect { will: None });
    drain(&mut a);
    let outs = connect(&mut a, 6, "p", true);
    assert_eq!(
        outs,
        [
            Output::Broker(Request::Unsubscribe { filter: "q/#".into() }),
            Output::Session(6, BrokerEvent::Connected { session_present: false })
        ]
    );
}

#[test]
fn the_offline_queue_is_bounded() {
    let mut a = up();
    connect(&mut a, 1, "p", false);
    subscribe(&mut a, 1, 1, "q", Q1);
    a.command(1, Command::Disconnect { will: None });
    for pkid in 1..=15 {
        message(&mut a, "q", Q1, false, pkid);
    }
    let s = a.stats();
    assert_eq!((s.queued, s.queue_dropped), (10, 5));
}

#[test]
fn a_lost_connection_closes_its_sessions_and_the_next_one_resubscribes_away_devices() {
    let mut a = up();
    connect(&mut a, 1, "clean", true);
    connect(&mut a, 2, "kept", false);
    subscribe(&mut a, 1, 1, "c", Q0);
    subscribe(&mut a, 2, 2, "k", Q1);
    a.lost("broker went away", false);
    let mut closed: Vec<ClientKey> = drain(&mut a)
        .into_iter()
        .filter_map(|o| match o {
            Output::Session(k, BrokerEvent::Closed { .. }) => Some(k),
            _ => None,
        })
        .collect();
    closed.sort();
    assert_eq!(closed, [1, 2]);
    // Down: a CONNECT is answered at once.
    assert!(matches!(
        connect(&mut a, 3, "x", true).as_slice(),
        [Output::Session(3, BrokerEvent::ConnectFailed { refused: false, .. })]
    ));
    // The next attempt: CONNECTs wait for it, and only "k" is subscribed again.
    a.connecting();
    assert!(connect(&mut a, 4, "y", true).is_empty());
    a.connected();
    let outs = drain(&mut a);
    assert!(matches!(&outs[0], Output::Broker(Request::Subscribe { filter, qos: Q1, .. }) if &**filter == "k"));
    assert_eq!(
        outs[1],
        Output::Session(4, BrokerEvent::Connected { session_present: false })
    );
    assert_eq!(outs.len(), 2);
}

#[test]
fn a_takeover_moves_unacknowledged_messages_to_the_new_session() {
    let mut a = up();
    connect(&mut a, 1, "d", false);
    subscribe(&mut a, 1, 1, "t", Q1);
    let (m, _) = messages(&message(&mut a, "t", Q1, false, 3));
    assert_eq!(m[0].0, 1);
    let outs = connect(&mut a, 2, "d", false);
    let (m, acks) = messages(&outs);
    assert_eq!(
        m.iter().map(|x| x.0).collect::<Vec<_>>(),
        [2],
        "redelivered to the new session"
    );
    assert_eq!(acks, [(3, Q1)], "the gateway holds it now");
    // The old session's late DISCONNECT (with a will) publishes the will, and leaves the
    // device to the new session.
    let will = Will {
        topic: "w".into(),
        message: Bytes::new(),
        qos: Q0,
        retain: false,
    };
    a.command(1, Command::Disconnect { will: Some(will) });
    assert!(matches!(
        drain(&mut a).as_slice(),
        [Output::Broker(Request::Publish { tag: None, .. })]
    ));
    let (m, _) = messages(&message(&mut a, "t", Q1, false, 4));
    assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), [2]);
}

#[test]
fn publishes_are_answered_to_their_session_and_a_device_login_is_refused() {
    let mut a = up();
    connect(&mut a, 1, "d", true);
    a.command(
        1,
        Command::Publish {
            token: 9,
            topic: "t".into(),
            payload: Bytes::new(),
            qos: Q1,
            retain: false,
        },
    );
    let Some(Output::Broker(Request::Publish { tag: Some(tag), .. })) = a.poll_output() else {
        panic!("expected a tagged publish");
    };
    a.published(tag);
    assert_eq!(drain(&mut a), [Output::Session(1, BrokerEvent::Published { token: 9 })]);
    let mut p = params("x", true);
    p.credentials = Some(crate::broker::Credentials {
        username: "u".into(),
        password: "p".into(),
    });
    a.command(2, Command::Connect(p));
    assert!(matches!(
        drain(&mut a).as_slice(),
        [Output::Session(2, BrokerEvent::ConnectFailed { refused: true, .. })]
    ));
}

#[test]
fn a_refused_subscribe_leaves_nothing_held() {
    let mut a = up();
    connect(&mut a, 1, "d", true);
    a.command(
        1,
        Command::Subscribe {
            token: 1,
            filter: "no".into(),
            qos: Q1,
        },
    );
    let Some(Output::Broker(Request::Subscribe { tag, .. })) = a.poll_output() else {
        panic!("expected a SUBSCRIBE");
    };
    a.subscribed(&[(tag, None)]);
    assert_eq!(
        drain(&mut a),
        [Output::Session(
            1,
            BrokerEvent::SubAck {
                token: 1,
                granted: None
            }
        )]
    );
    assert_eq!(a.stats().filters, 0);
    assert!(message(&mut a, "no", Q0, false, 0).is_empty());
}

#[test]
fn beyond_the_owed_limit_the_oldest_message_is_taken_off_the_brokers_hands() {
    let mut a = up();
    connect(&mut a, 1, "sleepy", true);
    subscribe(&mut a, 1, 1, "s", Q1);
    let mut deliveries = Vec::new();
    for pkid in 1..=4 {
        let (m, acks) = messages(&message(&mut a, "s", Q1, false, pkid));
        assert!(acks.is_empty());
        deliveries.push(m[0].3);
    }
    // The fifth: the broker would stop sending; the oldest is acknowledged now.
    let (m, acks) = messages(&message(&mut a, "s", Q1, false, 5));
    assert_eq!(m.len(), 1, "still delivered");
    assert_eq!(acks, [(1, Q1)]);
    assert_eq!(a.stats().taken_over, 1);
    // The device's late acknowledgement of it releases nothing more; the others do.
    a.command(
        1,
        Command::Ack {
            delivery: deliveries[0],
        },
    );
    assert!(drain(&mut a).is_empty());
    a.command(
        1,
        Command::Ack {
            delivery: deliveries[1],
        },
    );
    assert_eq!(drain(&mut a), [Output::Broker(Request::Ack { pkid: 2, qos: Q1 })]);
}

#[test]
fn an_expired_away_session_releases_what_only_it_held() {
    let mut a = up();
    connect(&mut a, 1, "gone", false);
    connect(&mut a, 2, "here", false);
    subscribe(&mut a, 1, 1, "only/gone", Q1);
    subscribe(&mut a, 1, 2, "shared", Q1);
    subscribe(&mut a, 2, 3, "shared", Q1);
    a.command(1, Command::Disconnect { will: None });
    drain(&mut a);
    // A connected device's session does not expire.
    a.command(
        crate::broker::GATEWAY_KEY,
        Command::Expire {
            client_id: "here".into(),
        },
    );
    assert!(drain(&mut a).is_empty());
    a.command(
        crate::broker::GATEWAY_KEY,
        Command::Expire {
            client_id: "gone".into(),
        },
    );
    assert_eq!(
        drain(&mut a),
        [Output::Broker(Request::Unsubscribe {
            filter: "only/gone".into()
        })]
    );
    let s = a.stats();
    assert_eq!((s.away, s.filters), (0, 1));
}

#[test]
fn acknowledgements_reach_the_broker_in_the_order_the_messages_came() {
    let mut a = up();
    connect(&mut a, 1, "d", true);
    subscribe(&mut a, 1, 1, "o", Q1);
    let (m1, _) = messages(&message(&mut a, "o", Q1, false, 1));
    let (m2, _) = messages(&message(&mut a, "o", Q1, false, 2));
    a.command(1, Command::Ack { delivery: m2[0].3 });
    assert!(drain(&mut a).is_empty(), "the later one waits for the earlier");
    a.command(1, Command::Ack { delivery: m1[0].3 });
    assert_eq!(
        drain(&mut a),
        [
            Output::Broker(Request::Ack { pkid: 1, qos: Q1 }),
            Output::Broker(Request::Ack { pkid: 2, qos: Q1 })
        ]
    );
}

#[test]
fn the_gateways_own_publishes_wait_for_the_connection_being_opened() {
    let mut a = Aggregator::new(10, 4);
    a.connecting();
    let qos_minus_one = |n: u8| Command::Publish {
        token: 0,
        topic: "p".into(),
        payload: Bytes::from(vec![n]),
        qos: Q0,
        retain: false,
    };
    a.command(crate::broker::GATEWAY_KEY, qos_minus_one(1));
    assert!(drain(&mut a).is_empty());
    a.connected();
    assert!(matches!(
        drain(&mut a).as_slice(),
        [Output::Broker(Request::Publish { tag: None, .. })]
    ));
    // Down and not reconnecting: dropped at once, counted by the engine.
    a.lost("gone", false);
    a.command(crate::broker::GATEWAY_KEY, qos_minus_one(2));
    assert!(matches!(
        drain(&mut a).as_slice(),
        [Output::Session(
            0,
            BrokerEvent::Rejected {
                reason: RejectReason::Closed,
                ..
            }
        )]
    ));
}

/// A durable aggregator whose connection is up.
fn durable_up() -> Aggregator {
    let mut a = Aggregator::new(2, 4).durable();
    a.connecting();
    a.connected();
    assert!(drain(&mut a).is_empty());
    a
}

/// The store writes of device records among `outs` (the connection's own record of
/// its broker filters left out: see the test of a resumed broker session).
fn stores(outs: &[Output]) -> Vec<StoreOp> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Store(StoreOp::BrokerFilter { .. }) => None,
            Output::Store(op) => Some(op.clone()),
            _ => None,
        })
        .collect()
}

fn position(outs: &[Output], f: impl Fn(&Output) -> bool) -> usize {
    outs.iter().position(f).unwrap_or_else(|| panic!("not in {outs:?}"))
}

/// Subscribes `key` as in [`subscribe`], returning every output after the SUBACK.
fn subscribe_durable(a: &mut Aggregator, key: ClientKey, filter: &str, qos: MqttQos) -> Vec<Output> {
    a.command(
        key,
        Command::Subscribe {
            token: 1,
            filter: filter.into(),
            qos,
        },
    );
    let mut first = a.poll_output();
    // A filter new at the broker is stored before its SUBSCRIBE leaves.
    if let Some(Output::Store(StoreOp::BrokerFilter {
        held: true, filter: f, ..
    })) = &first
    {
        assert_eq!(&**f, filter);
        first = a.poll_output();
    }
    let Some(Output::Broker(Request::Subscribe { tag, qos: asked, .. })) = first else {
        panic!("expected a SUBSCRIBE");
    };
    a.subscribed(&[(tag, Some(asked))]);
    drain(a)
}

#[test]
fn a_durable_aggregator_stores_what_a_kept_device_needs_before_the_broker_is_acknowledged() {
    let mut a = durable_up();
    assert!(stores(&connect(&mut a, 1, "keep", false)).is_empty());
    let outs = subscribe_durable(&mut a, 1, "s/#", Q1);
    assert_eq!(
        stores(&outs),
        [StoreOp::Subscribe {
            client_id: "keep".into(),
            filter: "s/#".into(),
            qos: 1
        }]
    );
    // A live QoS 1 message: stored (for the device still to acknowledge it) as it goes.
    let outs = message(&mut a, "s/t", Q1, false, 5);
    let put = stores(&outs);
    assert!(
        matches!(put.as_slice(), [StoreOp::PutHeld { client_id, seq: 1, message }] if &**client_id == "keep" && message.topic == "s/t" && message.qos == 1),
        "{put:?}"
    );
    // Durably queued for it: the broker is acknowledged after the write, without waiting
    // for the device (the shell commits the write before the ack leaves).
    let (m, acks) = messages(&outs);
    assert_eq!(acks.len(), 1, "{outs:?}");
    let put = position(&outs, |o| matches!(o, Output::Store(StoreOp::PutHeld { .. })));
    let ack = position(&outs, |o| matches!(o, Output::Broker(Request::Ack { pkid: 5, .. })));
    assert!(put < ack, "{outs:?}");
    a.command(1, Command::Ack { delivery: m[0].3 });
    let outs = drain(&mut a);
    assert_eq!(
        outs,
        [Output::Store(StoreOp::RemoveHeld {
            client_id: "keep".into(),
            seq: 1
        })],
        "the device's ack only removes the stored copy"
    );
    // Away: what arrives is stored, and the store write comes before the broker's ack
    // (the shell commits everything before what follows it).
    a.command(1, Command::Disconnect { will: None });
    assert!(
        stores(&drain(&mut a)).is_empty(),
        "subscriptions stay stored while away"
    );
    let outs = message(&mut a, "s/u", Q2, false, 6);
    let put = position(&outs, |o| matches!(o, Output::Store(StoreOp::PutHeld { seq: 2, .. })));
    let ack = position(&outs, |o| matches!(o, Output::Broker(Request::Ack { pkid: 6, .. })));
    assert!(put < ack, "{outs:?}");
    // QoS 0 is never stored.
    assert!(stores(&message(&mut a, "s/v", Q0, false, 0)).is_empty());
    // The queue's bound (2) drops the oldest from the store as well.
    message(&mut a, "s/w", Q1, false, 7);
    let outs = message(&mut a, "s/x", Q1, false, 8);
    assert!(
        stores(&outs).contains(&StoreOp::RemoveHeld {
            client_id: "keep".into(),
            seq: 2
        }),
        "{outs:?}"
    );
}

#[test]
fn a_clean_session_device_writes_nothing_and_a_kept_one_is_unwritten_when_it_goes_clean() {
    let mut a = durable_up();
    connect(&mut a, 1, "clean", true);
    assert!(stores(&subscribe_durable(&mut a, 1, "c/#", Q1)).is_empty());
    assert!(stores(&message(&mut a, "c/1", Q1, false, 3)).is_empty());

    connect(&mut a, 2, "keep", false);
    subscribe_durable(&mut a, 2, "k/#", Q1);
    message(&mut a, "k/1", Q1, false, 4);
    a.command(2, Command::Disconnect { will: None });
    drain(&mut a);
    // Back with clean session: only what the aggregator wrote goes (never a Forget,
    // which would take the engine's records of the new session too).
    let outs = connect(&mut a, 3, "keep", true);
    let mut ops = stores(&outs);
    ops.sort_by_key(|op| format!("{op:?}"));
    assert_eq!(
        ops,
        [
            StoreOp::RemoveHeld {
                client_id: "keep".into(),
                seq: 1
            },
            StoreOp::Unsubscribe {
                client_id: "keep".into(),
                filter: "k/#".into()
            },
        ]
    );
}

#[test]
fn a_restored_device_is_subscribed_again_and_gets_its_held_messages_in_order() {
    let mut a = Aggregator::new(10, 4).durable();
    let held = |topic: &str, qos| HeldMessage {
        topic: topic.into(),
        payload: b"p".to_vec(),
        qos,
        retain: false,
    };
    a.restore(
        "keep",
        &[("s/#".to_string(), 2), ("bad".to_string(), 9)],
        vec![(4, held("s/a", 1)), (7, held("s/b", 2))],
    );
    a.connecting();
    a.connected();
    let outs = drain(&mut a);
    assert!(
        matches!(outs.as_slice(), [
            Output::Store(StoreOp::BrokerFilter { held: true, .. }),
            Output::Broker(Request::Subscribe { filter, qos: Q2, .. }),
        ] if &**filter == "s/#"),
        "the stored filter is subscribed again; one of an unknown QoS is not: {outs:?}"
    );
    let outs = connect(&mut a, 1, "keep", false);
    assert_eq!(
        outs[0],
        Output::Session(1, BrokerEvent::Connected { session_present: true })
    );
    let got: Vec<(String, MqttQos)> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Session(1, BrokerEvent::Message(m)) => Some((m.topic.to_string(), m.qos)),
            _ => None,
        })
        .collect();
    assert_eq!(got, [("s/a".to_string(), Q1), ("s/b".to_string(), Q2)]);
    let Some(Output::Session(_, BrokerEvent::Message(first))) = outs.get(1).cloned() else {
        panic!("{outs:?}");
    };
    a.command(
        1,
        Command::Ack {
            delivery: first.delivery,
        },
    );
    assert_eq!(
        drain(&mut a),
        [Output::Store(StoreOp::RemoveHeld {
            client_id: "keep".into(),
            seq: 4
        })],
        "no broker ack: it was acknowledged before the restart"
    );
    // New messages are stored after the restored ones.
    let outs = message(&mut a, "s/c", Q1, false, 9);
    assert!(
        matches!(stores(&outs).as_slice(), [StoreOp::PutHeld { seq: 8, .. }]),
        "{outs:?}"
    );
}

fn with_will(id: &str, clean: bool, qos: MqttQos) -> ConnectParams {
    ConnectParams {
        will: Some(Will {
            topic: format!("will/{id}"),
            message: Bytes::from_static(b"gone"),
            qos,
            retain: false,
        }),
        ..params(id, clean)
    }
}

fn will_op(id: &str, qos: Option<u8>) -> StoreOp {
    StoreOp::Will {
        client_id: id.into(),
        will: qos.map(|qos| HeldMessage {
            topic: format!("will/{id}"),
            payload: b"gone".to_vec(),
            qos,
            retain: false,
        }),
    }
}

#[test]
fn a_durable_aggregator_stores_each_sessions_will_and_drops_it_once_published_or_not_needed() {
    let mut a = durable_up();
    // Any device's will is stored, whatever its clean-session flag.
    a.command(1, Command::Connect(with_will("calm", true, Q1)));
    assert_eq!(stores(&drain(&mut a)), [will_op("calm", Some(1))]);
    a.command(1, Command::Disconnect { will: None });
    assert_eq!(
        drain(&mut a),
        [Output::Store(will_op("calm", None))],
        "a clean DISCONNECT"
    );

    a.command(2, Command::Connect(with_will("lost", false, Q1)));
    drain(&mut a);
    a.command(
        2,
        Command::Disconnect {
            will: with_will("lost", false, Q1).will,
        },
    );
    let outs = drain(&mut a);
    let [Output::Broker(Request::Publish { tag: Some(tag), .. })] = outs.as_slice() else {
        panic!("the will alone, its stored copy kept until the broker has it: {outs:?}");
    };
    a.published(*tag);
    assert_eq!(drain(&mut a), [Output::Store(will_op("lost", None))]);

    // A device without a will writes nothing.
    a.command(3, Command::Connect(params("plain", true)));
    assert!(stores(&drain(&mut a)).is_empty());
}

#[test]
fn a_will_read_back_is_published_when_the_connection_is_up_and_a_newer_one_is_kept() {
    let mut a = Aggregator::new(10, 4).durable();
    let stored = |id: &str| HeldMessage {
        topic: format!("will/{id}"),
        payload: b"gone".to_vec(),
        qos: 1,
        retain: false,
    };
    a.restore_will("old", stored("old"));
    a.restore_will("back", stored("back"));
    a.connecting();
    // "back" reconnects (with a new will) while the connection is being opened.
    a.command(7, Command::Connect(with_will("back", false, Q2)));
    a.connected();
    let outs = drain(&mut a);
    let wills: Vec<(Tag, String)> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Broker(Request::Publish {
                tag: Some(tag), topic, ..
            }) => Some((*tag, topic.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        wills.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        ["will/old", "will/back"],
        "both devices' connections were lost with the gateway: {outs:?}"
    );
    assert!(stores(&outs).contains(&will_op("back", Some(2))), "{outs:?}");
    for (tag, _) in &wills {
        a.published(*tag);
    }
    assert_eq!(
        stores(&drain(&mut a)),
        [will_op("old", None)],
        "the new session's will stays stored"
    );
}

/// A persistent shared session resumed after a restart: the broker still holds what the
/// gateway subscribed, so only what it lacks is subscribed, and what no device holds any
/// more (a clean-session device's filter, an expired device's) is unsubscribed, both
/// written to the store first. A session the broker did not keep gets every filter again.
#[test]
fn a_resumed_broker_session_keeps_its_filters_and_loses_the_stale_ones() {
    let restored = || {
        let mut a = Aggregator::new(10, 4).durable().numbered(3);
        a.restore("keep", &[("s/#".to_string(), 1), ("new/#".to_string(), 1)], Vec::new());
        a.restore_broker_filter("s/#");
        a.restore_broker_filter("stale/x");
        a.connecting();
        a
    };
    let mut a = restored();
    a.connected_to_session(true);
    let outs = drain(&mut a);
    assert_eq!(
        outs.len(),
        4,
        "stale/x unsubscribed, new/# subscribed, s/# left alone: {outs:?}"
    );
    let store_at = |f: &str, held: bool| {
        position(
            &outs,
            |o| matches!(o, Output::Store(StoreOp::BrokerFilter { connection: 3, filter, held: h }) if &**filter == f && *h == held),
        )
    };
    let unsub = position(
        &outs,
        |o| matches!(o, Output::Broker(Request::Unsubscribe { filter }) if &**filter == "stale/x"),
    );
    let sub = position(
        &outs,
        |o| matches!(o, Output::Broker(Request::Subscribe { filter, .. }) if &**filter == "new/#"),
    );
    assert!(store_at("stale/x", false) < unsub && store_at("new/#", true) < sub);

    // The broker lost the session (restarted without persistence): everything again.
    let mut a = restored();
    a.connected_to_session(false);
    let outs = drain(&mut a);
    let subscribed: std::collections::BTreeSet<String> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Broker(Request::Subscribe { filter, .. }) => Some(filter.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(subscribed, ["new/#".to_string(), "s/#".to_string()].into());
    assert!(!outs
        .iter()
        .any(|o| matches!(o, Output::Broker(Request::Unsubscribe { .. }))));
    store_at_of(&outs, "stale/x");
}

fn store_at_of(outs: &[Output], f: &str) {
    position(
        outs,
        |o| matches!(o, Output::Store(StoreOp::BrokerFilter { filter, held: false, .. }) if &**filter == f),
    );
}
