//! MQTT-SN v1.2 messages: typed representations, decode and encode.
//!
//! Section numbers in comments refer to "MQTT For Sensor Networks (MQTT-SN) Protocol
//! Specification, Version 1.2" (November 2013).

use crate::{Error, Reason, Request};

/// Message type octet values (spec 5.2.2, table 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum MsgType {
    Advertise = 0x00,
    SearchGw = 0x01,
    GwInfo = 0x02,
    Connect = 0x04,
    ConnAck = 0x05,
    WillTopicReq = 0x06,
    WillTopic = 0x07,
    WillMsgReq = 0x08,
    WillMsg = 0x09,
    Register = 0x0A,
    RegAck = 0x0B,
    Publish = 0x0C,
    PubAck = 0x0D,
    PubComp = 0x0E,
    PubRec = 0x0F,
    PubRel = 0x10,
    Subscribe = 0x12,
    SubAck = 0x13,
    Unsubscribe = 0x14,
    UnsubAck = 0x15,
    PingReq = 0x16,
    PingResp = 0x17,
    Disconnect = 0x18,
    WillTopicUpd = 0x1A,
    WillTopicResp = 0x1B,
    WillMsgUpd = 0x1C,
    WillMsgResp = 0x1D,
    Encapsulated = 0xFE,
}

/// QoS level, including MQTT-SN's QoS -1 ("publish without connection", spec 6.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    /// QoS 0.
    AtMostOnce,
    /// QoS 1.
    AtLeastOnce,
    /// QoS 2.
    ExactlyOnce,
    /// QoS -1 (flag bits `0b11`): PUBLISH without a connection, predefined or short topics only.
    MinusOne,
}

impl QoS {
    /// The two QoS bits as they sit in bits 6..5 of the flags octet, shifted down (0..=3).
    pub const fn bits(self) -> u8 {
        match self {
            QoS::AtMostOnce => 0b00,
            QoS::AtLeastOnce => 0b01,
            QoS::ExactlyOnce => 0b10,
            QoS::MinusOne => 0b11,
        }
    }

    /// The QoS from its two bits (only the low two bits of `bits` are looked at).
    pub const fn from_bits(bits: u8) -> QoS {
        match bits & 0b11 {
            0b00 => QoS::AtMostOnce,
            0b01 => QoS::AtLeastOnce,
            0b10 => QoS::ExactlyOnce,
            _ => QoS::MinusOne,
        }
    }
}

/// A return code (spec 5.3.10). Unknown values are kept so that they re-encode unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReturnCode {
    /// 0x00 Accepted.
    Accepted,
    /// 0x01 Rejected: congestion.
    Congestion,
    /// 0x02 Rejected: invalid topic ID.
    InvalidTopicId,
    /// 0x03 Rejected: not supported.
    NotSupported,
    /// 0x04..=0xFF, reserved by the specification.
    Reserved(u8),
}

impl ReturnCode {
    /// The octet on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            ReturnCode::Accepted => 0,
            ReturnCode::Congestion => 1,
            ReturnCode::InvalidTopicId => 2,
            ReturnCode::NotSupported => 3,
            ReturnCode::Reserved(v) => v,
        }
    }

    /// The return code for an octet. `Reserved` is produced only for 0x04..=0xFF.
    pub const fn from_u8(v: u8) -> ReturnCode {
        match v {
            0 => ReturnCode::Accepted,
            1 => ReturnCode::Congestion,
            2 => ReturnCode::InvalidTopicId,
            3 => ReturnCode::NotSupported,
            v => ReturnCode::Reserved(v),
        }
    }
}

/// The topic of a PUBLISH: which kind of id, and its value (flags bits 1..0 plus the
/// two-octet TopicId field, spec 5.3.4 and 5.3.11). A typed enum so that a normal id
/// can never be sent as a predefined one by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicRef {
    /// A topic id registered with REGISTER/REGACK or SUBACK (type `0b00`).
    Normal(u16),
    /// A predefined topic id known to both sides in advance (type `0b01`).
    Predefined(u16),
    /// A short topic name of exactly two octets (type `0b10`).
    Short([u8; 2]),
}

/// The topic of a SUBSCRIBE or UNSUBSCRIBE (spec 5.4.15, 5.4.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicFilter<'a> {
    /// A topic name or filter, possibly with wildcards (type `0b00`).
    Name(&'a str),
    /// A predefined topic id (type `0b01`).
    Predefined(u16),
    /// A two-octet short topic name (type `0b10`).
    Short([u8; 2]),
}

/// ADVERTISE (spec 5.4.1): broadcast periodically by a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Advertise {
    /// Id of the gateway.
    pub gw_id: u8,
    /// Seconds until the next ADVERTISE.
    pub duration: u16,
}

/// GWINFO (spec 5.4.3): answer to SEARCHGW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GwInfo<'a> {
    /// Id of the gateway.
    pub gw_id: u8,
    /// Address of the gateway; present only when a client answers on a gateway's behalf,
    /// empty when the gateway itself sends GWINFO.
    pub gw_addr: &'a [u8],
}

/// CONNECT (spec 5.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connect<'a> {
    /// The client asks for the will handshake (WILL flag).
    pub will: bool,
    /// CLEAN SESSION flag.
    pub clean_session: bool,
    /// Keep-alive duration in seconds (0: none).
    pub duration: u16,
    /// Client identifier.
    pub client_id: &'a str,
}

/// The content of WILLTOPIC and WILLTOPICUPD when not empty (spec 5.4.7, 5.4.22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WillTopic<'a> {
    /// QoS of the will message (0, 1 or 2).
    pub qos: QoS,
    /// RETAIN flag of the will message.
    pub retain: bool,
    /// The will topic name.
    pub topic: &'a str,
}

/// REGISTER (spec 5.4.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Register<'a> {
    /// 0x0000 when sent by a client; the assigned id when sent by a gateway.
    pub topic_id: u16,
    /// Message id.
    pub msg_id: u16,
    /// The topic name.
    pub topic_name: &'a str,
}

/// REGACK (spec 5.4.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegAck {
    /// The topic id assigned (gateway to client) or echoed.
    pub topic_id: u16,
    /// Message id of the REGISTER acknowledged.
    pub msg_id: u16,
    /// Outcome.
    pub code: ReturnCode,
}

/// PUBLISH (spec 5.4.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Publish<'a> {
    /// DUP flag: this is a retransmission.
    pub dup: bool,
    /// QoS level, -1 included.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// The topic, with its id type.
    pub topic: TopicRef,
    /// Message id (0x0000 for QoS 0 and -1).
    pub msg_id: u16,
    /// The payload.
    pub data: &'a [u8],
}

/// PUBACK (spec 5.4.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PubAck {
    /// Topic id of the PUBLISH acknowledged (the two octets, whatever their type).
    pub topic_id: u16,
    /// Message id of the PUBLISH acknowledged.
    pub msg_id: u16,
    /// Outcome.
    pub code: ReturnCode,
}

/// SUBSCRIBE (spec 5.4.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscribe<'a> {
    /// DUP flag.
    pub dup: bool,
    /// Requested QoS (0, 1 or 2).
    pub qos: QoS,
    /// Message id.
    pub msg_id: u16,
    /// What to subscribe to.
    pub topic: TopicFilter<'a>,
}

/// SUBACK (spec 5.4.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubAck {
    /// Granted QoS.
    pub qos: QoS,
    /// Topic id assigned (0x0000 for wildcard filters).
    pub topic_id: u16,
    /// Message id of the SUBSCRIBE acknowledged.
    pub msg_id: u16,
    /// Outcome.
    pub code: ReturnCode,
}

/// UNSUBSCRIBE (spec 5.4.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Unsubscribe<'a> {
    /// Message id.
    pub msg_id: u16,
    /// What to unsubscribe from.
    pub topic: TopicFilter<'a>,
}

/// Forwarder encapsulation (spec 5.5): a message relayed by a forwarder on behalf of a
/// wireless node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encapsulated<'a> {
    /// Broadcast radius (Ctrl octet bits 1..0, 0..=3).
    pub radius: u8,
    /// The wireless node id (its address on the radio), any length.
    pub node_id: &'a [u8],
    /// The encapsulated MQTT-SN message, undecoded: decode it with [`Packet::decode`].
    pub inner: &'a [u8],
}

/// Any MQTT-SN v1.2 message, borrowing its variable-length fields from the buffer it was
/// decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Packet<'a> {
    /// ADVERTISE.
    Advertise(Advertise),
    /// SEARCHGW with its broadcast radius.
    SearchGw {
        /// Broadcast radius.
        radius: u8,
    },
    /// GWINFO.
    GwInfo(GwInfo<'a>),
    /// CONNECT.
    Connect(Connect<'a>),
    /// CONNACK.
    ConnAck(ReturnCode),
    /// WILLTOPICREQ.
    WillTopicReq,
    /// WILLTOPIC; `None` is the empty WILLTOPIC (two octets) that deletes the will.
    WillTopic(Option<WillTopic<'a>>),
    /// WILLMSGREQ.
    WillMsgReq,
    /// WILLMSG.
    WillMsg(&'a [u8]),
    /// REGISTER.
    Register(Register<'a>),
    /// REGACK.
    RegAck(RegAck),
    /// PUBLISH.
    Publish(Publish<'a>),
    /// PUBACK.
    PubAck(PubAck),
    /// PUBCOMP with its message id.
    PubComp(u16),
    /// PUBREC with its message id.
    PubRec(u16),
    /// PUBREL with its message id.
    PubRel(u16),
    /// SUBSCRIBE.
    Subscribe(Subscribe<'a>),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe<'a>),
    /// UNSUBACK with its message id.
    UnsubAck(u16),
    /// PINGREQ, with the client id of a sleeping client waking up, or `None`.
    PingReq(Option<&'a str>),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT, with a sleep duration in seconds, or `None`.
    Disconnect(Option<u16>),
    /// WILLTOPICUPD; `None` (no flags, no topic) deletes the will.
    WillTopicUpd(Option<WillTopic<'a>>),
    /// WILLTOPICRESP.
    WillTopicResp(ReturnCode),
    /// WILLMSGUPD.
    WillMsgUpd(&'a [u8]),
    /// WILLMSGRESP.
    WillMsgResp(ReturnCode),
    /// Forwarder-encapsulated message.
    Encapsulated(Encapsulated<'a>),
}

impl TryFrom<u8> for MsgType {
    type Error = Error;

    /// The message type for a MsgType octet; [`Error::UnknownType`] for the values the
    /// specification reserves (0x03, 0x11, 0x19, 0x1E..=0xFD, 0xFF).
    #[inline]
    fn try_from(v: u8) -> Result<MsgType, Error> {
        Ok(match v {
            0x00 => MsgType::Advertise,
            0x01 => MsgType::SearchGw,
            0x02 => MsgType::GwInfo,
            0x04 => MsgType::Connect,
            0x05 => MsgType::ConnAck,
            0x06 => MsgType::WillTopicReq,
            0x07 => MsgType::WillTopic,
            0x08 => MsgType::WillMsgReq,
            0x09 => MsgType::WillMsg,
            0x0A => MsgType::Register,
            0x0B => MsgType::RegAck,
            0x0C => MsgType::Publish,
            0x0D => MsgType::PubAck,
            0x0E => MsgType::PubComp,
            0x0F => MsgType::PubRec,
            0x10 => MsgType::PubRel,
            0x12 => MsgType::Subscribe,
            0x13 => MsgType::SubAck,
            0x14 => MsgType::Unsubscribe,
            0x15 => MsgType::UnsubAck,
            0x16 => MsgType::PingReq,
            0x17 => MsgType::PingResp,
            0x18 => MsgType::Disconnect,
            0x1A => MsgType::WillTopicUpd,
            0x1B => MsgType::WillTopicResp,
            0x1C => MsgType::WillMsgUpd,
            0x1D => MsgType::WillMsgResp,
            0xFE => MsgType::Encapsulated,
            other => return Err(Error::UnknownType(other)),
        })
    }
}

/// Where every field sits, each offset named once (spec 5.2 to 5.5).
///
/// The offsets in the per-message modules count from the first octet after MsgType (the
/// message "body"), so they hold for both length forms. Only [`encap`] counts from the
/// start of the buffer, because the encapsulation header has a one-octet length only.
mod field {
    use core::ops::{Range, RangeFrom};

    /// A fixed-size field.
    pub type Field = Range<usize>;
    /// A variable-size field that runs to the end of the message.
    pub type Rest = RangeFrom<usize>;

    /// Message header: Length then MsgType (5.2.1, 5.2.2).
    pub mod header {
        use super::Field;
        /// The first octet of either length form.
        pub const LENGTH: usize = 0;
        /// A first octet of this value announces the three-octet length form.
        pub const LONG_MARKER: u8 = 0x01;
        /// The two-octet big-endian total length of the three-octet form.
        pub const LONG_LENGTH: Field = 1..3;
        /// MsgType in the one-octet length form.
        pub const SHORT_MSG_TYPE: usize = 1;
        /// MsgType in the three-octet length form.
        pub const LONG_MSG_TYPE: usize = 3;
        /// Octets before the body, one-octet length form.
        pub const SHORT_SIZE: usize = SHORT_MSG_TYPE + 1;
        /// Octets before the body, three-octet length form.
        pub const LONG_SIZE: usize = LONG_MSG_TYPE + 1;
        /// Largest total length the one-octet form can carry.
        pub const SHORT_MAX: usize = 0xFF;
        /// Largest total length the three-octet form can carry.
        pub const LONG_MAX: usize = 0xFFFF;
    }

    /// ADVERTISE (5.4.1).
    pub mod advertise {
        use super::Field;
        /// GwId.
        pub const GW_ID: usize = 0;
        /// Duration.
        pub const DURATION: Field = 1..3;
        /// Body size.
        pub const LEN: usize = DURATION.end;
    }

    /// SEARCHGW (5.4.2).
    pub mod searchgw {
        /// Radius.
        pub const RADIUS: usize = 0;
        /// Body size.
        pub const LEN: usize = RADIUS + 1;
    }

    /// GWINFO (5.4.3).
    pub mod gwinfo {
        use super::Rest;
        /// GwId.
        pub const GW_ID: usize = 0;
        /// GwAdd, optional.
        pub const GW_ADD: Rest = 1..;
    }

    /// CONNECT (5.4.4).
    pub mod connect {
        use super::{Field, Rest};
        /// Flags.
        pub const FLAGS: usize = 0;
        /// ProtocolId.
        pub const PROTOCOL_ID: usize = 1;
        /// Duration.
        pub const DURATION: Field = 2..4;
        /// ClientId.
        pub const CLIENT_ID: Rest = 4..;
        /// The only ProtocolId defined (5.3.8).
        pub const PROTOCOL_V1_2: u8 = 0x01;
    }

    /// Messages made of a ReturnCode only: CONNACK, WILLTOPICRESP, WILLMSGRESP
    /// (5.4.5, 5.4.23, 5.4.25).
    pub mod return_code {
        /// ReturnCode.
        pub const RETURN_CODE: usize = 0;
        /// Body size.
        pub const LEN: usize = RETURN_CODE + 1;
    }

    /// WILLTOPIC and WILLTOPICUPD (5.4.7, 5.4.22); an empty body is the empty message.
    pub mod will_topic {
        use super::Rest;
        /// Flags.
        pub const FLAGS: usize = 0;
        /// WillTopic.
        pub const WILL_TOPIC: Rest = 1..;
    }

    /// WILLMSG and WILLMSGUPD (5.4.9, 5.4.24).
    pub mod will_msg {
        use super::Rest;
        /// WillMsg.
        pub const WILL_MSG: Rest = 0..;
    }

    /// REGISTER (5.4.10).
    pub mod register {
        use super::{Field, Rest};
        /// TopicId.
        pub const TOPIC_ID: Field = 0..2;
        /// MsgId.
        pub const MSG_ID: Field = 2..4;
        /// TopicName.
        pub const TOPIC_NAME: Rest = 4..;
    }

    /// REGACK and PUBACK (5.4.11, 5.4.13): TopicId, MsgId, ReturnCode.
    pub mod ack {
        use super::Field;
        /// TopicId.
        pub const TOPIC_ID: Field = 0..2;
        /// MsgId.
        pub const MSG_ID: Field = 2..4;
        /// ReturnCode.
        pub const RETURN_CODE: usize = 4;
        /// Body size.
        pub const LEN: usize = RETURN_CODE + 1;
    }

    /// PUBLISH (5.4.12).
    pub mod publish {
        use super::{Field, Rest};
        /// Flags.
        pub const FLAGS: usize = 0;
        /// TopicId (or the two octets of a short topic name).
        pub const TOPIC_ID: Field = 1..3;
        /// MsgId.
        pub const MSG_ID: Field = 3..5;
        /// Data.
        pub const DATA: Rest = 5..;
    }

    /// PUBREC, PUBREL, PUBCOMP, UNSUBACK (5.4.14, 5.4.18): MsgId only.
    pub mod msg_id_only {
        use super::Field;
        /// MsgId.
        pub const MSG_ID: Field = 0..2;
        /// Body size.
        pub const LEN: usize = MSG_ID.end;
    }

    /// SUBSCRIBE and UNSUBSCRIBE (5.4.15, 5.4.17).
    pub mod subscribe {
        use super::{Field, Rest};
        /// Flags.
        pub const FLAGS: usize = 0;
        /// MsgId.
        pub const MSG_ID: Field = 1..3;
        /// TopicName (topic id type 0b00).
        pub const TOPIC_NAME: Rest = 3..;
        /// TopicId or short topic name (types 0b01 and 0b10).
        pub const TOPIC_ID: Field = 3..5;
    }

    /// SUBACK (5.4.16).
    pub mod suback {
        use super::Field;
        /// Flags.
        pub const FLAGS: usize = 0;
        /// TopicId.
        pub const TOPIC_ID: Field = 1..3;
        /// MsgId.
        pub const MSG_ID: Field = 3..5;
        /// ReturnCode.
        pub const RETURN_CODE: usize = 5;
        /// Body size.
        pub const LEN: usize = RETURN_CODE + 1;
    }

    /// PINGREQ (5.4.19).
    pub mod pingreq {
        use super::Rest;
        /// ClientId, optional.
        pub const CLIENT_ID: Rest = 0..;
    }

    /// DISCONNECT (5.4.21).
    pub mod disconnect {
        use super::Field;
        /// Duration, optional.
        pub const DURATION: Field = 0..2;
        /// Body size when Duration is present.
        pub const LEN: usize = DURATION.end;
    }

    /// Forwarder encapsulation header (5.5). Offsets count from the start of the buffer.
    pub mod encap {
        use super::Rest;
        /// Length of the encapsulation header (one octet only).
        pub const LENGTH: usize = 0;
        /// MsgType, 0xFE.
        pub const MSG_TYPE: usize = 1;
        /// Ctrl.
        pub const CTRL: usize = 2;
        /// Wireless Node Id, up to the end of the header.
        pub const NODE_ID: Rest = 3..;
        /// Smallest header: an empty Wireless Node Id.
        pub const MIN_LEN: usize = NODE_ID.start;
        /// Largest header the one-octet Length can describe.
        pub const MAX_LEN: usize = 0xFF;
        /// Ctrl bits 1..0: broadcast radius; bits 7..2 are reserved.
        pub const CTRL_RADIUS: u8 = 0b0000_0011;
    }
}

/// The Flags octet (spec 5.3.4) and which bits each message defines.
mod flags {
    /// DUP.
    pub const DUP: u8 = 0b1000_0000;
    /// QoS, two bits.
    pub const QOS: u8 = 0b0110_0000;
    /// Shift of the QoS bits.
    pub const QOS_SHIFT: u32 = 5;
    /// RETAIN.
    pub const RETAIN: u8 = 0b0001_0000;
    /// WILL.
    pub const WILL: u8 = 0b0000_1000;
    /// CLEAN SESSION.
    pub const CLEAN_SESSION: u8 = 0b0000_0100;
    /// TopicIdType, two bits.
    pub const TOPIC_ID_TYPE: u8 = 0b0000_0011;
    /// TopicIdType: normal topic id (PUBLISH) or topic name (SUBSCRIBE, UNSUBSCRIBE).
    pub const TOPIC_NORMAL: u8 = 0b00;
    /// TopicIdType: predefined topic id.
    pub const TOPIC_PREDEFINED: u8 = 0b01;
    /// TopicIdType: short topic name.
    pub const TOPIC_SHORT: u8 = 0b10;

    /// Bits CONNECT uses (5.4.4). The others (DUP, QoS, Retain, TopicIdType) are "not
    /// used" there: ignored on decoding, zero on encoding.
    pub const CONNECT: u8 = WILL | CLEAN_SESSION;
    /// Bits WILLTOPIC and WILLTOPICUPD define (5.4.7, 5.4.22).
    pub const WILL_TOPIC: u8 = QOS | RETAIN;
    /// Bits PUBLISH defines (5.4.12).
    pub const PUBLISH: u8 = DUP | QOS | RETAIN | TOPIC_ID_TYPE;
    /// Bits SUBSCRIBE defines (5.4.15).
    pub const SUBSCRIBE: u8 = DUP | QOS | TOPIC_ID_TYPE;
    /// Bits SUBACK defines (5.4.16).
    pub const SUBACK: u8 = QOS;
    /// Bits UNSUBSCRIBE defines (5.4.17).
    pub const UNSUBSCRIBE: u8 = TOPIC_ID_TYPE;

    /// `bit` as a boolean.
    #[inline(always)]
    pub const fn has(octet: u8, bit: u8) -> bool {
        octet & bit != 0
    }

    /// `bit` if `on`, else nothing.
    #[inline(always)]
    pub const fn set(on: bool, bit: u8) -> u8 {
        if on {
            bit
        } else {
            0
        }
    }
}

use field::{Field, Rest};

// ---------------------------------------------------------------------------------------
// Checked readers and writers: every access goes through `get`/`get_mut`.
// ---------------------------------------------------------------------------------------

#[inline(always)]
fn get_u8(b: &[u8], at: usize) -> Result<u8, Error> {
    b.get(at).copied().ok_or(Error::Truncated)
}

#[inline(always)]
fn get_u16(b: &[u8], f: Field) -> Result<u16, Error> {
    match b.get(f) {
        Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(Error::Truncated),
    }
}

#[inline(always)]
fn get_pair(b: &[u8], f: Field) -> Result<[u8; 2], Error> {
    match b.get(f) {
        Some(&[hi, lo]) => Ok([hi, lo]),
        _ => Err(Error::Truncated),
    }
}

#[inline(always)]
fn get_rest(b: &[u8], f: Rest) -> Result<&[u8], Error> {
    b.get(f).ok_or(Error::Truncated)
}

#[inline(always)]
fn get_str(b: &[u8], f: Rest) -> Result<&str, Error> {
    core::str::from_utf8(get_rest(b, f)?).map_err(|_| Error::InvalidUtf8)
}

/// A string field of a request that is answered when refused ([`Error::Unsupported`]).
#[inline(always)]
fn get_request_str(b: &[u8], f: Rest, request: Request) -> Result<&str, Error> {
    core::str::from_utf8(get_rest(b, f)?).map_err(|_| unsupported(request, Reason::NotUtf8))
}

#[inline(always)]
const fn unsupported(request: Request, reason: Reason) -> Error {
    Error::Unsupported { request, reason }
}

/// A fixed-size body: shorter is `Truncated`, longer is `InvalidField`.
#[inline(always)]
fn expect_len(body: &[u8], len: usize) -> Result<(), Error> {
    match body.len().cmp(&len) {
        core::cmp::Ordering::Equal => Ok(()),
        core::cmp::Ordering::Less => Err(Error::Truncated),
        core::cmp::Ordering::Greater => Err(Error::InvalidField),
    }
}

/// A body with fixed fields followed by a variable one.
#[inline(always)]
fn expect_min_len(body: &[u8], len: usize) -> Result<(), Error> {
    if body.len() < len {
        Err(Error::Truncated)
    } else {
        Ok(())
    }
}

/// Strictness: bits a message does not define must be zero.
#[inline(always)]
fn expect_flags(octet: u8, defined: u8) -> Result<(), Error> {
    if octet & !defined != 0 {
        Err(Error::ReservedFlags)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn qos_of(octet: u8) -> QoS {
    QoS::from_bits(octet >> flags::QOS_SHIFT)
}

#[inline(always)]
fn qos_bits(qos: QoS) -> u8 {
    qos.bits() << flags::QOS_SHIFT
}

#[inline(always)]
fn set_u8(b: &mut [u8], at: usize, v: u8) -> Result<(), Error> {
    *b.get_mut(at).ok_or(Error::BufferTooSmall)? = v;
    Ok(())
}

#[inline(always)]
fn set_pair(b: &mut [u8], f: Field, v: [u8; 2]) -> Result<(), Error> {
    match b.get_mut(f) {
        Some([hi, lo]) => {
            *hi = v[0];
            *lo = v[1];
            Ok(())
        }
        _ => Err(Error::BufferTooSmall),
    }
}

#[inline(always)]
fn set_u16(b: &mut [u8], f: Field, v: u16) -> Result<(), Error> {
    set_pair(b, f, v.to_be_bytes())
}

#[inline(always)]
fn set_rest(b: &mut [u8], f: Rest, v: &[u8]) -> Result<(), Error> {
    let end = f.start.checked_add(v.len()).ok_or(Error::BufferTooSmall)?;
    b.get_mut(f.start..end).ok_or(Error::BufferTooSmall)?.copy_from_slice(v);
    Ok(())
}

/// The length field alone: `(total_length, length_field_size)`.
#[inline(always)]
fn read_length(buf: &[u8]) -> Result<(usize, usize), Error> {
    use field::header::*;
    match buf.first() {
        None => Err(Error::Truncated),
        // Spec 5.2.1 says the three-octet form is for messages of 256 octets or more,
        // but some clients always use it; any total that covers its own header is taken.
        Some(&LONG_MARKER) => {
            let total = usize::from(get_u16(buf, LONG_LENGTH)?);
            if total < LONG_SIZE {
                Err(Error::BadLength)
            } else {
                Ok((total, LONG_MSG_TYPE))
            }
        }
        Some(&total) => {
            let total = usize::from(total);
            if total < SHORT_SIZE {
                Err(Error::BadLength)
            } else {
                Ok((total, SHORT_MSG_TYPE))
            }
        }
    }
}

/// Total length of a message whose body (after MsgType) is `body` octets, with the
/// length form the encoder picks.
#[inline(always)]
fn frame_len(body: usize) -> usize {
    use field::header::*;
    let short = body.saturating_add(SHORT_SIZE);
    if short <= SHORT_MAX {
        short
    } else {
        body.saturating_add(LONG_SIZE)
    }
}

/// Checks the encapsulation header fields and returns the header length.
#[inline]
fn encap_header_len(radius: u8, node_id: &[u8]) -> Result<usize, Error> {
    use field::encap::*;
    if radius & !CTRL_RADIUS != 0 {
        return Err(Error::InvalidField);
    }
    let len = MIN_LEN.saturating_add(node_id.len());
    if len > MAX_LEN {
        return Err(Error::InvalidField);
    }
    Ok(len)
}

/// Writes the encapsulation header (already checked) into `out`.
#[inline]
fn write_encap_header(out: &mut [u8], header_len: usize, radius: u8, node_id: &[u8]) -> Result<(), Error> {
    use field::encap::*;
    // `header_len` was checked against MAX_LEN (0xFF).
    set_u8(out, LENGTH, header_len as u8)?;
    set_u8(out, MSG_TYPE, MsgType::Encapsulated as u8)?;
    set_u8(out, CTRL, radius)?;
    set_rest(out, NODE_ID, node_id)
}

/// Encodes the forwarder encapsulation (spec 5.5) of `inner` into the start of `buf`:
/// the header (Length, MsgType 0xFE, Ctrl with the broadcast `radius`, the wireless
/// `node_id`) followed by `inner` encoded. Returns the number of octets written.
///
/// Errors: `InvalidField` when `radius` is above 3 or `node_id` is longer than 252 octets
/// (the header Length is one octet), `BufferTooSmall` when `buf` cannot hold it all, and
/// whatever encoding `inner` fails with.
pub fn encode_encapsulated(radius: u8, node_id: &[u8], inner: &Packet<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    let header_len = encap_header_len(radius, node_id)?;
    let inner_len = inner.prepare()?;
    let total = header_len.checked_add(inner_len).ok_or(Error::BufferTooSmall)?;
    let out = buf.get_mut(..total).ok_or(Error::BufferTooSmall)?;
    write_encap_header(out, header_len, radius, node_id)?;
    inner.write_prepared(out.get_mut(header_len..).ok_or(Error::BufferTooSmall)?, inner_len)?;
    Ok(total)
}

/// Reads the length header at the start of `buf` (spec 5.2.1).
///
/// Returns `(total_length, header_length)`: the total message length as announced, and
/// whether the header took 1 or 3 octets. Errors with `Truncated` when `buf` is too short
/// to hold the header itself, `BadLength` when the announced length is impossible.
/// Used by stream framings to find where a message ends.
///
/// The header read is Length and MsgType, so at least two octets (four in the
/// three-octet form) are needed. Lengths are checked as [`Packet::decode`] does: a
/// one-octet length below 2, or a three-octet length below 4, is `BadLength`; the
/// three-octet form is accepted for any size (spec 5.2.1 permits it).
///
/// For a forwarder-encapsulated message (MsgType 0xFE, spec 5.5) the Length field covers
/// the encapsulation header only, so the total returned is that header plus the length
/// announced by the encapsulated message (looked through any number of nested
/// encapsulations); `header_length` is then 1. While the buffer does not yet reach the
/// encapsulated message's own header the answer is `Truncated`.
pub fn peek_length(buf: &[u8]) -> Result<(usize, usize), Error> {
    let mut offset = 0usize;
    let mut first_header = None;
    loop {
        let rest = buf.get(offset..).ok_or(Error::Truncated)?;
        let (len, type_at) = read_length(rest)?;
        let header = *first_header.get_or_insert(type_at);
        if get_u8(rest, type_at)? != MsgType::Encapsulated as u8 {
            return Ok((offset.saturating_add(len), header));
        }
        if type_at != field::header::SHORT_MSG_TYPE || len < field::encap::MIN_LEN {
            return Err(Error::BadLength);
        }
        offset = offset.saturating_add(len);
    }
}

impl<'a> Packet<'a> {
    /// Decodes exactly one message occupying all of `buf`.
    ///
    /// Strict where strictness costs no interoperability: the length field must equal
    /// `buf.len()`, and flag bits a message type does not define must be zero.
    /// Lenient where the specification or common clients are: the three-octet length
    /// form is accepted for messages of any size (spec 5.2.1 permits it; some clients
    /// always use it), and the CONNECT flags marked "not used" (5.4.4) are ignored. So
    /// decoding then encoding gives the canonical form of a buffer: the same bytes,
    /// except that [`Packet::encode`] picks the one-octet length whenever it fits and
    /// writes unused CONNECT flags as zero.
    ///
    /// Client requests that are well framed but use a reserved value (topic id type
    /// `0b11`, QoS `0b11` in SUBSCRIBE or a will) or carry a client id or topic name that
    /// is not UTF-8 are [`Error::Unsupported`], which carries what an answer with
    /// return code 0x03 needs. Fixed-size messages (and fixed fields) that end
    /// early are `Truncated`; octets beyond what a message type defines are
    /// `InvalidField`. A forwarder-encapsulated message (spec 5.5) is the exception to
    /// "length equals `buf.len()`": its Length covers the encapsulation header only, and
    /// the rest of `buf`, which must not be empty, is the encapsulated message, left
    /// undecoded.
    pub fn decode(buf: &'a [u8]) -> Result<Packet<'a>, Error> {
        let (len, type_at) = read_length(buf)?;
        let msg_type = get_u8(buf, type_at)?;
        if msg_type == MsgType::Encapsulated as u8 {
            return if type_at == field::header::SHORT_MSG_TYPE {
                decode_encapsulated(buf, len)
            } else {
                // The encapsulation header has a one-octet Length only (5.5).
                Err(Error::BadLength)
            };
        }
        if len != buf.len() {
            return Err(Error::LengthMismatch {
                declared: len,
                actual: buf.len(),
            });
        }
        let msg_type = MsgType::try_from(msg_type)?;
        let body = buf.get(type_at + 1..).ok_or(Error::Truncated)?;
        decode_body(msg_type, body)
    }

    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Packet::Advertise(_) => MsgType::Advertise,
            Packet::SearchGw { .. } => MsgType::SearchGw,
            Packet::GwInfo(_) => MsgType::GwInfo,
            Packet::Connect(_) => MsgType::Connect,
            Packet::ConnAck(_) => MsgType::ConnAck,
            Packet::WillTopicReq => MsgType::WillTopicReq,
            Packet::WillTopic(_) => MsgType::WillTopic,
            Packet::WillMsgReq => MsgType::WillMsgReq,
            Packet::WillMsg(_) => MsgType::WillMsg,
            Packet::Register(_) => MsgType::Register,
            Packet::RegAck(_) => MsgType::RegAck,
            Packet::Publish(_) => MsgType::Publish,
            Packet::PubAck(_) => MsgType::PubAck,
            Packet::PubComp(_) => MsgType::PubComp,
            Packet::PubRec(_) => MsgType::PubRec,
            Packet::PubRel(_) => MsgType::PubRel,
            Packet::Subscribe(_) => MsgType::Subscribe,
            Packet::SubAck(_) => MsgType::SubAck,
            Packet::Unsubscribe(_) => MsgType::Unsubscribe,
            Packet::UnsubAck(_) => MsgType::UnsubAck,
            Packet::PingReq(_) => MsgType::PingReq,
            Packet::PingResp => MsgType::PingResp,
            Packet::Disconnect(_) => MsgType::Disconnect,
            Packet::WillTopicUpd(_) => MsgType::WillTopicUpd,
            Packet::WillTopicResp(_) => MsgType::WillTopicResp,
            Packet::WillMsgUpd(_) => MsgType::WillMsgUpd,
            Packet::WillMsgResp(_) => MsgType::WillMsgResp,
            Packet::Encapsulated(_) => MsgType::Encapsulated,
        }
    }

    /// Number of octets [`Packet::encode`] writes, length header included.
    ///
    /// For a packet that does not encode (see [`Packet::encode`]) this is the size it
    /// would have.
    pub fn encoded_len(&self) -> usize {
        match self {
            Packet::Encapsulated(e) => field::encap::MIN_LEN
                .saturating_add(e.node_id.len())
                .saturating_add(e.inner.len()),
            _ => frame_len(self.body_len()),
        }
    }

    /// Encodes into the start of `buf`, choosing the one- or three-octet length form
    /// automatically, and returns the number of octets written.
    ///
    /// Errors: `TooLong` beyond 65535 octets, `BufferTooSmall`, `InvalidQos` for QoS -1
    /// anywhere but PUBLISH, and `InvalidField` for values that cannot be put on the wire
    /// or would not decode back to the same packet: `PingReq(Some(""))` (an empty client
    /// id is the two-octet PINGREQ, i.e. `None`), and an `Encapsulated` whose radius is
    /// above 3, whose node id is longer than 252 octets or whose inner message is empty.
    /// On error the contents of `buf` are unspecified.
    #[inline]
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let total = self.prepare()?;
        let out = buf.get_mut(..total).ok_or(Error::BufferTooSmall)?;
        self.write_prepared(out, total)?;
        Ok(total)
    }

    /// Appends the encoding to `out` (same rules and errors as [`Packet::encode`]; on
    /// error `out` is left as it was).
    #[cfg(feature = "bytes")]
    pub fn encode_to_bytes(&self, out: &mut bytes::BytesMut) -> Result<(), Error> {
        let total = self.prepare()?;
        let start = out.len();
        out.resize(start.saturating_add(total), 0);
        let written = match out.get_mut(start..) {
            Some(dst) => self.write_prepared(dst, total),
            None => Err(Error::BufferTooSmall),
        };
        if written.is_err() {
            out.truncate(start);
        }
        written
    }

    /// Checks that the packet can be encoded and returns its total length.
    #[inline(always)]
    fn prepare(&self) -> Result<usize, Error> {
        match self {
            Packet::WillTopic(Some(w)) | Packet::WillTopicUpd(Some(w)) if w.qos == QoS::MinusOne => {
                return Err(Error::InvalidQos)
            }
            Packet::Subscribe(Subscribe { qos: QoS::MinusOne, .. })
            | Packet::SubAck(SubAck { qos: QoS::MinusOne, .. }) => return Err(Error::InvalidQos),
            Packet::PingReq(Some("")) => return Err(Error::InvalidField),
            Packet::Encapsulated(e) => {
                let header_len = encap_header_len(e.radius, e.node_id)?;
                if e.inner.is_empty() {
                    return Err(Error::InvalidField);
                }
                return header_len.checked_add(e.inner.len()).ok_or(Error::BufferTooSmall);
            }
            _ => {}
        }
        let total = frame_len(self.body_len());
        if total > field::header::LONG_MAX {
            return Err(Error::TooLong);
        }
        Ok(total)
    }

    /// Body size (octets after MsgType), not for `Encapsulated`.
    #[inline(always)]
    fn body_len(&self) -> usize {
        use field::*;
        match self {
            Packet::Advertise(_) => advertise::LEN,
            Packet::SearchGw { .. } => searchgw::LEN,
            Packet::GwInfo(g) => gwinfo::GW_ADD.start.saturating_add(g.gw_addr.len()),
            Packet::Connect(c) => connect::CLIENT_ID.start.saturating_add(c.client_id.len()),
            Packet::ConnAck(_) | Packet::WillTopicResp(_) | Packet::WillMsgResp(_) => return_code::LEN,
            Packet::WillTopicReq | Packet::WillMsgReq | Packet::PingResp => 0,
            Packet::WillTopic(w) | Packet::WillTopicUpd(w) => match w {
                None => 0,
                Some(w) => will_topic::WILL_TOPIC.start.saturating_add(w.topic.len()),
            },
            Packet::WillMsg(m) | Packet::WillMsgUpd(m) => will_msg::WILL_MSG.start.saturating_add(m.len()),
            Packet::Register(r) => register::TOPIC_NAME.start.saturating_add(r.topic_name.len()),
            Packet::RegAck(_) | Packet::PubAck(_) => ack::LEN,
            Packet::Publish(p) => publish::DATA.start.saturating_add(p.data.len()),
            Packet::PubComp(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::UnsubAck(_) => msg_id_only::LEN,
            Packet::Subscribe(Subscribe { topic, .. }) | Packet::Unsubscribe(Unsubscribe { topic, .. }) => {
                match topic {
                    TopicFilter::Name(n) => subscribe::TOPIC_NAME.start.saturating_add(n.len()),
                    TopicFilter::Predefined(_) | TopicFilter::Short(_) => subscribe::TOPIC_ID.end,
                }
            }
            Packet::SubAck(_) => suback::LEN,
            Packet::PingReq(c) => match c {
                None => 0,
                Some(c) => pingreq::CLIENT_ID.start.saturating_add(c.len()),
            },
            Packet::Disconnect(d) => match d {
                None => 0,
                Some(_) => disconnect::LEN,
            },
            Packet::Encapsulated(e) => e.inner.len(),
        }
    }

    /// Writes a packet `prepare` accepted into `out`, which is exactly `total` octets.
    #[inline(always)]
    fn write_prepared(&self, out: &mut [u8], total: usize) -> Result<(), Error> {
        use field::header::*;
        if let Packet::Encapsulated(e) = self {
            let header_len = encap_header_len(e.radius, e.node_id)?;
            write_encap_header(out, header_len, e.radius, e.node_id)?;
            return set_rest(out, header_len.., e.inner);
        }
        let msg_type = self.msg_type() as u8;
        let body_at = if total <= SHORT_MAX {
            // Checked just above: fits one octet.
            set_u8(out, LENGTH, total as u8)?;
            set_u8(out, SHORT_MSG_TYPE, msg_type)?;
            SHORT_SIZE
        } else {
            // `prepare` checked total <= LONG_MAX.
            set_u8(out, LENGTH, LONG_MARKER)?;
            set_u16(out, LONG_LENGTH, total as u16)?;
            set_u8(out, LONG_MSG_TYPE, msg_type)?;
            LONG_SIZE
        };
        let body = out.get_mut(body_at..).ok_or(Error::BufferTooSmall)?;
        self.write_body(body)
    }

    /// Writes the fields after MsgType.
    #[inline(always)]
    fn write_body(&self, b: &mut [u8]) -> Result<(), Error> {
        use field::*;
        match *self {
            Packet::Advertise(a) => {
                set_u8(b, advertise::GW_ID, a.gw_id)?;
                set_u16(b, advertise::DURATION, a.duration)
            }
            Packet::SearchGw { radius } => set_u8(b, searchgw::RADIUS, radius),
            Packet::GwInfo(g) => {
                set_u8(b, gwinfo::GW_ID, g.gw_id)?;
                set_rest(b, gwinfo::GW_ADD, g.gw_addr)
            }
            Packet::Connect(c) => {
                let f = flags::set(c.will, flags::WILL) | flags::set(c.clean_session, flags::CLEAN_SESSION);
                set_u8(b, connect::FLAGS, f)?;
                set_u8(b, connect::PROTOCOL_ID, connect::PROTOCOL_V1_2)?;
                set_u16(b, connect::DURATION, c.duration)?;
                set_rest(b, connect::CLIENT_ID, c.client_id.as_bytes())
            }
            Packet::ConnAck(rc) | Packet::WillTopicResp(rc) | Packet::WillMsgResp(rc) => {
                set_u8(b, return_code::RETURN_CODE, rc.to_u8())
            }
            Packet::WillTopicReq | Packet::WillMsgReq | Packet::PingResp => Ok(()),
            Packet::WillTopic(w) | Packet::WillTopicUpd(w) => match w {
                None => Ok(()),
                Some(w) => {
                    let f = qos_bits(w.qos) | flags::set(w.retain, flags::RETAIN);
                    set_u8(b, will_topic::FLAGS, f)?;
                    set_rest(b, will_topic::WILL_TOPIC, w.topic.as_bytes())
                }
            },
            Packet::WillMsg(m) | Packet::WillMsgUpd(m) => set_rest(b, will_msg::WILL_MSG, m),
            Packet::Register(r) => {
                set_u16(b, register::TOPIC_ID, r.topic_id)?;
                set_u16(b, register::MSG_ID, r.msg_id)?;
                set_rest(b, register::TOPIC_NAME, r.topic_name.as_bytes())
            }
            Packet::RegAck(RegAck { topic_id, msg_id, code }) | Packet::PubAck(PubAck { topic_id, msg_id, code }) => {
                set_u16(b, ack::TOPIC_ID, topic_id)?;
                set_u16(b, ack::MSG_ID, msg_id)?;
                set_u8(b, ack::RETURN_CODE, code.to_u8())
            }
            Packet::Publish(p) => {
                let (kind, id) = match p.topic {
                    TopicRef::Normal(id) => (flags::TOPIC_NORMAL, id.to_be_bytes()),
                    TopicRef::Predefined(id) => (flags::TOPIC_PREDEFINED, id.to_be_bytes()),
                    TopicRef::Short(name) => (flags::TOPIC_SHORT, name),
                };
                let f = flags::set(p.dup, flags::DUP) | qos_bits(p.qos) | flags::set(p.retain, flags::RETAIN) | kind;
                set_u8(b, publish::FLAGS, f)?;
                set_pair(b, publish::TOPIC_ID, id)?;
                set_u16(b, publish::MSG_ID, p.msg_id)?;
                set_rest(b, publish::DATA, p.data)
            }
            Packet::PubComp(id) | Packet::PubRec(id) | Packet::PubRel(id) | Packet::UnsubAck(id) => {
                set_u16(b, msg_id_only::MSG_ID, id)
            }
            Packet::Subscribe(s) => {
                let f = flags::set(s.dup, flags::DUP) | qos_bits(s.qos);
                write_filter(b, f, s.msg_id, s.topic)
            }
            Packet::Unsubscribe(u) => write_filter(b, 0, u.msg_id, u.topic),
            Packet::SubAck(s) => {
                set_u8(b, suback::FLAGS, qos_bits(s.qos))?;
                set_u16(b, suback::TOPIC_ID, s.topic_id)?;
                set_u16(b, suback::MSG_ID, s.msg_id)?;
                set_u8(b, suback::RETURN_CODE, s.code.to_u8())
            }
            Packet::PingReq(c) => match c {
                None => Ok(()),
                Some(c) => set_rest(b, pingreq::CLIENT_ID, c.as_bytes()),
            },
            Packet::Disconnect(d) => match d {
                None => Ok(()),
                Some(d) => set_u16(b, disconnect::DURATION, d),
            },
            // Handled by `write_prepared`.
            Packet::Encapsulated(_) => Err(Error::InvalidField),
        }
    }
}

/// SUBSCRIBE / UNSUBSCRIBE flags (with the topic id type added), MsgId and topic.
#[inline(always)]
fn write_filter(b: &mut [u8], f: u8, msg_id: u16, topic: TopicFilter<'_>) -> Result<(), Error> {
    use field::subscribe::*;
    set_u16(b, MSG_ID, msg_id)?;
    match topic {
        TopicFilter::Name(n) => {
            set_u8(b, FLAGS, f | flags::TOPIC_NORMAL)?;
            set_rest(b, TOPIC_NAME, n.as_bytes())
        }
        TopicFilter::Predefined(id) => {
            set_u8(b, FLAGS, f | flags::TOPIC_PREDEFINED)?;
            set_u16(b, TOPIC_ID, id)
        }
        TopicFilter::Short(name) => {
            set_u8(b, FLAGS, f | flags::TOPIC_SHORT)?;
            set_pair(b, TOPIC_ID, name)
        }
    }
}

/// SUBSCRIBE / UNSUBSCRIBE topic, after the flags were checked; `request` is what a
/// refusal answers.
#[inline(always)]
fn read_filter(b: &[u8], f: u8, request: Request) -> Result<TopicFilter<'_>, Error> {
    use field::subscribe::*;
    match f & flags::TOPIC_ID_TYPE {
        flags::TOPIC_NORMAL => Ok(TopicFilter::Name(get_request_str(b, TOPIC_NAME, request)?)),
        flags::TOPIC_PREDEFINED => {
            expect_len(b, TOPIC_ID.end)?;
            Ok(TopicFilter::Predefined(get_u16(b, TOPIC_ID)?))
        }
        flags::TOPIC_SHORT => {
            expect_len(b, TOPIC_ID.end)?;
            Ok(TopicFilter::Short(get_pair(b, TOPIC_ID)?))
        }
        _ => Err(unsupported(request, Reason::ReservedTopicIdType)),
    }
}

/// WILLTOPIC / WILLTOPICUPD body; `request` says which, for a refusal.
#[inline(always)]
fn read_will_topic(b: &[u8], request: Request) -> Result<Option<WillTopic<'_>>, Error> {
    use field::will_topic::*;
    if b.is_empty() {
        return Ok(None);
    }
    let f = get_u8(b, FLAGS)?;
    expect_flags(f, flags::WILL_TOPIC)?;
    let qos = qos_of(f);
    if qos == QoS::MinusOne {
        return Err(unsupported(request, Reason::ReservedQos));
    }
    Ok(Some(WillTopic {
        qos,
        retain: flags::has(f, flags::RETAIN),
        topic: get_request_str(b, WILL_TOPIC, request)?,
    }))
}

/// The forwarder encapsulation (5.5); `header_len` is its Length octet.
#[inline]
fn decode_encapsulated(buf: &[u8], header_len: usize) -> Result<Packet<'_>, Error> {
    use field::encap::*;
    if header_len < MIN_LEN {
        return Err(Error::BadLength);
    }
    let ctrl = get_u8(buf, CTRL)?;
    expect_flags(ctrl, CTRL_RADIUS)?;
    let node_id = buf.get(NODE_ID.start..header_len).ok_or(Error::Truncated)?;
    let inner = buf.get(header_len..).ok_or(Error::Truncated)?;
    if inner.is_empty() {
        return Err(Error::Truncated);
    }
    Ok(Packet::Encapsulated(Encapsulated {
        radius: ctrl,
        node_id,
        inner,
    }))
}

/// Everything after MsgType, for every type but the encapsulation.
#[inline(always)]
fn decode_body(msg_type: MsgType, b: &[u8]) -> Result<Packet<'_>, Error> {
    use field::*;
    Ok(match msg_type {
        MsgType::Advertise => {
            expect_len(b, advertise::LEN)?;
            Packet::Advertise(Advertise {
                gw_id: get_u8(b, advertise::GW_ID)?,
                duration: get_u16(b, advertise::DURATION)?,
            })
        }
        MsgType::SearchGw => {
            expect_len(b, searchgw::LEN)?;
            Packet::SearchGw {
                radius: get_u8(b, searchgw::RADIUS)?,
            }
        }
        MsgType::GwInfo => Packet::GwInfo(GwInfo {
            gw_id: get_u8(b, gwinfo::GW_ID)?,
            gw_addr: get_rest(b, gwinfo::GW_ADD)?,
        }),
        MsgType::Connect => {
            expect_min_len(b, connect::CLIENT_ID.start)?;
            // No `expect_flags`: the bits CONNECT does not use are "not used" (5.4.4),
            // not reserved, and clients that set them are common enough to accept.
            let f = get_u8(b, connect::FLAGS)? & flags::CONNECT;
            let protocol = get_u8(b, connect::PROTOCOL_ID)?;
            if protocol != connect::PROTOCOL_V1_2 {
                return Err(Error::UnsupportedProtocol(protocol));
            }
            Packet::Connect(Connect {
                will: flags::has(f, flags::WILL),
                clean_session: flags::has(f, flags::CLEAN_SESSION),
                duration: get_u16(b, connect::DURATION)?,
                client_id: get_request_str(b, connect::CLIENT_ID, Request::Connect)?,
            })
        }
        MsgType::ConnAck => Packet::ConnAck(read_return_code(b)?),
        MsgType::WillTopicReq => {
            expect_len(b, 0)?;
            Packet::WillTopicReq
        }
        MsgType::WillTopic => Packet::WillTopic(read_will_topic(b, Request::WillTopic)?),
        MsgType::WillMsgReq => {
            expect_len(b, 0)?;
            Packet::WillMsgReq
        }
        MsgType::WillMsg => Packet::WillMsg(get_rest(b, will_msg::WILL_MSG)?),
        MsgType::Register => {
            expect_min_len(b, register::TOPIC_NAME.start)?;
            let topic_id = get_u16(b, register::TOPIC_ID)?;
            let msg_id = get_u16(b, register::MSG_ID)?;
            let request = Request::Register { topic_id, msg_id };
            Packet::Register(Register {
                topic_id,
                msg_id,
                topic_name: get_request_str(b, register::TOPIC_NAME, request)?,
            })
        }
        MsgType::RegAck => {
            let (topic_id, msg_id, code) = read_ack(b)?;
            Packet::RegAck(RegAck { topic_id, msg_id, code })
        }
        MsgType::Publish => {
            expect_min_len(b, publish::DATA.start)?;
            let f = get_u8(b, publish::FLAGS)?;
            expect_flags(f, flags::PUBLISH)?;
            let id = get_pair(b, publish::TOPIC_ID)?;
            let qos = qos_of(f);
            let msg_id = get_u16(b, publish::MSG_ID)?;
            let topic = match f & flags::TOPIC_ID_TYPE {
                flags::TOPIC_NORMAL => TopicRef::Normal(u16::from_be_bytes(id)),
                flags::TOPIC_PREDEFINED => TopicRef::Predefined(u16::from_be_bytes(id)),
                flags::TOPIC_SHORT => TopicRef::Short(id),
                _ => {
                    let topic_id = u16::from_be_bytes(id);
                    let request = Request::Publish { qos, topic_id, msg_id };
                    return Err(unsupported(request, Reason::ReservedTopicIdType));
                }
            };
            Packet::Publish(Publish {
                dup: flags::has(f, flags::DUP),
                qos,
                retain: flags::has(f, flags::RETAIN),
                topic,
                msg_id,
                data: get_rest(b, publish::DATA)?,
            })
        }
        MsgType::PubAck => {
            let (topic_id, msg_id, code) = read_ack(b)?;
            Packet::PubAck(PubAck { topic_id, msg_id, code })
        }
        MsgType::PubComp => Packet::PubComp(read_msg_id(b)?),
        MsgType::PubRec => Packet::PubRec(read_msg_id(b)?),
        MsgType::PubRel => Packet::PubRel(read_msg_id(b)?),
        MsgType::Subscribe => {
            expect_min_len(b, subscribe::TOPIC_NAME.start)?;
            let f = get_u8(b, subscribe::FLAGS)?;
            expect_flags(f, flags::SUBSCRIBE)?;
            let msg_id = get_u16(b, subscribe::MSG_ID)?;
            let request = Request::Subscribe { msg_id };
            let qos = qos_of(f);
            if qos == QoS::MinusOne {
                return Err(unsupported(request, Reason::ReservedQos));
            }
            Packet::Subscribe(Subscribe {
                dup: flags::has(f, flags::DUP),
                qos,
                msg_id,
                topic: read_filter(b, f, request)?,
            })
        }
        MsgType::SubAck => {
            expect_len(b, suback::LEN)?;
            let f = get_u8(b, suback::FLAGS)?;
            expect_flags(f, flags::SUBACK)?;
            let qos = qos_of(f);
            if qos == QoS::MinusOne {
                return Err(Error::InvalidQos);
            }
            Packet::SubAck(SubAck {
                qos,
                topic_id: get_u16(b, suback::TOPIC_ID)?,
                msg_id: get_u16(b, suback::MSG_ID)?,
                code: ReturnCode::from_u8(get_u8(b, suback::RETURN_CODE)?),
            })
        }
        MsgType::Unsubscribe => {
            expect_min_len(b, subscribe::TOPIC_NAME.start)?;
            let f = get_u8(b, subscribe::FLAGS)?;
            expect_flags(f, flags::UNSUBSCRIBE)?;
            let msg_id = get_u16(b, subscribe::MSG_ID)?;
            Packet::Unsubscribe(Unsubscribe {
                msg_id,
                topic: read_filter(b, f, Request::Unsubscribe { msg_id })?,
            })
        }
        MsgType::UnsubAck => Packet::UnsubAck(read_msg_id(b)?),
        MsgType::PingReq => Packet::PingReq(if b.is_empty() {
            None
        } else {
            Some(get_str(b, pingreq::CLIENT_ID)?)
        }),
        MsgType::PingResp => {
            expect_len(b, 0)?;
            Packet::PingResp
        }
        MsgType::Disconnect => Packet::Disconnect(if b.is_empty() {
            None
        } else {
            expect_len(b, disconnect::LEN)?;
            Some(get_u16(b, disconnect::DURATION)?)
        }),
        MsgType::WillTopicUpd => Packet::WillTopicUpd(read_will_topic(b, Request::WillTopicUpd)?),
        MsgType::WillTopicResp => Packet::WillTopicResp(read_return_code(b)?),
        MsgType::WillMsgUpd => Packet::WillMsgUpd(get_rest(b, will_msg::WILL_MSG)?),
        MsgType::WillMsgResp => Packet::WillMsgResp(read_return_code(b)?),
        // `Packet::decode` handles 0xFE before it gets here.
        MsgType::Encapsulated => return Err(Error::BadLength),
    })
}

#[inline(always)]
fn read_return_code(b: &[u8]) -> Result<ReturnCode, Error> {
    use field::return_code::*;
    expect_len(b, LEN)?;
    Ok(ReturnCode::from_u8(get_u8(b, RETURN_CODE)?))
}

#[inline(always)]
fn read_msg_id(b: &[u8]) -> Result<u16, Error> {
    use field::msg_id_only::*;
    expect_len(b, LEN)?;
    get_u16(b, MSG_ID)
}

#[inline(always)]
fn read_ack(b: &[u8]) -> Result<(u16, u16, ReturnCode), Error> {
    use field::ack::*;
    expect_len(b, LEN)?;
    Ok((
        get_u16(b, TOPIC_ID)?,
        get_u16(b, MSG_ID)?,
        ReturnCode::from_u8(get_u8(b, RETURN_CODE)?),
    ))
}
