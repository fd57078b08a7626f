//! Hand-checked byte vectors, one or more for every message type, and one concrete
//! input for every error.
//!
//! Section numbers refer to "MQTT For Sensor Networks (MQTT-SN) Protocol Specification,
//! Version 1.2". Every vector is decoded and compared with the expected packet, and the
//! packet is encoded and compared with the vector, byte for byte.
#![allow(clippy::unwrap_used)]

use sn_codec::*;

/// Decodes `bytes`, compares with `expected`; encodes `expected`, compares with `bytes`.
#[track_caller]
fn check(bytes: &[u8], expected: Packet<'_>) {
    assert_eq!(Packet::decode(bytes), Ok(expected), "decode {bytes:02x?}");
    assert_eq!(expected.encoded_len(), bytes.len(), "encoded_len {expected:?}");
    let mut buf = [0u8; 400];
    let n = expected.encode(&mut buf).expect("encode");
    assert_eq!(&buf[..n], bytes, "encode {expected:?}");
    // The exact-size buffer is enough, one octet less is not.
    let mut exact = vec![0u8; bytes.len()];
    assert_eq!(expected.encode(&mut exact), Ok(bytes.len()));
    assert_eq!(
        expected.encode(&mut exact[..bytes.len() - 1]),
        Err(Error::BufferTooSmall)
    );
    // What a stream framing sees.
    assert_eq!(peek_length(bytes).map(|(total, _)| total), Ok(bytes.len()));
}

/// Decodes a non-canonical `bytes` to `expected`, which encodes to `canonical`.
#[track_caller]
fn check_lenient(bytes: &[u8], canonical: &[u8], expected: Packet<'_>) {
    assert_eq!(Packet::decode(bytes), Ok(expected), "decode {bytes:02x?}");
    assert_eq!(peek_length(bytes).map(|(total, _)| total), Ok(bytes.len()));
    check(canonical, expected);
}

#[track_caller]
fn decode_err(bytes: &[u8], err: Error) {
    assert_eq!(Packet::decode(bytes), Err(err), "decode {bytes:02x?}");
}

// 5.4.1 ADVERTISE: Length, MsgType, GwId, Duration(2).
#[test]
fn advertise() {
    check(
        &[0x05, 0x00, 0x01, 0x03, 0x84],
        Packet::Advertise(Advertise {
            gw_id: 1,
            duration: 900,
        }),
    );
}

// 5.4.2 SEARCHGW: Length, MsgType, Radius.
#[test]
fn searchgw() {
    check(&[0x03, 0x01, 0x01], Packet::SearchGw { radius: 1 });
}

// 5.4.3 GWINFO: Length, MsgType, GwId, GwAdd (only when sent by a client).
#[test]
fn gwinfo() {
    check(&[0x03, 0x02, 0x05], Packet::GwInfo(GwInfo { gw_id: 5, gw_addr: &[] }));
    check(
        &[0x07, 0x02, 0x05, 0xC0, 0xA8, 0x00, 0x01],
        Packet::GwInfo(GwInfo {
            gw_id: 5,
            gw_addr: &[192, 168, 0, 1],
        }),
    );
}

// 5.4.4 CONNECT: Length, MsgType, Flags (Will 0x08, CleanSession 0x04), ProtocolId 0x01,
// Duration(2), ClientId.
#[test]
fn connect() {
    check(
        &[0x0A, 0x04, 0x0C, 0x01, 0x00, 0x3C, b'd', b'e', b'v', b'1'],
        Packet::Connect(Connect {
            will: true,
            clean_session: true,
            duration: 60,
            client_id: "dev1",
        }),
    );
    check(
        &[0x07, 0x04, 0x04, 0x01, 0xFF, 0xFF, b'x'],
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 0xFFFF,
            client_id: "x",
        }),
    );
}

// 5.4.5 CONNACK: Length, MsgType, ReturnCode (5.3.10).
#[test]
fn connack() {
    check(&[0x03, 0x05, 0x00], Packet::ConnAck(ReturnCode::Accepted));
    check(&[0x03, 0x05, 0x01], Packet::ConnAck(ReturnCode::Congestion));
    // Reserved values are kept as they are.
    check(&[0x03, 0x05, 0x7F], Packet::ConnAck(ReturnCode::Reserved(0x7F)));
}

// 5.4.6 WILLTOPICREQ: header only.
#[test]
fn willtopicreq() {
    check(&[0x02, 0x06], Packet::WillTopicReq);
}

// 5.4.7 WILLTOPIC: Length, MsgType, Flags (QoS, Retain), WillTopic; the empty WILLTOPIC
// (two octets, no Flags, no WillTopic) deletes the will.
#[test]
fn willtopic() {
    check(
        &[0x06, 0x07, 0x30, b'w', b'/', b't'],
        Packet::WillTopic(Some(WillTopic {
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "w/t",
        })),
    );
    check(&[0x02, 0x07], Packet::WillTopic(None));
}

// 5.4.8 WILLMSGREQ: header only.
#[test]
fn willmsgreq() {
    check(&[0x02, 0x08], Packet::WillMsgReq);
}

// 5.4.9 WILLMSG: Length, MsgType, WillMsg.
#[test]
fn willmsg() {
    check(&[0x05, 0x09, b'b', b'y', b'e'], Packet::WillMsg(b"bye"));
    check(&[0x02, 0x09], Packet::WillMsg(b""));
}

// 5.4.10 REGISTER: Length, MsgType, TopicId(2), MsgId(2), TopicName.
#[test]
fn register() {
    check(
        &[0x09, 0x0A, 0x00, 0x00, 0x00, 0x01, b'a', b'/', b'b'],
        Packet::Register(Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "a/b",
        }),
    );
}

// 5.4.11 REGACK: Length, MsgType, TopicId(2), MsgId(2), ReturnCode.
#[test]
fn regack() {
    check(
        &[0x07, 0x0B, 0x00, 0x10, 0x00, 0x01, 0x00],
        Packet::RegAck(RegAck {
            topic_id: 0x0010,
            msg_id: 1,
            code: ReturnCode::Accepted,
        }),
    );
}

// 5.4.12 PUBLISH: Length, MsgType, Flags (DUP 0x80, QoS 0x60, Retain 0x10,
// TopicIdType 0x03), TopicId(2), MsgId(2), Data.
#[test]
fn publish_normal_topic_id() {
    // QoS 1 (0b01 << 5 = 0x20), topic id type 0b00.
    check(
        &[0x09, 0x0C, 0x20, 0x00, 0x10, 0x12, 0x34, b'h', b'i'],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Normal(0x0010),
            msg_id: 0x1234,
            data: b"hi",
        }),
    );
}

#[test]
fn publish_predefined_topic_id() {
    // QoS 0, Retain 0x10, topic id type 0b01.
    check(
        &[0x08, 0x0C, 0x11, 0x00, 0x01, 0x00, 0x00, 0xAA],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: TopicRef::Predefined(1),
            msg_id: 0,
            data: &[0xAA],
        }),
    );
}

#[test]
fn publish_short_topic_name() {
    // DUP 0x80, QoS 2 (0x40), topic id type 0b10; empty Data.
    check(
        &[0x07, 0x0C, 0xC2, b'a', b'b', 0x00, 0x07],
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: TopicRef::Short(*b"ab"),
            msg_id: 7,
            data: b"",
        }),
    );
}

// 5.4.12 with 6.8: QoS -1 is QoS bits 0b11 (0x60), here with a short topic name.
#[test]
fn publish_qos_minus_one() {
    check(
        &[0x08, 0x0C, 0x62, b't', b'1', 0x00, 0x00, b'x'],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::MinusOne,
            retain: false,
            topic: TopicRef::Short(*b"t1"),
            msg_id: 0,
            data: b"x",
        }),
    );
    // ... and with a predefined topic id.
    check(
        &[0x07, 0x0C, 0x61, 0x00, 0x2A, 0x00, 0x00],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::MinusOne,
            retain: false,
            topic: TopicRef::Predefined(42),
            msg_id: 0,
            data: b"",
        }),
    );
}

// 5.2.1: a message of 256 octets or more uses the three-octet Length 0x01, MSB, LSB.
// 300 = 0x012C octets: 4 header octets, 5 PUBLISH field octets, 291 octets of Data.
#[test]
fn publish_three_octet_length() {
    let data: Vec<u8> = (0..291u16).map(|i| i as u8).collect();
    let mut bytes = vec![0x01, 0x01, 0x2C, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00];
    bytes.extend_from_slice(&data);
    assert_eq!(bytes.len(), 300);
    check(
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicRef::Normal(1),
            msg_id: 0,
            data: &data,
        }),
    );
    assert_eq!(peek_length(&bytes), Ok((300, 3)));
}

// 5.2.1: "The 3-octet format should be used only for messages of 256 octets or more"
// permits the three-octet form on a short message, and some clients always use it. It
// decodes; encoding stays canonical (one-octet Length).
#[test]
fn three_octet_length_on_short_messages() {
    // PINGREQ: the smallest message in the three-octet form.
    check_lenient(&[0x01, 0x00, 0x04, 0x16], &[0x02, 0x16], Packet::PingReq(None));
    assert_eq!(peek_length(&[0x01, 0x00, 0x04, 0x16]), Ok((4, 3)));
    // PUBLISH QoS 0 "hi" to normal topic 1: 11 octets long form, 9 short.
    check_lenient(
        &[0x01, 0x00, 0x0B, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00, b'h', b'i'],
        &[0x09, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00, b'h', b'i'],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicRef::Normal(1),
            msg_id: 0,
            data: b"hi",
        }),
    );
    // CONNECT "c1", clean session, 60 s.
    check_lenient(
        &[0x01, 0x00, 0x0A, 0x04, 0x04, 0x01, 0x00, 0x3C, b'c', b'1'],
        &[0x08, 0x04, 0x04, 0x01, 0x00, 0x3C, b'c', b'1'],
        Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "c1",
        }),
    );
    // 257 octets in the three-octet form is 255 in the one-octet form.
    let mut long = vec![0x01, 0x01, 0x01, 0x09];
    long.extend_from_slice(&[0x42; 253]);
    let mut short = vec![0xFF, 0x09];
    short.extend_from_slice(&[0x42; 253]);
    check_lenient(&long, &short, Packet::WillMsg(&[0x42; 253]));
}

// 5.4.4: DUP, QoS, Retain and TopicIdType are "not used" in CONNECT: ignored, and
// written as zero.
#[test]
fn connect_ignores_unused_flags() {
    let expected = Packet::Connect(Connect {
        will: true,
        clean_session: false,
        duration: 60,
        client_id: "c",
    });
    let canonical = [0x07, 0x04, 0x08, 0x01, 0x00, 0x3C, b'c'];
    for unused in [0x80u8, 0x60, 0x20, 0x10, 0x03, 0x01, 0xF3] {
        check_lenient(
            &[0x07, 0x04, 0x08 | unused, 0x01, 0x00, 0x3C, b'c'],
            &canonical,
            expected,
        );
    }
}

// 5.2.1: where the form switches. A 255-octet message is the largest one-octet form; one
// more body octet gives 255 - 2 + 1 + 4 = 258 octets in the three-octet form.
#[test]
fn length_form_boundary() {
    let data = [0x55u8; 248];
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Normal(1),
        msg_id: 0,
        data: &data,
    });
    let mut buf = [0u8; 300];
    assert_eq!(p.encode(&mut buf), Ok(255));
    assert_eq!(buf[0], 0xFF);
    assert_eq!(Packet::decode(&buf[..255]), Ok(p));

    let data = [0x55u8; 249];
    let p = Packet::Publish(Publish {
        data: &data,
        ..match p {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    });
    assert_eq!(p.encode(&mut buf), Ok(258));
    assert_eq!(&buf[..4], &[0x01, 0x01, 0x02, 0x0C]);
    assert_eq!(Packet::decode(&buf[..258]), Ok(p));
}

// 5.4.13 PUBACK: Length, MsgType, TopicId(2), MsgId(2), ReturnCode.
#[test]
fn puback() {
    check(
        &[0x07, 0x0D, 0x00, 0x10, 0x12, 0x34, 0x02],
        Packet::PubAck(PubAck {
            topic_id: 0x0010,
            msg_id: 0x1234,
            code: ReturnCode::InvalidTopicId,
        }),
    );
}

// 5.4.14 PUBREC, PUBREL, PUBCOMP: Length, MsgType, MsgId(2).
#[test]
fn pubrec_pubrel_pubcomp() {
    check(&[0x04, 0x0E, 0x12, 0x34], Packet::PubComp(0x1234));
    check(&[0x04, 0x0F, 0x12, 0x34], Packet::PubRec(0x1234));
    check(&[0x04, 0x10, 0x12, 0x34], Packet::PubRel(0x1234));
}

// 5.4.15 SUBSCRIBE: Length, MsgType, Flags (DUP, QoS, TopicIdType), MsgId(2), then
// TopicName (type 0b00) or TopicId(2) (0b01 predefined, 0b10 short name).
#[test]
fn subscribe_by_name() {
    check(
        &[0x08, 0x12, 0x20, 0x00, 0x02, b's', b'/', b'#'],
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtLeastOnce,
            msg_id: 2,
            topic: TopicFilter::Name("s/#"),
        }),
    );
}

#[test]
fn subscribe_predefined() {
    check(
        &[0x07, 0x12, 0x01, 0x00, 0x03, 0x00, 0x05],
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 3,
            topic: TopicFilter::Predefined(5),
        }),
    );
}

#[test]
fn subscribe_short() {
    check(
        &[0x07, 0x12, 0xC2, 0x00, 0x04, b'a', b'b'],
        Packet::Subscribe(Subscribe {
            dup: true,
            qos: QoS::ExactlyOnce,
            msg_id: 4,
            topic: TopicFilter::Short(*b"ab"),
        }),
    );
}

// 5.4.16 SUBACK: Length, MsgType, Flags (QoS), TopicId(2), MsgId(2), ReturnCode.
#[test]
fn suback() {
    check(
        &[0x08, 0x13, 0x20, 0x00, 0x11, 0x00, 0x02, 0x00],
        Packet::SubAck(SubAck {
            qos: QoS::AtLeastOnce,
            topic_id: 0x0011,
            msg_id: 2,
            code: ReturnCode::Accepted,
        }),
    );
}

// 5.4.17 UNSUBSCRIBE: like SUBSCRIBE, Flags carry TopicIdType only.
#[test]
fn unsubscribe() {
    check(
        &[0x08, 0x14, 0x00, 0x00, 0x05, b's', b'/', b'#'],
        Packet::Unsubscribe(Unsubscribe {
            msg_id: 5,
            topic: TopicFilter::Name("s/#"),
        }),
    );
    check(
        &[0x07, 0x14, 0x01, 0x00, 0x06, 0x00, 0x05],
        Packet::Unsubscribe(Unsubscribe {
            msg_id: 6,
            topic: TopicFilter::Predefined(5),
        }),
    );
    check(
        &[0x07, 0x14, 0x02, 0x00, 0x07, b'a', b'b'],
        Packet::Unsubscribe(Unsubscribe {
            msg_id: 7,
            topic: TopicFilter::Short(*b"ab"),
        }),
    );
}

// 5.4.18 UNSUBACK: Length, MsgType, MsgId(2).
#[test]
fn unsuback() {
    check(&[0x04, 0x15, 0x00, 0x05], Packet::UnsubAck(5));
}

// 5.4.19 PINGREQ: Length, MsgType, ClientId (optional, only from a sleeping client).
#[test]
fn pingreq() {
    check(&[0x02, 0x16], Packet::PingReq(None));
    check(&[0x06, 0x16, b'd', b'e', b'v', b'1'], Packet::PingReq(Some("dev1")));
}

// 5.4.20 PINGRESP: header only.
#[test]
fn pingresp() {
    check(&[0x02, 0x17], Packet::PingResp);
}

// 5.4.21 DISCONNECT: Length, MsgType, Duration (optional, a client going to sleep).
#[test]
fn disconnect() {
    check(&[0x02, 0x18], Packet::Disconnect(None));
    check(&[0x04, 0x18, 0x0E, 0x10], Packet::Disconnect(Some(3600)));
}

// 5.4.22 WILLTOPICUPD: like WILLTOPIC; the empty one deletes the will.
#[test]
fn willtopicupd() {
    check(
        &[0x04, 0x1A, 0x40, b'w'],
        Packet::WillTopicUpd(Some(WillTopic {
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "w",
        })),
    );
    check(&[0x02, 0x1A], Packet::WillTopicUpd(None));
}

// 5.4.23 WILLTOPICRESP: Length, MsgType, ReturnCode.
#[test]
fn willtopicresp() {
    check(&[0x03, 0x1B, 0x00], Packet::WillTopicResp(ReturnCode::Accepted));
}

// 5.4.24 WILLMSGUPD: Length, MsgType, WillMsg.
#[test]
fn willmsgupd() {
    check(&[0x03, 0x1C, b'x'], Packet::WillMsgUpd(b"x"));
}

// 5.4.25 WILLMSGRESP: Length, MsgType, ReturnCode.
#[test]
fn willmsgresp() {
    check(&[0x03, 0x1D, 0x03], Packet::WillMsgResp(ReturnCode::NotSupported));
}

// 5.5 Forwarder encapsulation: Length (of this header only), MsgType 0xFE, Ctrl (bits 1..0
// radius), Wireless Node Id, then the encapsulated MQTT-SN message.
#[test]
fn encapsulated_publish() {
    let inner = [0x08, 0x0C, 0x62, b't', b'1', 0x00, 0x00, b'x'];
    let mut bytes = vec![0x05, 0xFE, 0x01, 0x12, 0x34];
    bytes.extend_from_slice(&inner);
    check(
        &bytes,
        Packet::Encapsulated(Encapsulated {
            radius: 1,
            node_id: &[0x12, 0x34],
            inner: &inner,
        }),
    );
    // The inner message decodes on its own.
    let Ok(Packet::Encapsulated(e)) = Packet::decode(&bytes) else {
        panic!("not encapsulated")
    };
    assert_eq!(
        Packet::decode(e.inner),
        Ok(Packet::Publish(Publish {
            dup: false,
            qos: QoS::MinusOne,
            retain: false,
            topic: TopicRef::Short(*b"t1"),
            msg_id: 0,
            data: b"x",
        }))
    );
    // encode_encapsulated writes the same bytes from the decoded inner packet.
    let mut buf = [0u8; 64];
    let inner_packet = Packet::decode(&inner).unwrap();
    let n = encode_encapsulated(1, &[0x12, 0x34], &inner_packet, &mut buf).unwrap();
    assert_eq!(&buf[..n], &bytes[..]);
    assert_eq!(
        encode_encapsulated(1, &[0x12, 0x34], &inner_packet, &mut buf[..12]),
        Err(Error::BufferTooSmall)
    );
    // Peeking sees through the encapsulation to the end of the inner message.
    assert_eq!(peek_length(&bytes), Ok((13, 1)));
    assert_eq!(peek_length(&bytes[..5]), Err(Error::Truncated));
}

#[test]
fn encapsulated_empty_node_id() {
    check(
        &[0x03, 0xFE, 0x00, 0x02, 0x17],
        Packet::Encapsulated(Encapsulated {
            radius: 0,
            node_id: &[],
            inner: &[0x02, 0x17],
        }),
    );
}

#[cfg(feature = "bytes")]
#[test]
fn encode_to_bytes_appends() {
    let mut out = bytes::BytesMut::from(&b"xx"[..]);
    Packet::PubRel(0x1234).encode_to_bytes(&mut out).unwrap();
    assert_eq!(&out[..], &[b'x', b'x', 0x04, 0x10, 0x12, 0x34]);
    // On error nothing is appended.
    assert_eq!(
        Packet::PingReq(Some("")).encode_to_bytes(&mut out),
        Err(Error::InvalidField)
    );
    assert_eq!(out.len(), 6);
}

#[test]
fn msg_type_octets() {
    for v in 0..=255u8 {
        match MsgType::try_from(v) {
            Ok(t) => assert_eq!(t as u8, v),
            Err(e) => assert_eq!(e, Error::UnknownType(v)),
        }
    }
    assert_eq!(Packet::PingResp.msg_type(), MsgType::PingResp);
}

// ----------------------------------------------------------------------------------------
// Errors: each variant from a concrete input.
// ----------------------------------------------------------------------------------------

#[test]
fn error_truncated() {
    decode_err(&[], Error::Truncated);
    // Length octet without MsgType.
    decode_err(&[0x02], Error::Truncated);
    // Three-octet form cut inside the length, then before MsgType.
    decode_err(&[0x01, 0x01], Error::Truncated);
    decode_err(&[0x01, 0x01, 0x2C], Error::Truncated);
    // PUBLISH whose length matches the buffer but ends inside MsgId.
    decode_err(&[0x06, 0x0C, 0x00, 0x00, 0x01, 0x00], Error::Truncated);
    // PUBACK one octet short.
    decode_err(&[0x06, 0x0D, 0x00, 0x10, 0x12, 0x34], Error::Truncated);
    // DISCONNECT with half a Duration.
    decode_err(&[0x03, 0x18, 0x0E], Error::Truncated);
    // SUBSCRIBE to a predefined id with one octet of it.
    decode_err(&[0x06, 0x12, 0x01, 0x00, 0x03, 0x00], Error::Truncated);
    // Encapsulation with nothing inside, and with a header longer than the buffer.
    decode_err(&[0x05, 0xFE, 0x01, 0x12, 0x34], Error::Truncated);
    decode_err(&[0x07, 0xFE, 0x01, 0x12, 0x34], Error::Truncated);
    assert_eq!(peek_length(&[]), Err(Error::Truncated));
    assert_eq!(peek_length(&[0x05]), Err(Error::Truncated));
}

#[test]
fn error_length_mismatch() {
    decode_err(&[0x05, 0x0C, 0x00], Error::LengthMismatch { declared: 5, actual: 3 });
    decode_err(&[0x02, 0x17, 0x00], Error::LengthMismatch { declared: 2, actual: 3 });
}

#[test]
fn error_bad_length() {
    // Three-octet form shorter than its own header (Length and MsgType).
    decode_err(&[0x01, 0x00, 0x03, 0x16], Error::BadLength);
    decode_err(&[0x01, 0x00, 0x00, 0x16], Error::BadLength);
    assert_eq!(peek_length(&[0x01, 0x00, 0x03, 0x16]), Err(Error::BadLength));
    // Three-octet form announcing 4 octets for a 6-octet buffer.
    decode_err(
        &[0x01, 0x00, 0x04, 0x10, 0x12, 0x34],
        Error::LengthMismatch { declared: 4, actual: 6 },
    );
    // One-octet length 0.
    decode_err(&[0x00, 0x17], Error::BadLength);
    // Encapsulation header shorter than Length, MsgType, Ctrl.
    decode_err(&[0x02, 0xFE, 0x02, 0x17], Error::BadLength);
    // Encapsulation header in the three-octet form (its Length is one octet only).
    let mut v = vec![0x01, 0x01, 0x02, 0xFE, 0x00];
    v.resize(258, 0x17);
    decode_err(&v, Error::BadLength);
    assert_eq!(peek_length(&v), Err(Error::BadLength));
}

#[test]
fn error_unknown_type() {
    decode_err(&[0x02, 0x03], Error::UnknownType(0x03));
    decode_err(&[0x02, 0x11], Error::UnknownType(0x11));
    decode_err(&[0x02, 0x19], Error::UnknownType(0x19));
    decode_err(&[0x02, 0xFF], Error::UnknownType(0xFF));
}

#[track_caller]
fn unsupported(bytes: &[u8], request: Request, reason: Reason) {
    decode_err(bytes, Error::Unsupported { request, reason });
}

#[test]
fn error_unsupported_reserved_topic_id_type() {
    // PUBLISH QoS 1 (flags 0x23), TopicId 0x1234, MsgId 0x0005.
    unsupported(
        &[0x07, 0x0C, 0x23, 0x12, 0x34, 0x00, 0x05],
        Request::Publish {
            qos: QoS::AtLeastOnce,
            topic_id: 0x1234,
            msg_id: 5,
        },
        Reason::ReservedTopicIdType,
    );
    unsupported(
        &[0x07, 0x0C, 0x03, 0x00, 0x01, 0x00, 0x00],
        Request::Publish {
            qos: QoS::AtMostOnce,
            topic_id: 1,
            msg_id: 0,
        },
        Reason::ReservedTopicIdType,
    );
    // SUBSCRIBE and UNSUBSCRIBE, MsgId 0x0001.
    unsupported(
        &[0x07, 0x12, 0x03, 0x00, 0x01, 0x00, 0x05],
        Request::Subscribe { msg_id: 1 },
        Reason::ReservedTopicIdType,
    );
    unsupported(
        &[0x07, 0x14, 0x03, 0x00, 0x01, 0x00, 0x05],
        Request::Unsubscribe { msg_id: 1 },
        Reason::ReservedTopicIdType,
    );
}

#[test]
fn error_unsupported_reserved_qos() {
    // SUBSCRIBE with QoS bits 0b11, MsgId 0x0001.
    unsupported(
        &[0x07, 0x12, 0x61, 0x00, 0x01, 0x00, 0x05],
        Request::Subscribe { msg_id: 1 },
        Reason::ReservedQos,
    );
    unsupported(
        &[0x08, 0x12, 0x60, 0x00, 0x02, b'a', b'/', b'b'],
        Request::Subscribe { msg_id: 2 },
        Reason::ReservedQos,
    );
    // WILLTOPIC and WILLTOPICUPD with QoS bits 0b11.
    unsupported(&[0x04, 0x07, 0x60, b'w'], Request::WillTopic, Reason::ReservedQos);
    unsupported(&[0x04, 0x1A, 0x60, b'w'], Request::WillTopicUpd, Reason::ReservedQos);
}

#[test]
fn error_unsupported_not_utf8() {
    // REGISTER, TopicId 0, MsgId 1, name 0xFF.
    unsupported(
        &[0x07, 0x0A, 0x00, 0x00, 0x00, 0x01, 0xFF],
        Request::Register { topic_id: 0, msg_id: 1 },
        Reason::NotUtf8,
    );
    // CONNECT with a truncated two-octet sequence as client id.
    unsupported(
        &[0x07, 0x04, 0x04, 0x01, 0x00, 0x3C, 0xC3],
        Request::Connect,
        Reason::NotUtf8,
    );
    // SUBSCRIBE and UNSUBSCRIBE by name, MsgId 7.
    unsupported(
        &[0x06, 0x12, 0x00, 0x00, 0x07, 0x80],
        Request::Subscribe { msg_id: 7 },
        Reason::NotUtf8,
    );
    unsupported(
        &[0x06, 0x14, 0x00, 0x00, 0x07, 0x80],
        Request::Unsubscribe { msg_id: 7 },
        Reason::NotUtf8,
    );
    // WILLTOPIC and WILLTOPICUPD.
    unsupported(&[0x04, 0x07, 0x00, 0xFE], Request::WillTopic, Reason::NotUtf8);
    unsupported(&[0x04, 0x1A, 0x20, 0xFE], Request::WillTopicUpd, Reason::NotUtf8);
}

#[test]
fn error_invalid_qos() {
    // SUBACK with QoS -1.
    decode_err(&[0x08, 0x13, 0x60, 0x00, 0x11, 0x00, 0x02, 0x00], Error::InvalidQos);
    // Encoding refuses them too.
    let mut buf = [0u8; 16];
    assert_eq!(
        Packet::SubAck(SubAck {
            qos: QoS::MinusOne,
            topic_id: 1,
            msg_id: 1,
            code: ReturnCode::Accepted,
        })
        .encode(&mut buf),
        Err(Error::InvalidQos)
    );
    assert_eq!(
        Packet::WillTopicUpd(Some(WillTopic {
            qos: QoS::MinusOne,
            retain: false,
            topic: "w",
        }))
        .encode(&mut buf),
        Err(Error::InvalidQos)
    );
}

#[test]
fn error_reserved_flags() {
    // PUBLISH with Will set.
    decode_err(&[0x07, 0x0C, 0x08, 0x00, 0x01, 0x00, 0x00], Error::ReservedFlags);
    // SUBSCRIBE with Retain set.
    decode_err(&[0x07, 0x12, 0x11, 0x00, 0x01, 0x00, 0x05], Error::ReservedFlags);
    // SUBACK with a topic id type.
    decode_err(&[0x08, 0x13, 0x01, 0x00, 0x11, 0x00, 0x02, 0x00], Error::ReservedFlags);
    // UNSUBSCRIBE with QoS.
    decode_err(&[0x07, 0x14, 0x21, 0x00, 0x01, 0x00, 0x05], Error::ReservedFlags);
    // WILLTOPIC with CleanSession.
    decode_err(&[0x04, 0x07, 0x04, b'w'], Error::ReservedFlags);
    // Encapsulation Ctrl with bit 2 set.
    decode_err(&[0x03, 0xFE, 0x04, 0x02, 0x17], Error::ReservedFlags);
}

#[test]
fn error_invalid_utf8() {
    // PINGREQ's client id: nothing to answer it with.
    decode_err(&[0x03, 0x16, 0x80], Error::InvalidUtf8);
}

#[test]
fn error_unsupported_protocol() {
    decode_err(&[0x06, 0x04, 0x00, 0x02, 0x00, 0x3C], Error::UnsupportedProtocol(0x02));
}

#[test]
fn error_invalid_field() {
    // PUBACK with one octet too many.
    decode_err(&[0x08, 0x0D, 0x00, 0x10, 0x12, 0x34, 0x02, 0x00], Error::InvalidField);
    // DISCONNECT with three octets after MsgType.
    decode_err(&[0x05, 0x18, 0x00, 0x01, 0x02], Error::InvalidField);
    // SUBSCRIBE to a short topic name of three octets.
    decode_err(&[0x08, 0x12, 0x02, 0x00, 0x04, b'a', b'b', b'c'], Error::InvalidField);
    // PINGRESP with a body.
    decode_err(&[0x03, 0x17, 0x00], Error::InvalidField);
    // Encoding: an empty client id in PINGREQ would decode as no client id.
    let mut buf = [0u8; 300];
    assert_eq!(Packet::PingReq(Some("")).encode(&mut buf), Err(Error::InvalidField));
    // Encoding: radius above 3, node id too long for the one-octet Length, empty inner.
    let inner = [0x02, 0x17];
    let e = |radius, node_id, inner| Packet::Encapsulated(Encapsulated { radius, node_id, inner });
    assert_eq!(e(4, &[], &inner).encode(&mut buf), Err(Error::InvalidField));
    assert_eq!(e(0, &[0u8; 253], &inner).encode(&mut buf), Err(Error::InvalidField));
    assert_eq!(e(0, &[0u8; 252], &inner).encode(&mut buf), Ok(257));
    assert_eq!(e(0, &[], &[]).encode(&mut buf), Err(Error::InvalidField));
    assert_eq!(
        encode_encapsulated(4, &[], &Packet::PingResp, &mut buf),
        Err(Error::InvalidField)
    );
}

#[test]
fn error_too_long() {
    // 65535 - 4 - 5 octets of Data is the largest PUBLISH.
    let data = vec![0u8; 65535 - 9 + 1];
    let mut p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Normal(1),
        msg_id: 0,
        data: &data,
    };
    let mut buf = vec![0u8; 70000];
    assert_eq!(Packet::Publish(p).encode(&mut buf), Err(Error::TooLong));
    p.data = &data[1..];
    assert_eq!(Packet::Publish(p).encode(&mut buf), Ok(65535));
    assert_eq!(Packet::decode(&buf[..65535]), Ok(Packet::Publish(p)));
}

#[test]
fn error_buffer_too_small() {
    let mut buf = [0u8; 3];
    assert_eq!(Packet::PubRel(1).encode(&mut buf), Err(Error::BufferTooSmall));
    assert_eq!(Packet::PubRel(1).encode(&mut []), Err(Error::BufferTooSmall));
}
