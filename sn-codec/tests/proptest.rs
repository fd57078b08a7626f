//! Property tests for the codec invariants:
//!
//! - every packet that encodes decodes back to itself;
//! - every buffer that decodes re-encodes to its canonical form (the same bytes, with the
//!   one-octet length whenever it fits and unused CONNECT flags cleared), which decodes
//!   to the same packet;
//! - decoding arbitrary bytes never panics.
#![allow(clippy::unwrap_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use sn_codec::*;

/// An owned mirror of [`Packet`], so that strategies can generate the borrowed data.
#[derive(Debug, Clone)]
enum Owned {
    Advertise(Advertise),
    SearchGw(u8),
    GwInfo(u8, Vec<u8>),
    Connect(bool, bool, u16, String),
    ConnAck(ReturnCode),
    WillTopicReq,
    WillTopic(Option<(QoS, bool, String)>),
    WillMsgReq,
    WillMsg(Vec<u8>),
    Register(u16, u16, String),
    RegAck(RegAck),
    Publish(bool, QoS, bool, TopicRef, u16, Vec<u8>),
    PubAck(PubAck),
    PubComp(u16),
    PubRec(u16),
    PubRel(u16),
    Subscribe(bool, QoS, u16, OwnedFilter),
    SubAck(SubAck),
    Unsubscribe(u16, OwnedFilter),
    UnsubAck(u16),
    PingReq(Option<String>),
    PingResp,
    Disconnect(Option<u16>),
    WillTopicUpd(Option<(QoS, bool, String)>),
    WillTopicResp(ReturnCode),
    WillMsgUpd(Vec<u8>),
    WillMsgResp(ReturnCode),
    Encapsulated(u8, Vec<u8>, Vec<u8>),
}

#[derive(Debug, Clone)]
enum OwnedFilter {
    Name(String),
    Predefined(u16),
    Short([u8; 2]),
}

impl OwnedFilter {
    fn filter(&self) -> TopicFilter<'_> {
        match self {
            OwnedFilter::Name(n) => TopicFilter::Name(n),
            OwnedFilter::Predefined(id) => TopicFilter::Predefined(*id),
            OwnedFilter::Short(s) => TopicFilter::Short(*s),
        }
    }
}

fn will(w: &Option<(QoS, bool, String)>) -> Option<WillTopic<'_>> {
    w.as_ref().map(|(qos, retain, topic)| WillTopic {
        qos: *qos,
        retain: *retain,
        topic,
    })
}

impl Owned {
    fn packet(&self) -> Packet<'_> {
        match self {
            Owned::Advertise(a) => Packet::Advertise(*a),
            Owned::SearchGw(radius) => Packet::SearchGw { radius: *radius },
            Owned::GwInfo(gw_id, gw_addr) => Packet::GwInfo(GwInfo { gw_id: *gw_id, gw_addr }),
            Owned::Connect(will, clean_session, duration, client_id) => Packet::Connect(Connect {
                will: *will,
                clean_session: *clean_session,
                duration: *duration,
                client_id,
            }),
            Owned::ConnAck(c) => Packet::ConnAck(*c),
            Owned::WillTopicReq => Packet::WillTopicReq,
            Owned::WillTopic(w) => Packet::WillTopic(will(w)),
            Owned::WillMsgReq => Packet::WillMsgReq,
            Owned::WillMsg(m) => Packet::WillMsg(m),
            Owned::Register(topic_id, msg_id, topic_name) => Packet::Register(Register {
                topic_id: *topic_id,
                msg_id: *msg_id,
                topic_name,
            }),
            Owned::RegAck(r) => Packet::RegAck(*r),
            Owned::Publish(dup, qos, retain, topic, msg_id, data) => Packet::Publish(Publish {
                dup: *dup,
                qos: *qos,
                retain: *retain,
                topic: *topic,
                msg_id: *msg_id,
                data,
            }),
            Owned::PubAck(p) => Packet::PubAck(*p),
            Owned::PubComp(id) => Packet::PubComp(*id),
            Owned::PubRec(id) => Packet::PubRec(*id),
            Owned::PubRel(id) => Packet::PubRel(*id),
            Owned::Subscribe(dup, qos, msg_id, topic) => Packet::Subscribe(Subscribe {
                dup: *dup,
                qos: *qos,
                msg_id: *msg_id,
                topic: topic.filter(),
            }),
            Owned::SubAck(s) => Packet::SubAck(*s),
            Owned::Unsubscribe(msg_id, topic) => Packet::Unsubscribe(Unsubscribe {
                msg_id: *msg_id,
                topic: topic.filter(),
            }),
            Owned::UnsubAck(id) => Packet::UnsubAck(*id),
            Owned::PingReq(c) => Packet::PingReq(c.as_deref()),
            Owned::PingResp => Packet::PingResp,
            Owned::Disconnect(d) => Packet::Disconnect(*d),
            Owned::WillTopicUpd(w) => Packet::WillTopicUpd(will(w)),
            Owned::WillTopicResp(c) => Packet::WillTopicResp(*c),
            Owned::WillMsgUpd(m) => Packet::WillMsgUpd(m),
            Owned::WillMsgResp(c) => Packet::WillMsgResp(*c),
            Owned::Encapsulated(radius, node_id, inner) => Packet::Encapsulated(Encapsulated {
                radius: *radius,
                node_id,
                inner,
            }),
        }
    }
}

/// Arbitrary UTF-8 of up to `max` characters (up to four octets each, so long strings
/// also exercise the three-octet length form).
fn utf8(min: usize, max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), min..=max).prop_map(String::from_iter)
}

fn octets(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

/// QoS 0, 1, 2: everywhere but PUBLISH.
fn qos012() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

/// QoS 0, 1, 2 and -1: PUBLISH.
fn any_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![qos012(), Just(QoS::MinusOne)]
}

fn return_code() -> impl Strategy<Value = ReturnCode> {
    any::<u8>().prop_map(ReturnCode::from_u8)
}

fn topic_ref() -> impl Strategy<Value = TopicRef> {
    prop_oneof![
        any::<u16>().prop_map(TopicRef::Normal),
        any::<u16>().prop_map(TopicRef::Predefined),
        any::<[u8; 2]>().prop_map(TopicRef::Short),
    ]
}

fn filter() -> impl Strategy<Value = OwnedFilter> {
    prop_oneof![
        utf8(0, 80).prop_map(OwnedFilter::Name),
        any::<u16>().prop_map(OwnedFilter::Predefined),
        any::<[u8; 2]>().prop_map(OwnedFilter::Short),
    ]
}

fn will_topic() -> impl Strategy<Value = Option<(QoS, bool, String)>> {
    proptest::option::of((qos012(), any::<bool>(), utf8(0, 80)))
}

/// Any valid packet of any variant.
fn packet() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (any::<u8>(), any::<u16>()).prop_map(|(gw_id, duration)| Owned::Advertise(Advertise { gw_id, duration })),
        any::<u8>().prop_map(Owned::SearchGw),
        (any::<u8>(), octets(20)).prop_map(|(g, a)| Owned::GwInfo(g, a)),
        (any::<bool>(), any::<bool>(), any::<u16>(), utf8(0, 80)).prop_map(|(w, c, d, id)| Owned::Connect(w, c, d, id)),
        return_code().prop_map(Owned::ConnAck),
        Just(Owned::WillTopicReq),
        will_topic().prop_map(Owned::WillTopic),
        Just(Owned::WillMsgReq),
        octets(400).prop_map(Owned::WillMsg),
        (any::<u16>(), any::<u16>(), utf8(0, 80)).prop_map(|(t, m, n)| Owned::Register(t, m, n)),
        (any::<u16>(), any::<u16>(), return_code())
            .prop_map(|(topic_id, msg_id, code)| { Owned::RegAck(RegAck { topic_id, msg_id, code }) }),
        (
            any::<bool>(),
            any_qos(),
            any::<bool>(),
            topic_ref(),
            any::<u16>(),
            octets(400)
        )
            .prop_map(|(d, q, r, t, m, data)| Owned::Publish(d, q, r, t, m, data)),
        (any::<u16>(), any::<u16>(), return_code())
            .prop_map(|(topic_id, msg_id, code)| { Owned::PubAck(PubAck { topic_id, msg_id, code }) }),
        any::<u16>().prop_map(Owned::PubComp),
        any::<u16>().prop_map(Owned::PubRec),
        any::<u16>().prop_map(Owned::PubRel),
        (any::<bool>(), qos012(), any::<u16>(), filter()).prop_map(|(d, q, m, t)| Owned::Subscribe(d, q, m, t)),
        (qos012(), any::<u16>(), any::<u16>(), return_code()).prop_map(|(qos, topic_id, msg_id, code)| Owned::SubAck(
            SubAck {
                qos,
                topic_id,
                msg_id,
                code,
            }
        )),
        (any::<u16>(), filter()).prop_map(|(m, t)| Owned::Unsubscribe(m, t)),
        any::<u16>().prop_map(Owned::UnsubAck),
        proptest::option::of(utf8(1, 40)).prop_map(Owned::PingReq),
        Just(Owned::PingResp),
        proptest::option::of(any::<u16>()).prop_map(Owned::Disconnect),
        will_topic().prop_map(Owned::WillTopicUpd),
        return_code().prop_map(Owned::WillTopicResp),
        octets(400).prop_map(Owned::WillMsgUpd),
        return_code().prop_map(Owned::WillMsgResp),
        (0u8..=3, octets(252), vec(any::<u8>(), 1..100)).prop_map(|(r, n, i)| Owned::Encapsulated(r, n, i)),
    ]
}

/// Message type octets, the defined ones far more often than the others.
fn type_octet() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => prop::sample::select(vec![
            0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D,
            0x0E, 0x0F, 0x10, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x1A, 0x1B, 0x1C,
            0x1D, 0xFE,
        ]),
        1 => any::<u8>(),
    ]
}

/// Bytes that start with a plausible header: a length that is mostly right (in either
/// form), a defined message type, then arbitrary flags and fields.
fn plausible() -> impl Strategy<Value = Vec<u8>> {
    (type_octet(), octets(320), 0u8..6, any::<u16>()).prop_map(|(t, body, how, wild)| {
        let short_total = body.len() + 2;
        let long_total = body.len() + 4;
        let mut v = Vec::with_capacity(long_total);
        match how {
            // The length form the encoder would pick.
            0..=2 if short_total <= 255 => v.push(short_total as u8),
            0..=2 => {
                v.push(0x01);
                v.extend_from_slice(&(long_total as u16).to_be_bytes());
            }
            // Always the three-octet form (decodes for any size; re-encodes canonical).
            3 => {
                v.push(0x01);
                v.extend_from_slice(&(long_total as u16).to_be_bytes());
            }
            // A wrong one-octet length.
            4 => v.push(wild as u8),
            // A wrong three-octet length.
            _ => {
                v.push(0x01);
                v.extend_from_slice(&wild.to_be_bytes());
            }
        }
        v.push(t);
        v.extend_from_slice(&body);
        v
    })
}

/// The canonical form of a buffer that decodes (spec 5.2.1, 5.4.4): the one-octet
/// Length whenever the message fits it, and the CONNECT flags that are "not used"
/// cleared. A forwarder encapsulation is left alone (its Length is one octet only and
/// its inner message is not decoded).
fn canonical(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if let [0x01, _, _, msg_type, body @ ..] = bytes {
        if *msg_type != 0xFE && body.len() + 2 <= 255 {
            v = [(body.len() + 2) as u8, *msg_type]
                .into_iter()
                .chain(body.iter().copied())
                .collect();
        }
    }
    let type_at = if v[0] == 0x01 { 3 } else { 1 };
    if v[type_at] == 0x04 {
        // Will and CleanSession only.
        v[type_at + 1] &= 0b0000_1100;
    }
    v
}

/// The invariants for one buffer.
fn check_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    let _ = peek_length(bytes);
    if let Ok(p) = Packet::decode(bytes) {
        let c = canonical(bytes);
        prop_assert_eq!(p.encoded_len(), c.len());
        let mut out = vec![0u8; c.len()];
        prop_assert_eq!(p.encode(&mut out), Ok(c.len()));
        prop_assert_eq!(&out[..], &c[..]);
        prop_assert_eq!(Packet::decode(&c), Ok(p));
        if !matches!(p, Packet::Encapsulated(_)) {
            prop_assert_eq!(peek_length(bytes).map(|(t, _)| t), Ok(bytes.len()));
        }
    }
    Ok(())
}

/// `cases` cases, and no regression files written into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn packet_round_trip(owned in packet()) {
        let p = owned.packet();
        let len = p.encoded_len();
        let mut buf = vec![0u8; len];
        prop_assert_eq!(p.encode(&mut buf), Ok(len));
        prop_assert_eq!(Packet::decode(&buf), Ok(p));
        // A stream framing finds the end (an encapsulation's inner octets are arbitrary
        // here, so only when they hold a message).
        if !matches!(p, Packet::Encapsulated(_)) {
            prop_assert_eq!(peek_length(&buf).map(|(total, _)| total), Ok(len));
        }
        if len > 0 {
            prop_assert_eq!(p.encode(&mut buf[..len - 1]), Err(Error::BufferTooSmall));
        }
        // Long form exactly when the short one cannot hold the message.
        if !matches!(p, Packet::Encapsulated(_)) {
            prop_assert_eq!(buf[0] == 0x01, len > 255);
        }
    }

    #[test]
    fn encapsulated_round_trip(
        radius in 0u8..=3,
        node_id in octets(252),
        inner in packet(),
    ) {
        let inner = inner.packet();
        let mut buf = vec![0u8; 3 + node_id.len() + inner.encoded_len()];
        let n = encode_encapsulated(radius, &node_id, &inner, &mut buf).unwrap();
        prop_assert_eq!(n, buf.len());
        let Packet::Encapsulated(e) = Packet::decode(&buf).unwrap() else {
            return Err(TestCaseError::fail("not encapsulated"));
        };
        prop_assert_eq!(e.radius, radius);
        prop_assert_eq!(e.node_id, &node_id[..]);
        prop_assert_eq!(Packet::decode(e.inner), Ok(inner));
        if !matches!(inner, Packet::Encapsulated(_)) {
            prop_assert_eq!(peek_length(&buf), Ok((n, 1)));
        }
    }

    #[test]
    fn arbitrary_bytes(bytes in octets(600)) {
        check_bytes(&bytes)?;
    }

    #[test]
    fn plausible_bytes(bytes in plausible()) {
        check_bytes(&bytes)?;
    }

    #[test]
    fn mutated_valid_packets(owned in packet(), at in any::<prop::sample::Index>(), x in any::<u8>()) {
        let p = owned.packet();
        let mut buf = vec![0u8; p.encoded_len()];
        p.encode(&mut buf).unwrap();
        let i = at.index(buf.len());
        buf[i] ^= x;
        check_bytes(&buf)?;
        // And every prefix.
        check_bytes(&buf[..i])?;
    }
}

#[cfg(feature = "bytes")]
proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn bytes_matches_slice(owned in packet()) {
        let p = owned.packet();
        let mut out = bytes::BytesMut::new();
        p.encode_to_bytes(&mut out).unwrap();
        let mut buf = vec![0u8; p.encoded_len()];
        p.encode(&mut buf).unwrap();
        prop_assert_eq!(&out[..], &buf[..]);
    }
}
