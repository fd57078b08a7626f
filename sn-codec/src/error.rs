//! Decode and encode errors.

use core::fmt;

use crate::QoS;

/// Why a buffer could not be decoded, or a packet could not be encoded.
///
/// Errors are values: decoding never panics and never reads past the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer ends before the message (or one of its fixed fields) does.
    Truncated,
    /// The length field disagrees with the size of the buffer.
    LengthMismatch {
        /// Length announced by the message header.
        declared: usize,
        /// Bytes actually available.
        actual: usize,
    },
    /// A length field smaller than its own header (a one-octet length below 2, a
    /// three-octet length below 4), or the three-octet form on a forwarder encapsulation.
    BadLength,
    /// The message type octet is not one the specification defines.
    UnknownType(u8),
    /// A request from a client that is well framed but asks for something this
    /// version does not define (a reserved value, a string that is not UTF-8). Unlike
    /// the other errors it is meant to be answered, with return code 0x03 "not
    /// supported", so that the sender stops retrying: `request` carries what the
    /// answer needs.
    Unsupported {
        /// The message refused, with the fields its answer echoes.
        request: Request,
        /// What is wrong with it.
        reason: Reason,
    },
    /// A QoS level that is not allowed in this message (QoS -1 in SUBACK; encoding:
    /// QoS -1 anywhere but PUBLISH).
    InvalidQos,
    /// A flag bit that this message type does not define is set.
    ReservedFlags,
    /// A string field not covered by [`Error::Unsupported`] (PINGREQ's client id) is
    /// not valid UTF-8.
    InvalidUtf8,
    /// CONNECT carried a protocol id other than 0x01.
    UnsupportedProtocol(u8),
    /// A field holds a value outside its allowed range (e.g. radius above 3,
    /// a topic id type that makes no sense for this message).
    InvalidField,
    /// Encoding: the message would be longer than 65535 octets.
    TooLong,
    /// Encoding: the caller's buffer is too small.
    BufferTooSmall,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("message truncated"),
            Error::LengthMismatch { declared, actual } => {
                write!(f, "length field says {declared} octets but {actual} are present")
            }
            Error::BadLength => f.write_str("malformed length field"),
            Error::UnknownType(t) => write!(f, "unknown message type 0x{t:02x}"),
            Error::Unsupported { request, reason } => {
                write!(f, "{} not supported: {reason}", request.name())
            }
            Error::InvalidQos => f.write_str("QoS level not allowed in this message"),
            Error::ReservedFlags => f.write_str("flag bit not defined for this message is set"),
            Error::InvalidUtf8 => f.write_str("string field is not valid UTF-8"),
            Error::UnsupportedProtocol(p) => write!(f, "unsupported protocol id 0x{p:02x}"),
            Error::InvalidField => f.write_str("field value out of range"),
            Error::TooLong => f.write_str("message longer than 65535 octets"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// A client request refused by the decoder ([`Error::Unsupported`]), with the fields
/// its answer needs. Each variant names the answer (spec 5.3.10, 0x03 "not supported").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// CONNECT: answered with CONNACK.
    Connect,
    /// WILLTOPIC: answered with CONNACK (the handshake fails).
    WillTopic,
    /// WILLTOPICUPD: answered with WILLTOPICRESP.
    WillTopicUpd,
    /// REGISTER: answered with REGACK.
    Register {
        /// TopicId field as sent.
        topic_id: u16,
        /// MsgId.
        msg_id: u16,
    },
    /// PUBLISH: answered with PUBACK (QoS 0, 1, 2); a QoS -1 one has nobody to answer.
    Publish {
        /// QoS of the PUBLISH.
        qos: QoS,
        /// The two TopicId octets as sent.
        topic_id: u16,
        /// MsgId.
        msg_id: u16,
    },
    /// SUBSCRIBE: answered with SUBACK.
    Subscribe {
        /// MsgId.
        msg_id: u16,
    },
    /// UNSUBSCRIBE: answered with UNSUBACK (which has no return code).
    Unsubscribe {
        /// MsgId.
        msg_id: u16,
    },
}

impl Request {
    /// The message type's name, for logs.
    pub const fn name(&self) -> &'static str {
        match self {
            Request::Connect => "CONNECT",
            Request::WillTopic => "WILLTOPIC",
            Request::WillTopicUpd => "WILLTOPICUPD",
            Request::Register { .. } => "REGISTER",
            Request::Publish { .. } => "PUBLISH",
            Request::Subscribe { .. } => "SUBSCRIBE",
            Request::Unsubscribe { .. } => "UNSUBSCRIBE",
        }
    }
}

/// Why a request is [`Error::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The reserved topic id type `0b11` (PUBLISH, SUBSCRIBE, UNSUBSCRIBE).
    ReservedTopicIdType,
    /// QoS bits `0b11` where QoS -1 means nothing (SUBSCRIBE, WILLTOPIC, WILLTOPICUPD).
    ReservedQos,
    /// The client id or topic name is not valid UTF-8.
    NotUtf8,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::ReservedTopicIdType => "reserved topic id type",
            Reason::ReservedQos => "QoS -1 not allowed in this message",
            Reason::NotUtf8 => "string field is not valid UTF-8",
        })
    }
}
