//! Protocol rules of the engine, each checked with a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::broker::{DeliveryId, Message, Token, Will};
use bytes::Bytes;
use sn_codec::{
    Connect, PubAck, Publish, RegAck, Register, ReturnCode, SubAck, Subscribe, TopicFilter, TopicRef, WillTopic,
};

const T_RETRY: Duration = Duration::from_secs(2);

pub(super) fn cfg() -> EngineConfig {
    EngineConfig {
        retry_interval: T_RETRY,
        max_retries: 2,
        max_queued_messages: 4,
        max_queued_bytes: 1000,
        predefined: Arc::new(Predefined::new([(77, "sensors/temp".to_string())]).unwrap()),
        ..EngineConfig::default()
    }
}

pub(super) fn dev(n: u16) -> LinkAddr {
    LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 20000 + n)))
}

/// A gateway on a fake clock (also used by `tests_link`).
pub(super) struct T {
    pub(super) gw: Gateway,
    pub(super) t0: Instant,
    pub(super) now: Instant,
}

impl T {
    fn new() -> T {
        Self::with(cfg())
    }

    pub(super) fn with(cfg: EngineConfig) -> T {
        let now = Instant::now();
        T {
            gw: Gateway::new(cfg),
            t0: now,
            now,
        }
    }

    pub(super) fn at(&mut self, secs: f64) {
        self.now = self.t0 + Duration::from_secs_f64(secs);
        self.gw.handle_timeout(self.now);
    }

    pub(super) fn send(&mut self, from: &LinkAddr, p: Packet<'_>) {
        let mut buf = vec![0; p.encoded_len()];
        let n = p.encode(&mut buf).unwrap();
        self.gw.handle_datagram(self.now, from.clone(), &buf[..n]);
    }

    pub(super) fn feed(&mut self, from: &LinkAddr, data: &[u8]) {
        self.gw.handle_datagram(self.now, from.clone(), data);
    }

    /// Feeds a CONNECT datagram (plain or encapsulated) and accepts the broker connection.
    pub(super) fn connected(&mut self, from: &LinkAddr, datagram: &[u8]) -> ClientKey {
        self.feed(from, datagram);
        let cmds = self.cmds();
        let [(key, Command::Connect(_))] = cmds.as_slice() else {
            panic!("expected a broker connect, got {cmds:?}")
        };
        let key = *key;
        self.event(key, BrokerEvent::Connected { session_present: false });
        self.tx();
        key
    }

    pub(super) fn tx(&mut self) -> Vec<(LinkAddr, Vec<u8>)> {
        std::iter::from_fn(|| self.gw.poll_transmit())
            .map(|t| (t.to, t.data))
            .collect()
    }

    pub(super) fn cmds(&mut self) -> Vec<(ClientKey, Command)> {
        std::iter::from_fn(|| self.gw.poll_command()).collect()
    }

    pub(super) fn event(&mut self, key: ClientKey, ev: BrokerEvent) {
        self.gw.handle_broker_event(self.now, key, ev);
    }

    /// Asserts the next datagrams are exactly `expected`, in order, to `to`.
    pub(super) fn expect(&mut self, to: &LinkAddr, expected: &[Packet<'_>]) {
        let got = self.tx();
        let decoded: Vec<Packet<'_>> = got
            .iter()
            .map(|(addr, data)| {
                assert_eq!(addr, to, "sent to the wrong address");
                Packet::decode(data).unwrap()
            })
            .collect();
        assert_eq!(decoded, expected);
    }

    pub(super) fn expect_nothing(&mut self) {
        let got = self.tx();
        assert!(got.is_empty(), "unexpected datagrams: {:?}", got);
    }

    /// Connects `id` from `from` without will; returns its client key.
    pub(super) fn connect(&mut self, from: &LinkAddr, id: &str, clean: bool, keep_alive: u16) -> ClientKey {
        self.send(
            from,
            Packet::Connect(Connect {
                will: false,
                clean_session: clean,
                duration: keep_alive,
                client_id: id,
            }),
        );
        let cmds = self.cmds();
        let key = match cmds.as_slice() {
            [.., (key, Command::Connect(p))] => {
                assert_eq!(p.client_id, id);
                assert_eq!(p.clean_session, clean);
                assert_eq!(p.keep_alive, keep_alive);
                *key
            }
            other => panic!("expected a broker connect, got {other:?}"),
        };
        self.expect_nothing();
        self.event(key, BrokerEvent::Connected { session_present: false });
        self.expect(from, &[Packet::ConnAck(ReturnCode::Accepted)]);
        key
    }

    fn register(&mut self, from: &LinkAddr, name: &str, msg_id: u16) -> u16 {
        self.send(
            from,
            Packet::Register(Register {
                topic_id: 0,
                msg_id,
                topic_name: name,
            }),
        );
        let got = self.tx();
        assert_eq!(got.len(), 1);
        match Packet::decode(&got[0].1).unwrap() {
            Packet::RegAck(RegAck {
                topic_id,
                msg_id: m,
                code: ReturnCode::Accepted,
            }) if m == msg_id => topic_id,
            other => panic!("expected REGACK, got {other:?}"),
        }
    }

    pub(super) fn subscribe(
        &mut self,
        from: &LinkAddr,
        key: ClientKey,
        topic: TopicFilter<'_>,
        qos: QoS,
        msg_id: u16,
    ) -> u16 {
        self.send(
            from,
            Packet::Subscribe(Subscribe {
                dup: false,
                qos,
                msg_id,
                topic,
            }),
        );
        let token = match self.cmds().as_slice() {
            [(k, Command::Subscribe { token, .. })] if *k == key => *token,
            other => panic!("expected subscribe, got {other:?}"),
        };
        self.expect_nothing();
        self.event(
            key,
            BrokerEvent::SubAck {
                token,
                granted: Some(crate::broker::MqttQos::AtLeastOnce),
            },
        );
        let got = self.tx();
        match Packet::decode(&got[0].1).unwrap() {
            Packet::SubAck(SubAck {
                msg_id: m,
                code: ReturnCode::Accepted,
                topic_id,
                ..
            }) if m == msg_id => topic_id,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

pub(super) fn msg(topic: &str, payload: &str, qos: MqttQos, delivery: u16) -> BrokerEvent {
    BrokerEvent::Message(Message {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain: false,
        // Any number will do: the engine only hands it back.
        delivery: DeliveryId(u64::from(delivery)),
    })
}

pub(super) fn puback(topic_id: u16, msg_id: u16) -> Packet<'static> {
    Packet::PubAck(PubAck {
        topic_id,
        msg_id,
        code: ReturnCode::Accepted,
    })
}

pub(super) fn publish<'a>(qos: QoS, topic: TopicRef, msg_id: u16, data: &'a [u8], dup: bool) -> Packet<'a> {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic,
        msg_id,
        data,
    })
}

fn the_will() -> Will {
    Will {
        topic: "wills/dev1".into(),
        message: Bytes::from_static(b"gone"),
        qos: MqttQos::AtLeastOnce,
        retain: false,
    }
}

/// Connects with the will handshake; returns the key.
fn connect_with_will(t: &mut T, d: &LinkAddr) -> ClientKey {
    let connect = Packet::Connect(Connect {
        will: true,
        clean_session: true,
        duration: 10,
        client_id: "dev1",
    });
    t.send(d, connect);
    t.expect(d, &[Packet::WillTopicReq]);
    // The device missed WILLTOPICREQ and repeats CONNECT: the handshake goes on.
    t.send(d, connect);
    t.expect(d, &[Packet::WillTopicReq]);
    t.send(
        d,
        Packet::WillTopic(Some(WillTopic {
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "wills/dev1",
        })),
    );
    t.expect(d, &[Packet::WillMsgReq]);
    assert!(t.cmds().is_empty(), "no broker connection before the will is complete");
    t.send(d, Packet::WillMsg(b"gone"));
    let cmds = t.cmds();
    let [(key, Command::Connect(p))] = cmds.as_slice() else {
        panic!("expected connect, got {cmds:?}")
    };
    assert_eq!(p.will, Some(the_will()));
    let key = *key;
    t.event(key, BrokerEvent::Connected { session_present: false });
    t.expect(d, &[Packet::ConnAck(ReturnCode::Accepted)]);
    key
}

#[test]
fn will_handshake_then_will_published_on_keep_alive_loss() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    // Keep-alive 10 s: alive at 14.9 s, lost at 15 s.
    t.at(14.9);
    assert!(t.cmds().is_empty());
    t.at(15.0);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: Some(the_will()) })]);
    assert_eq!(t.gw.stats().metrics.lost, 1);
    assert_eq!(t.gw.session_state("dev1"), None);
}

#[test]
fn traffic_keeps_a_client_alive() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 10);
    t.at(14.0);
    t.send(&d, Packet::PingReq(None));
    t.expect(&d, &[Packet::PingResp]);
    t.at(28.0);
    assert!(t.cmds().is_empty());
    assert_eq!(t.gw.session_state("c"), Some(SessionState::Active));
}

#[test]
fn clean_disconnect_publishes_no_will() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(&d, Packet::Disconnect(None));
    t.expect(&d, &[Packet::Disconnect(None)]);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: None })]);
    // Our DISCONNECT was lost: the repeat is answered though the session is gone.
    t.send(&d, Packet::Disconnect(None));
    t.expect(&d, &[Packet::Disconnect(None)]);
    t.at(100.0);
    assert!(t.cmds().is_empty());
}

#[test]
fn updated_will_is_the_one_published() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(
        &d,
        Packet::WillTopicUpd(Some(WillTopic {
            qos: QoS::AtMostOnce,
            retain: true,
            topic: "wills/new",
        })),
    );
    t.expect(&d, &[Packet::WillTopicResp(ReturnCode::Accepted)]);
    t.send(&d, Packet::WillMsgUpd(b"bye"));
    t.expect(&d, &[Packet::WillMsgResp(ReturnCode::Accepted)]);
    t.at(20.0);
    let will = Will {
        topic: "wills/new".into(),
        message: Bytes::from_static(b"bye"),
        qos: MqttQos::AtMostOnce,
        retain: true,
    };
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: Some(will) })]);
}

#[test]
fn empty_will_topic_update_deletes_the_will() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(&d, Packet::WillTopicUpd(None));
    t.expect(&d, &[Packet::WillTopicResp(ReturnCode::Accepted)]);
    t.at(20.0);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: None })]);
}

#[test]
fn qos1_publish_is_acknowledged_only_after_the_broker() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    let id = t.register(&d, "a/b", 1);
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 7, b"x", false));
    let cmds = t.cmds();
    let [(k, Command::Publish { token, topic, qos, .. })] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!((*k, &**topic, *qos), (key, "a/b", MqttQos::AtLeastOnce));
    t.expect_nothing();
    // A DUP retransmission while the broker has not answered is not published again.
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 7, b"x", true));
    assert!(t.cmds().is_empty());
    t.event(key, BrokerEvent::Published { token: *token });
    t.expect(&d, &[puback(id, 7)]);
}

#[test]
fn qos2_publish_reaches_the_broker_exactly_once() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    let p = publish(QoS::ExactlyOnce, TopicRef::Short(*b"ab"), 9, b"x", false);
    t.send(&d, p);
    let cmds = t.cmds();
    let [(_, Command::Publish { token, topic, .. })] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!(&**topic, "ab");
    let token = *token;
    t.send(&d, publish(QoS::ExactlyOnce, TopicRef::Short(*b"ab"), 9, b"x", true));
    assert!(t.cmds().is_empty());
    t.event(key, BrokerEvent::Published { token });
    t.expect(&d, &[Packet::PubRec(9)]);
    // PUBREC lost: the device repeats PUBLISH, gets PUBREC again, nothing new to the broker.
    t.send(&d, publish(QoS::ExactlyOnce, TopicRef::Short(*b"ab"), 9, b"x", true));
    t.expect(&d, &[Packet::PubRec(9)]);
    assert!(t.cmds().is_empty());
    t.send(&d, Packet::PubRel(9));
    t.expect(&d, &[Packet::PubComp(9)]);
    assert_eq!(t.gw.stats().metrics.publishes_in, 1);
    // A late copy of the original datagram (a radio that duplicates and reorders) after
    // the exchange completed: still not forwarded again.
    t.send(&d, publish(QoS::ExactlyOnce, TopicRef::Short(*b"ab"), 9, b"x", false));
    assert!(t.cmds().is_empty());
    t.expect_nothing();
    assert_eq!(t.gw.stats().metrics.duplicates_dropped, 1);
    // A new message reusing the id (allowed after PUBCOMP) goes through at once.
    t.send(&d, publish(QoS::ExactlyOnce, TopicRef::Short(*b"ab"), 9, b"y", false));
    assert_eq!(t.cmds().len(), 1);
}

#[test]
fn unknown_topic_id_gets_puback_invalid_topic() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Normal(42), 0, b"x", false));
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 42,
            msg_id: 0,
            code: ReturnCode::InvalidTopicId,
        })],
    );
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Predefined(5), 3, b"x", false));
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 5,
            msg_id: 3,
            code: ReturnCode::InvalidTopicId,
        })],
    );
    assert!(t.cmds().is_empty());
}

#[test]
fn qos_minus_one_from_anyone_to_predefined_and_short_topics() {
    let mut t = T::new();
    let stranger = dev(9);
    t.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(77), 0, b"21.5", false),
    );
    t.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Short(*b"xy"), 0, b"1", false),
    );
    t.send(&stranger, publish(QoS::MinusOne, TopicRef::Normal(1), 0, b"1", false));
    t.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(78), 0, b"1", false),
    );
    let cmds = t.cmds();
    // No connect: which connection carries them is the link's business.
    let topics: Vec<&str> = cmds
        .iter()
        .map(|(k, c)| match c {
            Command::Publish { topic, .. } if *k == QOS_MINUS_ONE_KEY => &**topic,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, ["sensors/temp", "xy"]);
    assert_eq!(t.gw.stats().metrics.qos_minus_one_dropped, 2);
    t.expect_nothing();
}

#[test]
fn wildcard_delivery_registers_first_and_acks_broker_after_device() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    let sub_id = t.subscribe(&d, key, TopicFilter::Name("s/#"), QoS::AtLeastOnce, 1);
    assert_eq!(sub_id, 0, "wildcard SUBACK carries topic id 0");
    t.event(key, msg("s/1", "hello", MqttQos::AtLeastOnce, 33));
    let got = t.tx();
    let Packet::Register(Register {
        topic_id,
        msg_id,
        topic_name,
    }) = Packet::decode(&got[0].1).unwrap()
    else {
        panic!("expected REGISTER")
    };
    assert_eq!(topic_name, "s/1");
    assert_eq!(got.len(), 1, "PUBLISH waits for REGACK");
    t.send(
        &d,
        Packet::RegAck(RegAck {
            topic_id,
            msg_id,
            code: ReturnCode::Accepted,
        }),
    );
    let got = t.tx();
    let Packet::Publish(p) = Packet::decode(&got[0].1).unwrap() else {
        panic!("expected PUBLISH")
    };
    assert_eq!(
        (p.topic, p.data, p.qos, p.dup),
        (TopicRef::Normal(topic_id), &b"hello"[..], QoS::AtLeastOnce, false)
    );
    assert!(t.cmds().is_empty(), "broker not acked before the device");
    t.send(
        &d,
        Packet::PubAck(PubAck {
            topic_id,
            msg_id: p.msg_id,
            code: ReturnCode::Accepted,
        }),
    );
    assert_eq!(
        t.cmds(),
        vec![(
            key,
            Command::Ack {
                delivery: DeliveryId(33)
            }
        )]
    );
    // Same topic again: no second REGISTER.
    t.event(key, msg("s/1", "again", MqttQos::AtMostOnce, 0));
    let got = t.tx();
    assert!(matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.topic == TopicRef::Normal(topic_id)));
}

#[test]
fn subscribe_by_name_predefined_and_short() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    let id = t.subscribe(&d, key, TopicFilter::Name("a/b"), QoS::AtLeastOnce, 1);
    assert_ne!(id, 0);
    assert_eq!(
        t.subscribe(&d, key, TopicFilter::Predefined(77), QoS::AtMostOnce, 2),
        77
    );
    assert_eq!(
        t.subscribe(&d, key, TopicFilter::Short(*b"zz"), QoS::AtMostOnce, 3),
        u16::from_be_bytes(*b"zz")
    );
    // Unknown predefined id: refused without asking the broker.
    t.send(
        &d,
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 4,
            topic: TopicFilter::Predefined(5),
        }),
    );
    assert!(t.cmds().is_empty());
    let got = t.tx();
    assert!(matches!(
        Packet::decode(&got[0].1).unwrap(),
        Packet::SubAck(SubAck {
            code: ReturnCode::InvalidTopicId,
            msg_id: 4,
            ..
        })
    ));
    // Messages use the id the client knows.
    t.event(key, msg("a/b", "1", MqttQos::AtMostOnce, 0));
    t.event(key, msg("sensors/temp", "2", MqttQos::AtMostOnce, 0));
    t.event(key, msg("zz", "3", MqttQos::AtMostOnce, 0));
    let topics: Vec<TopicRef> = t
        .tx()
        .iter()
        .map(|(_, d)| match Packet::decode(d).unwrap() {
            Packet::Publish(p) => p.topic,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        topics,
        [TopicRef::Normal(id), TopicRef::Predefined(77), TopicRef::Short(*b"zz")]
    );
}

#[test]
fn delivery_is_retried_with_dup_then_the_client_is_lost() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(&d, Packet::PingReq(None)); // refresh keep-alive
    t.tx();
    t.event(key, msg("sensors/temp", "1", MqttQos::AtLeastOnce, 5));
    let first = t.tx();
    let Packet::Publish(p) = Packet::decode(&first[0].1).unwrap() else {
        panic!()
    };
    assert!(!p.dup);
    let msg_id = p.msg_id;
    t.at(1.9);
    t.expect_nothing();
    t.at(2.0);
    let again = t.tx();
    let Packet::Publish(p) = Packet::decode(&again[0].1).unwrap() else {
        panic!()
    };
    assert!(p.dup, "retransmission carries DUP");
    assert_eq!(p.msg_id, msg_id, "same message id");
    t.at(4.0);
    assert_eq!(t.tx().len(), 1);
    assert_eq!(t.gw.stats().metrics.retransmissions, 2);
    // Nretry = 2 retransmissions done; the next timeout loses the client.
    t.at(6.0);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: Some(the_will()) })]);
}

#[test]
fn one_message_in_flight_at_a_time() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.event(key, msg("sensors/temp", "1", MqttQos::AtLeastOnce, 1));
    t.event(key, msg("sensors/temp", "2", MqttQos::AtLeastOnce, 2));
    let got = t.tx();
    assert_eq!(got.len(), 1);
    let Packet::Publish(p) = Packet::decode(&got[0].1).unwrap() else {
        panic!()
    };
    assert_eq!(p.data, b"1");
    t.send(&d, puback(77, p.msg_id));
    let got = t.tx();
    let Packet::Publish(p2) = Packet::decode(&got[0].1).unwrap() else {
        panic!()
    };
    assert_eq!(p2.data, b"2");
    assert_ne!(p2.msg_id, p.msg_id);
}

#[test]
fn qos2_delivery_acks_broker_on_pubrec_and_completes() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.event(key, msg("sensors/temp", "1", MqttQos::ExactlyOnce, 4));
    let got = t.tx();
    let Packet::Publish(p) = Packet::decode(&got[0].1).unwrap() else {
        panic!()
    };
    assert_eq!(p.qos, QoS::ExactlyOnce);
    t.send(&d, Packet::PubRec(p.msg_id));
    t.expect(&d, &[Packet::PubRel(p.msg_id)]);
    assert_eq!(
        t.cmds(),
        vec![(
            key,
            Command::Ack {
                delivery: DeliveryId(4)
            }
        )]
    );
    // PUBREL retried until PUBCOMP.
    t.at(2.0);
    t.expect(&d, &[Packet::PubRel(p.msg_id)]);
    t.send(&d, Packet::PubComp(p.msg_id));
    t.at(10.0);
    t.expect_nothing();
}

#[test]
fn message_ids_wrap_and_skip_zero() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    let mut seen_max = false;
    for i in 0..65_537u32 {
        t.event(
            key,
            msg("sensors/temp", "x", MqttQos::AtLeastOnce, (i % 60_000 + 1) as u16),
        );
        let got = t.tx();
        let Packet::Publish(p) = Packet::decode(&got[0].1).unwrap() else {
            panic!()
        };
        assert_ne!(p.msg_id, 0);
        seen_max |= p.msg_id == u16::MAX;
        t.send(&d, puback(77, p.msg_id));
        t.cmds();
    }
    assert!(seen_max);
}

#[test]
fn takeover_from_another_address() {
    let mut t = T::new();
    let (a, b) = (dev(1), dev(2));
    let old = t.connect(&a, "c", true, 0);
    let new = t.connect(&b, "c", true, 0);
    assert_ne!(old, new);
    // connect() drained the commands; check the old link was closed without will.
    assert_eq!(t.gw.stats().metrics.takeovers, 1);
    // The old address is no longer a client.
    t.send(&a, Packet::PingReq(None));
    t.expect(&a, &[Packet::Disconnect(None)]);
    t.send(&b, Packet::PingReq(None));
    t.expect(&b, &[Packet::PingResp]);
}

#[test]
fn takeover_closes_the_old_broker_link_without_will() {
    let mut t = T::new();
    let (a, b) = (dev(1), dev(2));
    let old = connect_with_will(&mut t, &a);
    t.send(
        &b,
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0,
            client_id: "dev1",
        }),
    );
    let cmds = t.cmds();
    assert_eq!(cmds[0], (old, Command::Disconnect { will: None }));
    assert!(matches!(cmds[1], (_, Command::Connect(_))));
}

#[test]
fn clean_session_false_keeps_topic_ids() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", false, 0);
    let id = t.register(&d, "a/b", 1);
    t.send(&d, Packet::Disconnect(None));
    t.tx();
    t.cmds();
    t.connect(&d, "c", false, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"x", false));
    assert!(matches!(t.cmds().as_slice(), [(_, Command::Publish { topic, .. })] if &**topic == "a/b"));
    // A clean session forgets them.
    t.send(&d, Packet::Disconnect(None));
    t.tx();
    t.cmds();
    t.connect(&d, "c", true, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"x", false));
    assert!(t.cmds().is_empty());
}

#[test]
fn kept_topic_ids_expire_after_session_expiry_unless_the_device_comes_back() {
    let mut t = T::with(EngineConfig {
        session_expiry: Some(Duration::from_secs(100)),
        ..cfg()
    });
    let d = dev(1);
    let leave = |t: &mut T| {
        t.send(&d, Packet::Disconnect(None));
        t.tx();
        t.cmds();
    };
    t.connect(&d, "c", false, 0);
    let id = t.register(&d, "a/b", 1);
    leave(&mut t);
    assert_eq!(t.gw.stats().persisted_sessions, 1);
    // Back within the expiry: the ids are there; gone again at 60 s.
    t.at(50.0);
    t.connect(&d, "c", false, 0);
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"x", false));
    assert!(matches!(t.cmds().as_slice(), [(_, Command::Publish { topic, .. })] if &**topic == "a/b"));
    t.at(60.0);
    leave(&mut t);
    // The expiry runs from the last time it went: still kept at 159 s, not at 160 s.
    t.at(159.0);
    assert_eq!(t.gw.stats().persisted_sessions, 1);
    let due = t.gw.poll_timeout().expect("the expiry is a deadline");
    assert_eq!(due, t.t0 + Duration::from_secs(160));
    t.at(160.0);
    assert_eq!(t.gw.stats().persisted_sessions, 0);
    assert_eq!(t.gw.stats().metrics.sessions_expired, 1);
    // The link is told (aggregating mode drops what it kept for the device).
    assert!(matches!(
        t.cmds().as_slice(),
        [(crate::broker::GATEWAY_KEY, Command::Expire { client_id })] if &**client_id == "c"
    ));
    t.connect(&d, "c", false, 0);
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 3, b"x", false));
    assert!(t.cmds().is_empty(), "an expired id is not published");
    let got = t.tx();
    let Packet::PubAck(a) = Packet::decode(&got[0].1).unwrap() else {
        panic!("{got:?}")
    };
    assert_eq!(a.code, sn_codec::ReturnCode::InvalidTopicId);
}

#[test]
fn sleeping_client_gets_held_messages_in_order_then_pingresp() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "sleepy", true, 0);
    t.send(&d, Packet::Disconnect(Some(60)));
    t.expect(&d, &[Packet::Disconnect(None)]);
    assert_eq!(t.gw.session_state("sleepy"), Some(SessionState::Asleep));
    t.event(key, msg("sensors/temp", "0", MqttQos::AtMostOnce, 0));
    t.event(key, msg("sensors/temp", "1", MqttQos::AtLeastOnce, 11));
    t.event(key, msg("sensors/temp", "2", MqttQos::ExactlyOnce, 12));
    t.expect_nothing();
    assert!(t.cmds().is_empty(), "nothing acknowledged while asleep");
    assert_eq!(t.gw.stats().held_messages, 3);
    // Wakes from a new address (NAT rebinding).
    let d2 = dev(2);
    t.at(30.0);
    t.send(&d2, Packet::PingReq(Some("sleepy")));
    let got = t.tx();
    let Packet::Publish(p0) = Packet::decode(&got[0].1).unwrap() else {
        panic!()
    };
    assert_eq!((p0.data, p0.qos), (&b"0"[..], QoS::AtMostOnce));
    let Packet::Publish(p1) = Packet::decode(&got[1].1).unwrap() else {
        panic!()
    };
    assert_eq!(p1.data, b"1");
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(to, _)| *to == d2));
    t.send(&d2, puback(77, p1.msg_id));
    let got = t.tx();
    let Packet::Publish(p2) = Packet::decode(&got[0].1).unwrap() else {
        panic!()
    };
    assert_eq!(p2.data, b"2");
    t.send(&d2, Packet::PubRec(p2.msg_id));
    t.expect(&d2, &[Packet::PubRel(p2.msg_id)]);
    t.send(&d2, Packet::PubComp(p2.msg_id));
    t.expect(&d2, &[Packet::PingResp]);
    assert_eq!(t.gw.session_state("sleepy"), Some(SessionState::Asleep));
    let acks: Vec<u64> = t
        .cmds()
        .into_iter()
        .map(|(_, c)| match c {
            Command::Ack { delivery } => delivery.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(acks, [11, 12]);
    // Wake with nothing held: PINGRESP at once.
    t.send(&d2, Packet::PingReq(Some("sleepy")));
    t.expect(&d2, &[Packet::PingResp]);
    assert_eq!(t.gw.stats().metrics.wakes, 2);
}

#[test]
fn oversleeping_client_is_lost_with_its_will() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(&d, Packet::Disconnect(Some(100)));
    t.tx();
    t.at(149.0);
    assert!(t.cmds().is_empty(), "keep-alive does not apply while asleep");
    t.at(150.0);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: Some(the_will()) })]);
}

#[test]
fn each_wake_restarts_the_sleep_timer() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "s", true, 0);
    t.send(&d, Packet::Disconnect(Some(100)));
    t.tx();
    t.at(140.0);
    t.send(&d, Packet::PingReq(Some("s")));
    t.expect(&d, &[Packet::PingResp]);
    t.at(280.0);
    assert!(t.cmds().is_empty());
    t.at(290.0);
    assert_eq!(t.gw.stats().metrics.lost, 1);
}

#[test]
fn qos0_overflow_drops_oldest_qos0_and_keeps_qos1() {
    let mut t = T::new(); // 4 messages max
    let d = dev(1);
    let key = t.connect(&d, "s", true, 0);
    t.send(&d, Packet::Disconnect(Some(600)));
    t.tx();
    t.event(key, msg("sensors/temp", "q1", MqttQos::AtLeastOnce, 1));
    for i in 0..5 {
        t.event(key, msg("sensors/temp", &format!("z{i}"), MqttQos::AtMostOnce, 0));
    }
    t.event(key, msg("sensors/temp", "q2", MqttQos::AtLeastOnce, 2));
    let s = t.gw.stats();
    assert_eq!(s.metrics.qos0_dropped, 2);
    t.send(&d, Packet::PingReq(Some("s")));
    let mut delivered = Vec::new();
    for _ in 0..10 {
        let got = t.tx();
        let mut last_qos1 = None;
        for (_, data) in &got {
            match Packet::decode(data).unwrap() {
                Packet::Publish(p) => {
                    delivered.push(String::from_utf8(p.data.to_vec()).unwrap());
                    if p.qos == QoS::AtLeastOnce {
                        last_qos1 = Some(p.msg_id);
                    }
                }
                Packet::PingResp => {
                    assert_eq!(delivered, ["q1", "z2", "z3", "z4", "q2"]);
                    return;
                }
                other => panic!("{other:?}"),
            }
        }
        if let Some(msg_id) = last_qos1 {
            t.send(
                &d,
                Packet::PubAck(PubAck {
                    topic_id: 77,
                    msg_id,
                    code: ReturnCode::Accepted,
                }),
            );
        }
    }
    panic!("no PINGRESP; delivered {delivered:?}");
}

#[test]
fn connect_from_asleep_resumes_and_delivers() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "s", true, 0);
    t.send(&d, Packet::Disconnect(Some(60)));
    t.tx();
    t.event(key, msg("sensors/temp", "held", MqttQos::AtMostOnce, 0));
    t.send(
        &d,
        Packet::Connect(Connect {
            will: false,
            clean_session: false,
            duration: 30,
            client_id: "s",
        }),
    );
    assert!(t.cmds().is_empty(), "the broker session is kept");
    let got = t.tx();
    assert_eq!(
        Packet::decode(&got[0].1).unwrap(),
        Packet::ConnAck(ReturnCode::Accepted)
    );
    assert!(matches!(Packet::decode(&got[1].1).unwrap(), Packet::Publish(p) if p.data == b"held"));
    assert_eq!(t.gw.session_state("s"), Some(SessionState::Active));
}

#[test]
fn disconnect_from_asleep_ends_cleanly() {
    let mut t = T::new();
    let d = dev(1);
    let key = connect_with_will(&mut t, &d);
    t.send(&d, Packet::Disconnect(Some(60)));
    t.tx();
    t.send(&d, Packet::Disconnect(None));
    t.expect(&d, &[Packet::Disconnect(None)]);
    assert_eq!(t.cmds(), vec![(key, Command::Disconnect { will: None })]);
}

#[test]
fn broker_connection_loss_is_told_to_the_device() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.event(key, BrokerEvent::Closed { reason: "gone".into() });
    t.expect(&d, &[Packet::Disconnect(None)]);
    assert_eq!(t.gw.session_state("c"), None);
}

#[test]
fn broker_refusal_is_connack_congestion() {
    let mut t = T::new();
    let d = dev(1);
    t.send(
        &d,
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0,
            client_id: "c",
        }),
    );
    let key = t.cmds()[0].0;
    t.event(
        key,
        BrokerEvent::ConnectFailed {
            reason: "unreachable".into(),
            refused: false,
        },
    );
    t.expect(&d, &[Packet::ConnAck(ReturnCode::Congestion)]);
}

#[test]
fn client_limit_answers_congestion() {
    let mut t = T::with(EngineConfig {
        max_clients: 1,
        ..cfg()
    });
    t.connect(&dev(1), "a", true, 0);
    t.send(
        &dev(2),
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0,
            client_id: "b",
        }),
    );
    t.expect(&dev(2), &[Packet::ConnAck(ReturnCode::Congestion)]);
    assert!(t.cmds().is_empty());
}

#[test]
fn congested_link_answers_puback_congestion() {
    let mut t = T::new();
    let d = dev(1);
    let key = t.connect(&d, "c", true, 0);
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Predefined(77), 5, b"x", false));
    let Some((_, Command::Publish { token, .. })) = t.cmds().pop() else {
        panic!()
    };
    t.event(
        key,
        BrokerEvent::Rejected {
            token: token as Token,
            reason: RejectReason::Full,
        },
    );
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 77,
            msg_id: 5,
            code: ReturnCode::Congestion,
        })],
    );
}

#[test]
fn bad_datagrams_are_counted_and_strangers_told_to_connect() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    t.gw.handle_datagram(t.now, dev(5), &[0x05, 0x0C, 0x00]);
    t.gw.handle_datagram(t.now, dev(5), &[]);
    t.gw.handle_datagram(t.now, dev(5), &[0xFF; 40]);
    assert_eq!(t.gw.stats().metrics.malformed, 3);
    t.send(&dev(5), publish(QoS::AtLeastOnce, TopicRef::Normal(1), 1, b"x", false));
    t.expect(&dev(5), &[Packet::Disconnect(None)]);
    t.send(&d, Packet::PingReq(None));
    t.expect(&d, &[Packet::PingResp]);
}

#[test]
fn connect_with_another_protocol_id_gets_not_supported() {
    let mut t = T::new();
    // CONNECT, flags 0x04, protocol id 0x02, duration 10, client id "c".
    t.gw.handle_datagram(t.now, dev(1), &[0x07, 0x04, 0x04, 0x02, 0x00, 0x0A, b'c']);
    t.expect(&dev(1), &[Packet::ConnAck(ReturnCode::NotSupported)]);
    assert!(t.cmds().is_empty());
}

#[test]
fn searchgw_is_answered_with_gwinfo() {
    let mut t = T::new();
    t.send(&dev(3), Packet::SearchGw { radius: 1 });
    t.expect(&dev(3), &[Packet::GwInfo(sn_codec::GwInfo { gw_id: 1, gw_addr: &[] })]);
}

#[test]
fn encapsulated_clients_are_separate_and_answered_encapsulated() {
    let mut t = T::new();
    let fwd = dev(7);
    for node in [&b"\x01"[..], &b"\x02"[..]] {
        let inner = Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0,
            client_id: if node == b"\x01" { "n1" } else { "n2" },
        });
        let mut buf = [0u8; 64];
        let n = sn_codec::encode_encapsulated(0, node, &inner, &mut buf).unwrap();
        t.gw.handle_datagram(t.now, fwd.clone(), &buf[..n]);
        let key = t.cmds()[0].0;
        t.event(key, BrokerEvent::Connected { session_present: false });
        let got = t.tx();
        let Packet::Encapsulated(e) = Packet::decode(&got[0].1).unwrap() else {
            panic!()
        };
        assert_eq!(e.node_id, node);
        assert_eq!(Packet::decode(e.inner).unwrap(), Packet::ConnAck(ReturnCode::Accepted));
    }
    assert_eq!(t.gw.stats().sessions, 2);
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn arbitrary_datagrams_never_panic(datagrams in proptest::collection::vec((0u16..4, proptest::collection::vec(any::<u8>(), 0..80)), 0..40)) {
            let mut t = T::new();
            let d = dev(100);
            t.connect(&d, "victim", true, 0);
            for (from, data) in &datagrams {
                t.gw.handle_datagram(t.now, dev(*from), data);
                t.tx();
                t.cmds();
            }
            t.at(1000.0);
            t.send(&d, Packet::PingReq(None));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hardening: invalid topics never reach the broker; unsupported requests are answered.
// ---------------------------------------------------------------------------------------

fn refused(t: &T) -> u64 {
    t.gw.stats().metrics.topic_refused
}

#[test]
fn register_of_a_topic_with_control_characters_gets_regack_not_supported() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    let too_long = "a".repeat(topics::MAX_TOPIC_LEN + 1);
    for (i, name) in ["a/\x01/b", "a/\u{9f}", "a/+", "#", "", too_long.as_str()]
        .into_iter()
        .enumerate()
    {
        let msg_id = 10 + i as u16;
        t.send(
            &d,
            Packet::Register(Register {
                topic_id: 0,
                msg_id,
                topic_name: name,
            }),
        );
        t.expect(
            &d,
            &[Packet::RegAck(RegAck {
                topic_id: 0,
                msg_id,
                code: ReturnCode::NotSupported,
            })],
        );
    }
    assert_eq!(refused(&t), 6);
    // Nothing was assigned: a PUBLISH to the id a REGISTER would have got is refused.
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Normal(1), 3, b"x", false));
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 1,
            msg_id: 3,
            code: ReturnCode::InvalidTopicId,
        })],
    );
    assert!(t.cmds().is_empty(), "nothing goes to the broker");
}

#[test]
fn qos_minus_one_to_an_invalid_short_topic_is_dropped_and_counted() {
    let mut t = T::new();
    let hostile = dev(9);
    t.send(
        &hostile,
        publish(QoS::MinusOne, TopicRef::Short([0x01, 0x02]), 0, b"x", false),
    );
    t.send(
        &hostile,
        publish(QoS::MinusOne, TopicRef::Short(*b"a+"), 0, b"x", false),
    );
    t.send(
        &hostile,
        publish(QoS::MinusOne, TopicRef::Short([0xFF, 0xFE]), 0, b"x", false),
    );
    assert!(t.cmds().is_empty(), "no broker command, not even the QoS -1 connect");
    t.expect_nothing();
    let m = t.gw.stats().metrics;
    assert_eq!((m.topic_refused, m.qos_minus_one_dropped, m.qos_minus_one), (3, 3, 0));
    // A legitimate one still goes.
    t.send(&dev(8), publish(QoS::MinusOne, TopicRef::Short(*b"ok"), 0, b"y", false));
    let cmds = t.cmds();
    assert!(matches!(
        cmds.as_slice(),
        [(QOS_MINUS_ONE_KEY, Command::Publish { topic, .. })] if &**topic == "ok"
    ));
}

#[test]
fn publish_to_an_invalid_short_topic_gets_puback_not_supported() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    t.send(
        &d,
        publish(QoS::AtLeastOnce, TopicRef::Short([0x01, 0x02]), 4, b"x", false),
    );
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 0x0102,
            msg_id: 4,
            code: ReturnCode::NotSupported,
        })],
    );
    assert!(t.cmds().is_empty());
    assert_eq!(refused(&t), 1);
}

#[test]
fn publish_with_the_reserved_topic_id_type_gets_puback_not_supported() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    // PUBLISH, flags QoS 1 + topic id type 0b11, TopicId 0x0001, MsgId 0x0007, "x".
    t.feed(&d, &[0x08, 0x0C, 0x23, 0x00, 0x01, 0x00, 0x07, b'x']);
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 1,
            msg_id: 7,
            code: ReturnCode::NotSupported,
        })],
    );
    // QoS 2 likewise; QoS -1 has nobody to answer.
    t.feed(&d, &[0x08, 0x0C, 0x43, 0x00, 0x02, 0x00, 0x08, b'x']);
    t.expect(
        &d,
        &[Packet::PubAck(PubAck {
            topic_id: 2,
            msg_id: 8,
            code: ReturnCode::NotSupported,
        })],
    );
    t.feed(&dev(9), &[0x08, 0x0C, 0x63, 0x00, 0x02, 0x00, 0x00, b'x']);
    t.expect_nothing();
    assert!(t.cmds().is_empty());
    let m = t.gw.stats().metrics;
    assert_eq!((m.malformed, m.qos_minus_one_dropped), (0, 1));
    // From an address with no session: told to connect.
    t.feed(&dev(5), &[0x08, 0x0C, 0x23, 0x00, 0x01, 0x00, 0x07, b'x']);
    t.expect(&dev(5), &[Packet::Disconnect(None)]);
}

fn suback_not_supported(msg_id: u16) -> Packet<'static> {
    Packet::SubAck(SubAck {
        qos: QoS::AtMostOnce,
        topic_id: 0,
        msg_id,
        code: ReturnCode::NotSupported,
    })
}

#[test]
fn subscribe_with_qos_bits_11_gets_suback_not_supported() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    // SUBSCRIBE, flags QoS 0b11 + topic name, MsgId 0x0005, "a/b".
    t.feed(&d, &[0x08, 0x12, 0x60, 0x00, 0x05, b'a', b'/', b'b']);
    t.expect(&d, &[suback_not_supported(5)]);
    // Topic id type 0b11, MsgId 6.
    t.feed(&d, &[0x07, 0x12, 0x23, 0x00, 0x06, 0x00, 0x01]);
    t.expect(&d, &[suback_not_supported(6)]);
    // UNSUBSCRIBE with topic id type 0b11: UNSUBACK (it has no return code).
    t.feed(&d, &[0x07, 0x14, 0x03, 0x00, 0x07, 0x00, 0x01]);
    t.expect(&d, &[Packet::UnsubAck(7)]);
    assert!(t.cmds().is_empty());
    assert_eq!(t.gw.stats().metrics.malformed, 0);
}

#[test]
fn subscribe_to_a_malformed_filter_gets_suback_not_supported() {
    let mut t = T::new();
    let d = dev(1);
    t.connect(&d, "c", true, 0);
    let filters = ["a/#/b", "a+", "#a", "a/\x01/#", ""];
    for (i, filter) in filters.into_iter().enumerate() {
        let msg_id = 20 + i as u16;
        t.send(
            &d,
            Packet::Subscribe(Subscribe {
                dup: false,
                qos: QoS::AtLeastOnce,
                msg_id,
                topic: TopicFilter::Name(filter),
            }),
        );
        t.expect(&d, &[suback_not_supported(msg_id)]);
    }
    // A short name that is no topic name, and a topic name that is not UTF-8.
    t.send(
        &d,
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 30,
            topic: TopicFilter::Short([0x01, 0x02]),
        }),
    );
    t.expect(&d, &[suback_not_supported(30)]);
    t.feed(&d, &[0x06, 0x12, 0x00, 0x00, 0x1F, 0xFF]);
    t.expect(&d, &[suback_not_supported(31)]);
    // UNSUBSCRIBE from one: answered, not forwarded.
    t.send(
        &d,
        Packet::Unsubscribe(sn_codec::Unsubscribe {
            msg_id: 32,
            topic: TopicFilter::Name("a/#/b"),
        }),
    );
    t.expect(&d, &[Packet::UnsubAck(32)]);
    assert!(t.cmds().is_empty(), "nothing goes to the broker");
    assert_eq!(refused(&t), filters.len() as u64 + 3);
}

/// CONNECT "w" with the will flag, answered WILLTOPICREQ.
fn connect_asking_for_a_will(t: &mut T, d: &LinkAddr) {
    t.send(
        d,
        Packet::Connect(Connect {
            will: true,
            clean_session: true,
            duration: 10,
            client_id: "w",
        }),
    );
    t.expect(d, &[Packet::WillTopicReq]);
}

#[test]
fn invalid_will_topics_are_refused() {
    let mut t = T::new();
    let d = dev(1);
    connect_asking_for_a_will(&mut t, &d);
    t.send(
        &d,
        Packet::WillTopic(Some(WillTopic {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "wills/\x01",
        })),
    );
    t.expect(&d, &[Packet::ConnAck(ReturnCode::NotSupported)]);
    assert!(t.cmds().is_empty(), "no broker connection with that will");
    // WILLTOPIC with QoS bits 0b11.
    connect_asking_for_a_will(&mut t, &d);
    t.feed(&d, &[0x04, 0x07, 0x60, b'w']);
    t.expect(&d, &[Packet::ConnAck(ReturnCode::NotSupported)]);
    assert!(t.cmds().is_empty());

    // WILLTOPICUPD, connected.
    t.connect(&d, "c", true, 0);
    t.send(
        &d,
        Packet::WillTopicUpd(Some(WillTopic {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a/#",
        })),
    );
    t.expect(&d, &[Packet::WillTopicResp(ReturnCode::NotSupported)]);
    t.feed(&d, &[0x04, 0x1A, 0x60, b'w']);
    t.expect(&d, &[Packet::WillTopicResp(ReturnCode::NotSupported)]);
    assert_eq!(refused(&t), 2);
}

#[test]
fn connect_with_a_non_utf8_client_id_gets_connack_not_supported() {
    let mut t = T::new();
    // CONNECT, flags 0x04, protocol 0x01, duration 10, client id 0xFF.
    t.feed(&dev(1), &[0x07, 0x04, 0x04, 0x01, 0x00, 0x0A, 0xFF]);
    t.expect(&dev(1), &[Packet::ConnAck(ReturnCode::NotSupported)]);
    // Behind a forwarder: answered encapsulated.
    t.feed(
        &dev(2),
        &[0x04, 0xFE, 0x00, 0xAB, 0x07, 0x04, 0x04, 0x01, 0x00, 0x0A, 0xC3],
    );
    let got = t.tx();
    let [(to, data)] = got.as_slice() else {
        panic!("expected one answer, got {got:?}")
    };
    assert_eq!(to, &dev(2));
    let Ok(Packet::Encapsulated(e)) = Packet::decode(data) else {
        panic!("not encapsulated: {data:02x?}")
    };
    assert_eq!(e.node_id, &[0xAB]);
    assert_eq!(Packet::decode(e.inner), Ok(Packet::ConnAck(ReturnCode::NotSupported)));
    assert!(t.cmds().is_empty());
    let m = t.gw.stats().metrics;
    assert_eq!((m.connects_refused, m.malformed, m.topic_refused), (2, 0, 0));
}

#[test]
fn connect_with_unused_flag_bits_set_is_accepted() {
    let mut t = T::new();
    let d = dev(1);
    // Flags 0xF7: DUP, QoS 0b11, Retain and TopicIdType 0b11 (all "not used" in
    // CONNECT, spec 5.4.4) plus CleanSession; no Will.
    t.feed(&d, &[0x07, 0x04, 0xF7, 0x01, 0x00, 0x0A, b'c']);
    let cmds = t.cmds();
    let [(key, Command::Connect(p))] = cmds.as_slice() else {
        panic!("expected a broker connect, got {cmds:?}")
    };
    assert!(p.clean_session);
    assert_eq!(p.will, None);
    assert_eq!(p.keep_alive, 10);
    let key = *key;
    t.event(key, BrokerEvent::Connected { session_present: false });
    t.expect(&d, &[Packet::ConnAck(ReturnCode::Accepted)]);
}

#[test]
fn three_octet_length_form_is_decoded_on_short_messages() {
    let mut t = T::new();
    let d = dev(1);
    // CONNECT "c" in the three-octet form (9 octets).
    t.feed(&d, &[0x01, 0x00, 0x09, 0x04, 0x04, 0x01, 0x00, 0x0A, b'c']);
    let key = match t.cmds().as_slice() {
        [(key, Command::Connect(_))] => *key,
        other => panic!("expected a broker connect, got {other:?}"),
    };
    t.event(key, BrokerEvent::Connected { session_present: false });
    // Answers are canonical (one-octet Length).
    let got = t.tx();
    assert_eq!(got, [(d.clone(), vec![0x03, 0x05, 0x00])]);
    // PINGREQ in the smallest three-octet form.
    t.feed(&d, &[0x01, 0x00, 0x04, 0x16]);
    t.expect(&d, &[Packet::PingResp]);
    // PUBLISH QoS 0 to predefined 77, "hi".
    t.feed(&d, &[0x01, 0x00, 0x0B, 0x0C, 0x01, 0x00, 0x4D, 0x00, 0x00, b'h', b'i']);
    let cmds = t.cmds();
    assert!(
        matches!(cmds.as_slice(), [(k, Command::Publish { topic, payload, .. })] if *k == key && &**topic == "sensors/temp" && &payload[..] == b"hi"),
        "{cmds:?}"
    );
    assert_eq!(t.gw.stats().metrics.malformed, 0);
}

#[test]
fn metrics_display_as_key_value_pairs_of_nonzero_counters() {
    let mut m = Metrics::default();
    assert_eq!(m.to_string(), "");
    m.datagrams_in = 3;
    m.malformed = 1;
    m.topic_refused = 2;
    assert_eq!(m.to_string(), "datagrams_in=3 malformed=1 topic_refused=2");
}

#[test]
fn connack_and_publish_ack_latencies_are_measured_with_the_given_clock() {
    let mut t = T::new();
    let d = dev(1);
    t.send(
        &d,
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0,
            client_id: "lat",
        }),
    );
    let cmds = t.cmds();
    let [(key, Command::Connect(_))] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    let key = *key;
    t.at(0.04);
    t.event(key, BrokerEvent::Connected { session_present: false });
    t.expect(&d, &[Packet::ConnAck(ReturnCode::Accepted)]);
    let connack = t.gw.stats().latency.connack;
    let at = |bound: f64| LATENCY_BUCKETS.iter().position(|b| *b == bound).unwrap();
    assert_eq!((connack.count, connack.buckets[at(0.05)]), (1, 1), "{connack:?}");
    assert_eq!(connack.sum_micros, 40_000);

    let id = t.register(&d, "a/b", 1);
    t.at(1.0);
    t.send(&d, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 7, b"x", false));
    let cmds = t.cmds();
    let [(_, Command::Publish { token, .. })] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    let token = *token;
    t.at(1.2);
    t.event(key, BrokerEvent::Published { token });
    t.expect(&d, &[puback(id, 7)]);
    let ack = t.gw.stats().latency.publish_ack;
    assert_eq!((ack.count, ack.buckets[at(0.25)]), (1, 1), "{ack:?}");
    // QoS 0 is not measured (nothing acknowledges it).
    t.send(&d, publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"y", false));
    assert_eq!(t.gw.stats().latency.publish_ack.count, 1);
}
