//! The sans-IO client engine driven by a fake clock and scripted gateway datagrams.
//!
//! Expected bytes are written by hand from the layouts of the MQTT-SN v1.2 specification
//! (section 5.4), not produced by the codec.
#![cfg(feature = "client")]
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use sn_codec::client::{Client, ClientError, Config, Destination, Event, State, Transmit, Will};
use sn_codec::{QoS, ReturnCode, TopicFilter, TopicRef, WillTopic};

type Dev<'a> = Client<'a, 4, 64, 64>;

fn bytes(hex: &str) -> Vec<u8> {
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// Everything the engine wants to send now, as hex strings.
fn tx(c: &mut Dev) -> Vec<String> {
    let mut buf = [0u8; 256];
    let mut out = Vec::new();
    while let Some(n) = c.poll_transmit(&mut buf) {
        out.push(hex(&buf[..n]));
    }
    out
}

fn events(c: &mut Dev) -> Vec<Event> {
    core::iter::from_fn(|| c.poll_event()).collect()
}

/// A received message, owned.
#[derive(Debug, PartialEq)]
struct Got {
    topic: TopicRef,
    payload: Vec<u8>,
    qos: QoS,
    msg_id: u16,
}

/// Feeds one datagram from the gateway; it must decode.
fn rx(c: &mut Dev, now: u64, datagram: &str) -> Option<Got> {
    let d = bytes(datagram);
    c.handle_datagram(now, &d).unwrap().map(|m| Got {
        topic: m.topic,
        payload: m.payload.to_vec(),
        qos: m.qos,
        msg_id: m.msg_id,
    })
}

fn config() -> Config<'static> {
    Config {
        t_retry: 1000,
        n_retry: 2,
        ..Config::new("dev1")
    }
}

/// A client connected at t=0 (CONNECT and CONNACK done, queues drained).
fn connected(cfg: Config<'static>) -> Dev<'static> {
    let mut c = Dev::new(cfg);
    c.connect(0).unwrap();
    tx(&mut c);
    assert_eq!(rx(&mut c, 0, "03 05 00"), None);
    assert_eq!(events(&mut c), [Event::Connected]);
    assert_eq!(c.state(), State::Active);
    c
}

#[test]
fn connect_with_will_handshake() {
    let cfg = Config {
        will: Some(Will {
            topic: "w/s",
            message: b"bye",
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        ..config()
    };
    let mut c = Dev::new(cfg);
    assert_eq!(c.state(), State::Disconnected);
    c.connect(0).unwrap();
    assert_eq!(c.state(), State::Connecting);
    // CONNECT: flags Will|CleanSession, protocol 1, duration 60, "dev1".
    assert_eq!(tx(&mut c), ["0a 04 0c 01 00 3c 64 65 76 31"]);
    assert_eq!(c.connect(0), Err(ClientError::InvalidState));

    rx(&mut c, 100, "02 06"); // WILLTOPICREQ
                              // WILLTOPIC: flags QoS 1 | RETAIN, "w/s".
    assert_eq!(tx(&mut c), ["06 07 30 77 2f 73"]);
    rx(&mut c, 200, "02 08"); // WILLMSGREQ
    assert_eq!(tx(&mut c), ["05 09 62 79 65"]);
    assert!(events(&mut c).is_empty());
    rx(&mut c, 300, "03 05 00"); // CONNACK accepted
    assert_eq!(events(&mut c), [Event::Connected]);
    assert_eq!(c.state(), State::Active);
    assert!(tx(&mut c).is_empty());
}

#[test]
fn connect_rejected_and_lost_connack() {
    let mut c = Dev::new(config());
    c.connect(0).unwrap();
    assert_eq!(tx(&mut c), ["0a 04 04 01 00 3c 64 65 76 31"]);
    // CONNACK lost: CONNECT is retransmitted after Tretry.
    assert_eq!(c.poll_timeout(), Some(1000));
    c.handle_timeout(1000);
    assert_eq!(tx(&mut c), ["0a 04 04 01 00 3c 64 65 76 31"]);
    rx(&mut c, 1100, "03 05 01"); // rejected: congestion
    assert_eq!(events(&mut c), [Event::ConnectRejected(ReturnCode::Congestion)]);
    assert_eq!(c.state(), State::Disconnected);
    assert_eq!(c.poll_timeout(), None);
    // A late CONNACK is ignored.
    rx(&mut c, 1200, "03 05 00");
    assert!(events(&mut c).is_empty());
    assert_eq!(c.state(), State::Disconnected);
}

#[test]
fn register_topic() {
    let mut c = connected(config());
    assert_eq!(c.register(10, "t/a"), Ok(1));
    // REGISTER: topic id 0, msg id 1, "t/a".
    assert_eq!(tx(&mut c), ["09 0a 00 00 00 01 74 2f 61"]);
    assert_eq!(c.register(10, "t/b"), Err(ClientError::Busy));
    // A REGACK for another message id is ignored.
    rx(&mut c, 20, "07 0b 00 05 00 09 00");
    assert!(events(&mut c).is_empty());
    rx(&mut c, 20, "07 0b 00 05 00 01 00");
    assert_eq!(events(&mut c), [Event::Registered { msg_id: 1, topic_id: 5 }]);
    assert_eq!(c.topic_id("t/a"), Some(5));
    assert_eq!(c.topic("t/a"), Some(TopicRef::Normal(5)));
    assert_eq!(c.topic_name(&TopicRef::Normal(5)), Some("t/a"));
    assert_eq!(c.register(30, "t/#"), Err(ClientError::InvalidTopic));
    assert_eq!(c.register(30, ""), Err(ClientError::InvalidTopic));

    // Rejection.
    assert_eq!(c.register(30, "t/b"), Ok(2));
    tx(&mut c);
    rx(&mut c, 40, "07 0b 00 00 00 02 01");
    assert_eq!(
        events(&mut c),
        [Event::RegisterRejected {
            msg_id: 2,
            code: ReturnCode::Congestion
        }]
    );
    assert_eq!(c.topic_id("t/b"), None);
}

#[test]
fn topic_table_full() {
    // 4 entries, 64 name bytes.
    let mut c = connected(config());
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        let msg_id = c.register(0, name).unwrap();
        tx(&mut c);
        rx(
            &mut c,
            0,
            &format!("07 0b 00 {:02x} {} 00", i + 1, hex(&msg_id.to_be_bytes())),
        );
    }
    assert_eq!(c.topic_table_usage(), (4, 4));
    assert_eq!(c.register(0, "e"), Err(ClientError::TableFull));
    // Already known: no room needed.
    assert!(c.register(0, "a").is_ok());
    tx(&mut c);
    rx(&mut c, 0, "07 0b 00 01 00 05 00");
    // The gateway's REGISTER is answered with "congestion" when the table is full.
    rx(&mut c, 0, "07 0a 00 09 12 34 65");
    assert_eq!(tx(&mut c), ["07 0b 00 09 12 34 01"]);
    assert!(c.forget_topic(1));
    rx(&mut c, 0, "07 0a 00 09 12 35 65");
    assert_eq!(tx(&mut c), ["07 0b 00 09 12 35 00"]);
    assert_eq!(c.topic_name(&TopicRef::Normal(9)), Some("e"));
}

#[test]
fn publish_qos1_lost_puback_is_retried_with_dup() {
    let mut c = connected(config());
    let msg_id = c
        .publish(10, TopicRef::Normal(5), b"hi", QoS::AtLeastOnce, false)
        .unwrap();
    assert_eq!(msg_id, 1);
    // PUBLISH: flags QoS 1, topic id 5, msg id 1, "hi".
    assert_eq!(tx(&mut c), ["09 0c 20 00 05 00 01 68 69"]);
    assert_eq!(c.poll_timeout(), Some(1010));
    c.handle_timeout(1009);
    assert!(tx(&mut c).is_empty());
    // PUBACK lost: retransmitted with DUP.
    c.handle_timeout(1010);
    assert_eq!(tx(&mut c), ["09 0c a0 00 05 00 01 68 69"]);
    assert_eq!(c.poll_timeout(), Some(2010));
    rx(&mut c, 1500, "07 0d 00 05 00 01 00");
    assert_eq!(events(&mut c), [Event::Published { msg_id: 1 }]);
    assert!(!c.is_busy());
    // A duplicate PUBACK changes nothing.
    rx(&mut c, 1600, "07 0d 00 05 00 01 00");
    assert!(events(&mut c).is_empty());
}

#[test]
fn publish_rejected() {
    let mut c = connected(config());
    c.publish(0, TopicRef::Normal(5), b"x", QoS::AtLeastOnce, true).unwrap();
    // RETAIN set.
    assert_eq!(tx(&mut c), ["08 0c 30 00 05 00 01 78"]);
    rx(&mut c, 5, "07 0d 00 05 00 01 02");
    assert_eq!(
        events(&mut c),
        [Event::PublishRejected {
            msg_id: 1,
            topic_id: 5,
            code: ReturnCode::InvalidTopicId
        }]
    );
    // QoS 0 to an unknown id: the gateway answers PUBACK with msg id 0.
    assert_eq!(c.publish(10, TopicRef::Normal(6), b"y", QoS::AtMostOnce, false), Ok(0));
    assert_eq!(tx(&mut c), ["08 0c 00 00 06 00 00 79"]);
    rx(&mut c, 15, "07 0d 00 06 00 00 02");
    assert_eq!(
        events(&mut c),
        [Event::PublishRejected {
            msg_id: 0,
            topic_id: 6,
            code: ReturnCode::InvalidTopicId
        }]
    );
}

#[test]
fn publish_qos2_outgoing() {
    let mut c = connected(config());
    c.set_next_msg_id(3);
    let id = c
        .publish(10, TopicRef::Normal(5), b"hi", QoS::ExactlyOnce, false)
        .unwrap();
    assert_eq!(id, 3);
    assert_eq!(tx(&mut c), ["09 0c 40 00 05 00 03 68 69"]);
    rx(&mut c, 20, "04 0f 00 03"); // PUBREC
    assert_eq!(tx(&mut c), ["04 10 00 03"]); // PUBREL
    assert!(events(&mut c).is_empty());
    assert!(c.is_busy());
    // PUBCOMP lost: PUBREL again (no DUP flag in PUBREL).
    assert_eq!(c.poll_timeout(), Some(1020));
    c.handle_timeout(1020);
    assert_eq!(tx(&mut c), ["04 10 00 03"]);
    // The gateway repeats PUBREC: PUBREL again.
    rx(&mut c, 1030, "04 0f 00 03");
    assert_eq!(tx(&mut c), ["04 10 00 03"]);
    rx(&mut c, 1040, "04 0e 00 03"); // PUBCOMP
    assert_eq!(events(&mut c), [Event::Published { msg_id: 3 }]);
    assert!(!c.is_busy());
}

#[test]
fn publish_qos2_incoming_is_delivered_once() {
    let mut c = connected(config());
    let _ = c.register(0, "t/a").unwrap();
    tx(&mut c);
    rx(&mut c, 0, "07 0b 00 05 00 01 00");
    events(&mut c);

    let got = rx(&mut c, 10, "09 0c 40 00 05 12 34 6f 6b").unwrap();
    assert_eq!(
        got,
        Got {
            topic: TopicRef::Normal(5),
            payload: b"ok".to_vec(),
            qos: QoS::ExactlyOnce,
            msg_id: 0x1234
        }
    );
    assert_eq!(tx(&mut c), ["04 0f 12 34"]); // PUBREC
                                             // PUBREC lost: the gateway retransmits with DUP; answered, not delivered again.
    assert_eq!(rx(&mut c, 20, "09 0c c0 00 05 12 34 6f 6b"), None);
    assert_eq!(tx(&mut c), ["04 0f 12 34"]);
    rx(&mut c, 30, "04 10 12 34"); // PUBREL
    assert_eq!(tx(&mut c), ["04 0e 12 34"]); // PUBCOMP
                                             // PUBCOMP lost: PUBREL again, PUBCOMP again.
    rx(&mut c, 40, "04 10 12 34");
    assert_eq!(tx(&mut c), ["04 0e 12 34"]);
    // The id is free again: a new message with it is delivered.
    assert!(rx(&mut c, 50, "09 0c 40 00 05 12 34 6f 6b").is_some());
    assert!(events(&mut c).is_empty());
}

#[test]
fn subscribe_wildcard_then_gateway_register_then_receive() {
    let mut c = connected(config());
    let id = c.subscribe(10, TopicFilter::Name("s/#"), QoS::AtLeastOnce).unwrap();
    assert_eq!(id, 1);
    // SUBSCRIBE: flags QoS 1, topic name type, msg id 1, "s/#".
    assert_eq!(tx(&mut c), ["08 12 20 00 01 73 2f 23"]);
    // SUBACK: granted QoS 1, topic id 0 (wildcard), msg id 1, accepted.
    rx(&mut c, 20, "08 13 20 00 00 00 01 00");
    assert_eq!(
        events(&mut c),
        [Event::Subscribed {
            msg_id: 1,
            topic_id: 0,
            qos: QoS::AtLeastOnce
        }]
    );
    // The gateway registers "s/x" as 7 before publishing on it.
    assert_eq!(rx(&mut c, 30, "09 0a 00 07 01 01 73 2f 78"), None);
    assert_eq!(tx(&mut c), ["07 0b 00 07 01 01 00"]);
    assert_eq!(events(&mut c), [Event::GatewayRegistered { topic_id: 7 }]);
    let got = rx(&mut c, 40, "09 0c 20 00 07 00 09 31 32").unwrap();
    assert_eq!(
        got,
        Got {
            topic: TopicRef::Normal(7),
            payload: b"12".to_vec(),
            qos: QoS::AtLeastOnce,
            msg_id: 9
        }
    );
    assert_eq!(c.topic_name(&got.topic), Some("s/x"));
    assert_eq!(tx(&mut c), ["07 0d 00 07 00 09 00"]); // PUBACK
                                                      // QoS 0: no answer.
    let got = rx(&mut c, 50, "08 0c 00 00 07 00 00 33").unwrap();
    assert_eq!(got.qos, QoS::AtMostOnce);
    assert!(tx(&mut c).is_empty());
    // An id nobody registered: PUBACK "invalid topic id", not delivered.
    assert_eq!(rx(&mut c, 60, "08 0c 20 00 63 00 0a 33"), None);
    assert_eq!(tx(&mut c), ["07 0d 00 63 00 0a 02"]);

    // UNSUBSCRIBE "s/#".
    assert_eq!(c.unsubscribe(70, TopicFilter::Name("s/#")), Ok(2));
    assert_eq!(tx(&mut c), ["08 14 00 00 02 73 2f 23"]);
    rx(&mut c, 80, "04 15 00 02");
    assert_eq!(events(&mut c), [Event::Unsubscribed { msg_id: 2 }]);
}

#[test]
fn subscribe_name_predefined_short() {
    let cfg = Config {
        predefined: &[(0x0a, "cfg/led")],
        ..config()
    };
    let mut c = connected(cfg);
    // A name without wildcards: the SUBACK's topic id is recorded.
    c.subscribe(0, TopicFilter::Name("a/b"), QoS::AtMostOnce).unwrap();
    assert_eq!(tx(&mut c), ["08 12 00 00 01 61 2f 62"]);
    // Lost SUBACK: retransmitted with DUP.
    c.handle_timeout(1000);
    assert_eq!(tx(&mut c), ["08 12 80 00 01 61 2f 62"]);
    rx(&mut c, 1100, "08 13 00 00 03 00 01 00");
    assert_eq!(c.topic_id("a/b"), Some(3));
    events(&mut c);
    // Predefined id 10, QoS 2.
    c.subscribe(1200, TopicFilter::Predefined(0x0a), QoS::ExactlyOnce)
        .unwrap();
    assert_eq!(tx(&mut c), ["07 12 41 00 02 00 0a"]);
    rx(&mut c, 1300, "08 13 40 00 0a 00 02 00");
    assert_eq!(
        events(&mut c),
        [Event::Subscribed {
            msg_id: 2,
            topic_id: 10,
            qos: QoS::ExactlyOnce
        }]
    );
    // Short name "ab", QoS 1; rejected.
    c.subscribe(1400, TopicFilter::Short(*b"ab"), QoS::AtLeastOnce).unwrap();
    assert_eq!(tx(&mut c), ["07 12 22 00 03 61 62"]);
    rx(&mut c, 1500, "08 13 00 00 00 00 03 03");
    assert_eq!(
        events(&mut c),
        [Event::SubscribeRejected {
            msg_id: 3,
            code: ReturnCode::NotSupported
        }]
    );
    // Messages on predefined and short topics need no registration.
    let got = rx(&mut c, 1600, "08 0c 01 00 0a 00 00 31").unwrap();
    assert_eq!(c.topic_name(&got.topic), Some("cfg/led"));
    let got = rx(&mut c, 1700, "08 0c 02 61 62 00 00 32").unwrap();
    assert_eq!(got.topic, TopicRef::Short(*b"ab"));
    assert_eq!(c.topic_name(&got.topic), Some("ab"));
    assert_eq!(
        c.subscribe(0, TopicFilter::Name("x"), QoS::MinusOne),
        Err(ClientError::InvalidQos)
    );
    assert_eq!(
        c.subscribe(0, TopicFilter::Name(""), QoS::AtMostOnce),
        Err(ClientError::InvalidTopic)
    );
}

#[test]
fn qos_minus_one_without_connection() {
    let cfg = Config {
        predefined: &[(1, "p")],
        ..config()
    };
    let mut c = Dev::new(cfg);
    assert_eq!(c.topic("p"), Some(TopicRef::Predefined(1)));
    assert_eq!(c.publish(0, TopicRef::Predefined(1), b"x", QoS::MinusOne, false), Ok(0));
    assert_eq!(c.publish(0, TopicRef::Short(*b"ab"), b"x", QoS::MinusOne, false), Ok(0));
    // Flags: QoS 0b11, topic id type predefined / short; msg id 0.
    assert_eq!(tx(&mut c), ["08 0c 61 00 01 00 00 78", "08 0c 62 61 62 00 00 78"]);
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), b"x", QoS::MinusOne, false),
        Err(ClientError::InvalidTopic)
    );
    assert_eq!(
        c.publish(0, TopicRef::Predefined(1), b"x", QoS::AtMostOnce, false),
        Err(ClientError::NotConnected)
    );
    assert_eq!(
        c.publish(0, TopicRef::Predefined(1), b"x", QoS::AtLeastOnce, false),
        Err(ClientError::NotConnected)
    );
    assert_eq!(c.state(), State::Disconnected);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn transmit_buffer_limits() {
    let mut c = connected(config());
    // 64-byte buffer: a 58-byte payload makes a 65-byte PUBLISH.
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), &[0; 58], QoS::AtLeastOnce, false),
        Err(ClientError::TooLong)
    );
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), &[0; 57], QoS::AtLeastOnce, false),
        Ok(1)
    );
    // The request keeps its bytes for retransmission: no room left for QoS 0.
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), &[0; 1], QoS::AtMostOnce, false),
        Err(ClientError::QueueFull)
    );
    assert_eq!(tx(&mut c).len(), 1);
    rx(&mut c, 0, "07 0d 00 01 00 01 00");
    // QoS 0 messages queue up until drained.
    for _ in 0..8 {
        c.publish(0, TopicRef::Normal(1), b"x", QoS::AtMostOnce, false).unwrap();
    }
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), b"x", QoS::AtMostOnce, false),
        Err(ClientError::QueueFull)
    );
    // A QoS 1 needs room next to them.
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), b"x", QoS::AtLeastOnce, false),
        Err(ClientError::QueueFull)
    );
    assert_eq!(tx(&mut c), vec!["08 0c 00 00 01 00 00 78"; 8]);
    assert_eq!(c.publish(0, TopicRef::Normal(1), b"x", QoS::AtLeastOnce, false), Ok(2));
}

#[test]
fn keep_alive_ping() {
    let mut c = connected(config()); // keep-alive 60 s, connected at 0
    assert_eq!(c.poll_timeout(), Some(60_000));
    c.handle_timeout(59_999);
    assert!(tx(&mut c).is_empty());
    c.handle_timeout(60_000);
    assert_eq!(tx(&mut c), ["02 16"]); // PINGREQ
    assert_eq!(c.poll_timeout(), Some(61_000));
    rx(&mut c, 60_050, "02 17"); // PINGRESP
    assert_eq!(events(&mut c), [Event::PingResp]);
    assert_eq!(c.poll_timeout(), Some(120_000));
    // Traffic both ways postpones the ping.
    c.publish(90_000, TopicRef::Normal(1), b"x", QoS::AtLeastOnce, false)
        .unwrap();
    tx(&mut c);
    rx(&mut c, 90_010, "07 0d 00 01 00 01 00");
    events(&mut c);
    assert_eq!(c.poll_timeout(), Some(150_000));
    // Only sending does not: liveness of the gateway must be seen too.
    c.publish(100_000, TopicRef::Normal(1), b"x", QoS::AtMostOnce, false)
        .unwrap();
    tx(&mut c);
    assert_eq!(c.poll_timeout(), Some(150_010));
    // A ping in flight does not make the client busy: an operation replaces it.
    c.handle_timeout(150_010);
    assert_eq!(tx(&mut c), ["02 16"]);
    assert!(!c.is_busy());
    assert_eq!(c.register(150_020, "t"), Ok(2));
    assert_eq!(tx(&mut c), ["07 0a 00 00 00 02 74"]);
    // The gateway pings us: we answer.
    rx(&mut c, 150_030, "02 16");
    assert_eq!(tx(&mut c), ["02 17"]);
}

#[test]
fn unanswered_ping_loses_gateway() {
    let mut c = connected(Config {
        keep_alive: 10,
        ..config()
    });
    c.handle_timeout(10_000);
    assert_eq!(tx(&mut c), ["02 16"]);
    c.handle_timeout(11_000);
    assert_eq!(tx(&mut c), ["02 16"]);
    c.handle_timeout(12_000);
    assert_eq!(tx(&mut c), ["02 16"]);
    c.handle_timeout(13_000);
    assert!(tx(&mut c).is_empty());
    assert_eq!(events(&mut c), [Event::GatewayLost]);
    assert_eq!(c.state(), State::Disconnected);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn retries_exhausted_gateway_lost() {
    let mut c = connected(config()); // Tretry 1 s, Nretry 2
    c.subscribe(0, TopicFilter::Name("a/b"), QoS::AtLeastOnce).unwrap();
    assert_eq!(tx(&mut c), ["08 12 20 00 01 61 2f 62"]);
    c.handle_timeout(1000);
    assert_eq!(tx(&mut c), ["08 12 a0 00 01 61 2f 62"]);
    c.handle_timeout(2000);
    assert_eq!(tx(&mut c), ["08 12 a0 00 01 61 2f 62"]);
    assert!(events(&mut c).is_empty());
    c.handle_timeout(3000);
    assert!(tx(&mut c).is_empty());
    assert_eq!(events(&mut c), [Event::GatewayLost]);
    assert_eq!(c.state(), State::Disconnected);
    assert!(!c.is_busy());
    // A late SUBACK is ignored.
    rx(&mut c, 3100, "08 13 20 00 05 00 01 00");
    assert!(events(&mut c).is_empty());
    // Reconnecting works.
    c.connect(4000).unwrap();
    assert_eq!(tx(&mut c), ["0a 04 04 01 00 3c 64 65 76 31"]);
}

#[test]
fn message_id_wraps_and_skips_zero() {
    let mut c = connected(config());
    c.set_next_msg_id(0xfffe);
    for (expected, wire) in [(0xfffe, "ff fe"), (0xffff, "ff ff"), (1, "00 01")] {
        let id = c.publish(0, TopicRef::Normal(5), b"", QoS::AtLeastOnce, false).unwrap();
        assert_eq!(id, expected);
        assert_eq!(tx(&mut c), [format!("07 0c 20 00 05 {wire}")]);
        rx(&mut c, 0, &format!("07 0d 00 05 {wire} 00"));
        assert_eq!(events(&mut c), [Event::Published { msg_id: id }]);
    }
    assert_eq!(c.next_msg_id(), 2);
    c.set_next_msg_id(0);
    assert_eq!(c.next_msg_id(), 1);
}

#[test]
fn sleep_and_wake() {
    let mut c = connected(config()); // Tretry 1 s
    let _ = c.register(0, "t/a").unwrap();
    tx(&mut c);
    rx(&mut c, 0, "07 0b 00 05 00 01 00");
    events(&mut c);

    c.sleep(100, 60).unwrap();
    assert_eq!(c.state(), State::GoingToSleep);
    assert_eq!(tx(&mut c), ["04 18 00 3c"]); // DISCONNECT, duration 60 s
    rx(&mut c, 200, "02 18"); // DISCONNECT
    assert_eq!(events(&mut c), [Event::Asleep]);
    assert_eq!(c.state(), State::Asleep);
    // No keep-alive while asleep; the wake-up signal comes Tretry before the end.
    assert_eq!(c.poll_timeout(), Some(200 + 60_000 - 1000));
    assert_eq!(
        c.publish(300, TopicRef::Normal(5), b"x", QoS::AtMostOnce, false),
        Err(ClientError::NotConnected)
    );
    c.handle_timeout(59_200);
    assert_eq!(events(&mut c), [Event::WakeUpDue]);
    assert_eq!(c.poll_timeout(), None);

    c.wake(59_300).unwrap();
    assert_eq!(c.state(), State::Awake);
    assert_eq!(tx(&mut c), ["06 16 64 65 76 31"]); // PINGREQ "dev1"
                                                   // Buffered messages arrive, then PINGRESP.
    let got = rx(&mut c, 59_400, "09 0c 20 00 05 00 07 68 69").unwrap();
    assert_eq!(got.payload, b"hi");
    assert_eq!(tx(&mut c), ["07 0d 00 05 00 07 00"]);
    let got = rx(&mut c, 59_500, "08 0c 00 00 05 00 00 21").unwrap();
    assert_eq!(got.payload, b"!");
    rx(&mut c, 59_600, "02 17");
    assert_eq!(events(&mut c), [Event::Asleep]);
    assert_eq!(c.state(), State::Asleep);
    assert_eq!(c.poll_timeout(), Some(59_600 + 59_000));

    // Waking with nothing buffered; PINGRESP lost once.
    c.wake(100_000).unwrap();
    assert_eq!(tx(&mut c), ["06 16 64 65 76 31"]);
    c.handle_timeout(101_000);
    assert_eq!(tx(&mut c), ["06 16 64 65 76 31"]);
    rx(&mut c, 101_100, "02 17");
    assert_eq!(events(&mut c), [Event::Asleep]);

    // Back to active: CONNECT without will and clean-session flags.
    c.connect(120_000).unwrap();
    assert_eq!(tx(&mut c), ["0a 04 00 01 00 3c 64 65 76 31"]);
    rx(&mut c, 120_100, "03 05 00");
    assert_eq!(events(&mut c), [Event::Connected]);
    assert_eq!(c.state(), State::Active);
    // The session (and its registrations) survived.
    assert_eq!(c.topic_id("t/a"), Some(5));
    assert_eq!(c.wake(0), Err(ClientError::InvalidState));
    assert_eq!(c.sleep(0, 0), Err(ClientError::InvalidArgument));
}

#[test]
fn disconnect_and_gateway_disconnect() {
    let mut c = connected(config());
    c.disconnect(10).unwrap();
    assert_eq!(c.state(), State::Disconnecting);
    assert_eq!(tx(&mut c), ["02 18"]);
    rx(&mut c, 20, "02 18");
    assert_eq!(events(&mut c), [Event::Disconnected]);
    assert_eq!(c.state(), State::Disconnected);
    assert_eq!(c.disconnect(30), Err(ClientError::InvalidState));

    // The gateway ends the connection on its own.
    let mut c = connected(config());
    rx(&mut c, 20, "02 18");
    assert_eq!(events(&mut c), [Event::Disconnected]);
    assert_eq!(c.state(), State::Disconnected);
    // ... and is ignored once disconnected.
    rx(&mut c, 30, "02 18");
    assert!(events(&mut c).is_empty());
    // Acknowledgements are not sent for a session that is gone.
    assert_eq!(rx(&mut c, 40, "08 0c 21 00 01 00 05 31"), None);
    assert!(tx(&mut c).is_empty());
}

#[test]
fn will_updates() {
    let cfg = Config {
        will: Some(Will {
            topic: "w",
            message: b"old",
            qos: QoS::AtMostOnce,
            retain: false,
        }),
        ..config()
    };
    let mut c = Dev::new(cfg);
    c.connect(0).unwrap();
    tx(&mut c);
    rx(&mut c, 0, "02 06");
    assert_eq!(tx(&mut c), ["04 07 00 77"]);
    rx(&mut c, 0, "02 08");
    assert_eq!(tx(&mut c), ["05 09 6f 6c 64"]);
    rx(&mut c, 0, "03 05 00");
    events(&mut c);

    let topic = WillTopic {
        qos: QoS::ExactlyOnce,
        retain: true,
        topic: "w/2",
    };
    c.update_will_topic(10, Some(topic)).unwrap();
    // WILLTOPICUPD: flags QoS 2 | RETAIN, "w/2".
    assert_eq!(tx(&mut c), ["06 1a 50 77 2f 32"]);
    rx(&mut c, 20, "03 1b 00");
    assert_eq!(events(&mut c), [Event::WillTopicUpdated(ReturnCode::Accepted)]);
    let will = c.config().will.unwrap();
    assert_eq!(
        (will.topic, will.message, will.qos),
        ("w/2", &b"old"[..], QoS::ExactlyOnce)
    );

    c.update_will_message(30, b"new").unwrap();
    assert_eq!(tx(&mut c), ["05 1c 6e 65 77"]);
    rx(&mut c, 40, "03 1d 00");
    assert_eq!(events(&mut c), [Event::WillMessageUpdated(ReturnCode::Accepted)]);
    assert_eq!(c.config().will.unwrap().message, b"new");

    // Deleting the will: the empty WILLTOPICUPD.
    c.update_will_topic(50, None).unwrap();
    assert_eq!(tx(&mut c), ["02 1a"]);
    rx(&mut c, 60, "03 1b 00");
    events(&mut c);
    assert_eq!(c.config().will, None);
    // A rejected update leaves the configuration alone.
    c.update_will_message(70, b"zzz").unwrap();
    tx(&mut c);
    rx(&mut c, 80, "03 1d 03");
    assert_eq!(events(&mut c), [Event::WillMessageUpdated(ReturnCode::NotSupported)]);
}

#[test]
fn gateway_discovery() {
    let mut c = Dev::new(config());
    c.search_gateway(0, 1, 500).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(c.poll_transmit_to(&mut buf), None);
    assert_eq!(c.poll_timeout(), Some(500));
    c.handle_timeout(500);
    assert_eq!(
        c.poll_transmit_to(&mut buf),
        Some(Transmit {
            len: 3,
            destination: Destination::Broadcast { radius: 1 }
        })
    );
    assert_eq!(hex(&buf[..3]), "03 01 01"); // SEARCHGW radius 1
                                            // Unanswered: back-off 1 s, 2 s.
    assert_eq!(c.poll_timeout(), Some(1500));
    c.handle_timeout(1500);
    assert_eq!(tx(&mut c), ["03 01 01"]);
    assert_eq!(c.poll_timeout(), Some(3500));
    rx(&mut c, 2000, "03 02 07"); // GWINFO from gateway 7
    assert_eq!(events(&mut c), [Event::GatewayFound { gw_id: 7 }]);
    assert_eq!(c.gateway_id(), Some(7));
    assert_eq!(c.poll_timeout(), None);

    // ADVERTISE every 10 s: lost after Nadv = 3 periods without one.
    rx(&mut c, 3000, "05 00 07 00 0a");
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(33_000));
    rx(&mut c, 13_000, "05 00 07 00 0a");
    // Another gateway's ADVERTISE does not count.
    rx(&mut c, 20_000, "05 00 08 00 0a");
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(43_000));
    c.handle_timeout(43_000);
    assert_eq!(events(&mut c), [Event::GatewayLost]);
    assert_eq!(c.gateway_id(), None);
    // The next ADVERTISE makes a gateway known again.
    rx(&mut c, 50_000, "05 00 08 00 0a");
    assert_eq!(events(&mut c), [Event::GatewayFound { gw_id: 8 }]);
}

#[test]
fn gateway_search_gives_up_and_yields_to_other_clients() {
    let mut c = Dev::new(config());
    c.search_gateway(0, 2, 0).unwrap();
    assert_eq!(tx(&mut c), ["03 01 02"]);
    c.handle_timeout(1000);
    assert_eq!(tx(&mut c), ["03 01 02"]);
    c.handle_timeout(3000);
    assert_eq!(tx(&mut c), ["03 01 02"]);
    assert_eq!(c.poll_timeout(), Some(7000));
    c.handle_timeout(7000);
    assert!(tx(&mut c).is_empty());
    assert_eq!(events(&mut c), [Event::GatewayNotFound]);

    // Another client's SEARCHGW heard before ours goes out: ours is not sent.
    c.search_gateway(10_000, 1, 300).unwrap();
    rx(&mut c, 10_100, "03 01 01");
    assert_eq!(c.poll_timeout(), Some(11_100));
    // Its answer (a GWINFO from a client, with the gateway's address) serves us too.
    rx(&mut c, 10_200, "07 02 05 0a 00 00 01");
    assert_eq!(events(&mut c), [Event::GatewayFound { gw_id: 5 }]);
    assert!(tx(&mut c).is_empty());
}

#[test]
fn busy_and_state_errors() {
    let mut c = Dev::new(config());
    assert_eq!(c.register(0, "a"), Err(ClientError::NotConnected));
    assert_eq!(
        c.subscribe(0, TopicFilter::Name("a"), QoS::AtMostOnce),
        Err(ClientError::NotConnected)
    );
    assert_eq!(c.ping(0), Err(ClientError::NotConnected));
    assert_eq!(c.sleep(0, 10), Err(ClientError::NotConnected));
    let mut c = connected(config());
    c.register(0, "a").unwrap();
    assert_eq!(
        c.publish(0, TopicRef::Normal(1), b"", QoS::AtLeastOnce, false),
        Err(ClientError::Busy)
    );
    assert_eq!(
        c.subscribe(0, TopicFilter::Name("a"), QoS::AtMostOnce),
        Err(ClientError::Busy)
    );
    assert_eq!(c.ping(0), Err(ClientError::Busy));
    assert_eq!(c.sleep(0, 10), Err(ClientError::Busy));
    // QoS 0 does not need the request slot.
    assert_eq!(c.publish(0, TopicRef::Normal(1), b"", QoS::AtMostOnce, false), Ok(0));
    assert_eq!(c.connect(0), Err(ClientError::InvalidState));
    // Disconnect abandons the outstanding REGISTER.
    c.disconnect(0).unwrap();
    assert_eq!(tx(&mut c), ["07 0c 00 00 01 00 00", "02 18"]);
}

#[test]
fn malformed_datagrams_are_errors_not_panics() {
    let mut c = connected(config());
    assert!(c.handle_datagram(0, &[]).is_err());
    assert!(c.handle_datagram(0, &[0x05, 0x0c]).is_err());
    assert!(c.handle_datagram(0, &[0x02, 0xff]).is_err());
    assert!(c.handle_datagram(0, &[0x01, 0x00]).is_err());
    assert_eq!(c.state(), State::Active);
    assert!(tx(&mut c).is_empty());
}

#[test]
fn sizes() {
    use core::mem::size_of;
    let sizes = [
        ("Client<'_, 4, 64, 64>", size_of::<Client<'static, 4, 64, 64>>()),
        ("Client<'_, 8, 128, 128> (default)", size_of::<Client<'static>>()),
        ("Client<'_, 16, 256, 256>", size_of::<Client<'static, 16, 256, 256>>()),
        ("Event", size_of::<Event>()),
        ("Config", size_of::<Config<'static>>()),
    ];
    for (name, size) in sizes {
        println!("size_of::<{name}>() = {size}");
    }
    // Fixed overhead beyond the three buffers stays small.
    let fixed = size_of::<Client<'static, 0, 0, 0>>();
    println!("fixed part = {fixed}");
    assert!(fixed <= 320, "fixed part grew to {fixed} bytes");
}

/// Operations a fuzzed application may call between datagrams.
fn apply_op(c: &mut Dev<'static>, now: u64, op: u8, arg: u16, data: &[u8]) {
    let topic = match arg % 3 {
        0 => TopicRef::Normal(arg),
        1 => TopicRef::Predefined(arg),
        _ => TopicRef::Short(arg.to_be_bytes()),
    };
    let qos = QoS::from_bits(op >> 4);
    let name = core::str::from_utf8(data).unwrap_or("x/+");
    let _ = match op % 13 {
        0 => c.connect(now),
        1 => c.register(now, name).map(drop),
        2 => c.publish(now, topic, data, qos, op & 0x80 != 0).map(drop),
        3 => c.subscribe(now, TopicFilter::Name(name), qos).map(drop),
        4 => c.unsubscribe(now, TopicFilter::Predefined(arg)).map(drop),
        5 => c.ping(now),
        6 => c.disconnect(now),
        7 => c.sleep(now, arg),
        8 => c.wake(now),
        9 => c.search_gateway(now, (arg & 3) as u8, u32::from(arg)),
        10 => c.update_will_topic(
            now,
            Some(WillTopic {
                qos,
                retain: false,
                topic: "w",
            }),
        ),
        11 => c.update_will_message(now, b"m"),
        _ => {
            c.set_next_msg_id(arg);
            Ok(())
        }
    };
}

/// Datagrams that decode, in the gateway-to-client direction, with fuzzed fields.
fn gateway_datagram() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..16,
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(kind, a, b, x, tail)| {
            let [a0, a1] = a.to_be_bytes();
            let [b0, b1] = b.to_be_bytes();
            let mut v = match kind {
                0 => vec![0x00, x, a0, a1],
                1 => vec![0x02, x],
                2 => vec![0x05, x % 4],
                3 => vec![0x06],
                4 => vec![0x08],
                5 => vec![0x0a, a0, a1, b0, b1, b'a'],
                6 => vec![0x0b, a0, a1, b0, b1, x % 4],
                7 => {
                    let mut p = vec![0x0c, (x & 0xf0) | (x % 3), a0, a1, b0, b1];
                    p.extend_from_slice(&tail);
                    p
                }
                8 => vec![0x0d, a0, a1, b0, b1, x % 4],
                9 => vec![0x0e, b0, b1],
                10 => vec![0x0f, b0, b1],
                11 => vec![0x10, b0, b1],
                12 => vec![0x13, (x % 3) << 5, a0, a1, b0, b1, x % 4],
                13 => vec![0x15, b0, b1],
                14 => vec![[0x16, 0x17, 0x18][x as usize % 3]],
                _ => vec![[0x1b, 0x1d][x as usize % 2], x % 4],
            };
            v.insert(0, (v.len() + 1) as u8);
            v
        })
}

#[derive(Debug, Clone)]
enum Step {
    Datagram(Vec<u8>),
    Garbage(Vec<u8>),
    Op(u8, u16, Vec<u8>),
    Wait(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => gateway_datagram().prop_map(Step::Datagram),
        2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Step::Garbage),
        3 => (any::<u8>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..70))
            .prop_map(|(o, a, d)| Step::Op(o, a, d)),
        2 => (0u32..200_000).prop_map(Step::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic, in whatever state the engine is.
    #[test]
    fn arbitrary_sequences_never_panic(steps in proptest::collection::vec(step(), 0..60)) {
        let cfg = Config {
            will: Some(Will { topic: "w", message: b"m", qos: QoS::AtLeastOnce, retain: false }),
            predefined: &[(1, "p")],
            keep_alive: 30,
            ..config()
        };
        let mut c = Dev::new(cfg);
        let mut now = 0u64;
        let mut buf = [0u8; 128];
        for s in steps {
            match s {
                Step::Datagram(d) => {
                    prop_assert!(c.handle_datagram(now, &d).is_ok(), "{:02x?} did not decode", d);
                }
                Step::Garbage(d) => { let _ = c.handle_datagram(now, &d); }
                Step::Op(o, a, d) => apply_op(&mut c, now, o, a, &d),
                Step::Wait(ms) => {
                    now += u64::from(ms);
                    if c.poll_timeout().is_some_and(|t| t <= now) {
                        c.handle_timeout(now);
                    }
                }
            }
            let mut n = 0;
            while let Some(len) = c.poll_transmit(&mut buf) {
                // Everything the engine sends decodes.
                prop_assert!(sn_codec::Packet::decode(&buf[..len]).is_ok());
                n += 1;
                prop_assert!(n < 32);
            }
            let mut e = 0;
            while c.poll_event().is_some() {
                e += 1;
                prop_assert!(e <= 4);
            }
            // After the timers ran, nothing is overdue.
            c.handle_timeout(now);
            prop_assert!(c.poll_timeout().map_or(true, |t| t > now));
            while c.poll_transmit(&mut buf).is_some() {}
            while c.poll_event().is_some() {}
        }
    }
}
