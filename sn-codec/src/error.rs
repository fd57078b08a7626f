//! Decode and encode errors.

use core::fmt;

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
    /// The three-octet length form was used for a message shorter than 256 octets,
    /// or a length field smaller than its own header.
    BadLength,
    /// The message type octet is not one the specification defines.
    UnknownType(u8),
    /// The reserved topic id type `0b11` was used.
    ReservedTopicIdType,
    /// A QoS level that is not allowed in this message (e.g. QoS -1 in SUBSCRIBE).
    InvalidQos,
    /// A flag bit that this message type does not define is set.
    ReservedFlags,
    /// A topic name or client id is not valid UTF-8.
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
            Error::ReservedTopicIdType => f.write_str("reserved topic id type"),
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
