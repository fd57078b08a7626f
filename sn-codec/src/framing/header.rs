//! The MQTT-SN length header (spec 5.2.1), parsed here rather than with
//! `crate::peek_length` so that the framings do not depend on the packet module's
//! strictness rules.

/// MsgType of a forwarder encapsulation (spec 5.5). Its Length octet covers only the
/// encapsulation header (Length, MsgType, Ctrl, Wireless Node Id); the encapsulated
/// message follows with its own length header.
const ENCAPSULATED: u8 = 0xFE;

/// Smallest encapsulation header: Length, MsgType, Ctrl and an empty node id.
const ENCAP_MIN_LEN: usize = 3;

/// What the octets at the start of the raw decoder's buffer look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Not enough octets yet to judge.
    NeedMore,
    /// Cannot be the start of a message: drop one octet and look again.
    Noise,
    /// A plausible header announcing a message longer than the decoder can hold.
    TooLong,
    /// A plausible header announcing a message of this many octets.
    Frame(usize),
}

/// Whether `t` is a message type octet defined by MQTT-SN v1.2 (spec 5.2.2, table 3).
pub(super) const fn is_known_type(t: u8) -> bool {
    matches!(t, 0x00..=0x02 | 0x04..=0x10 | 0x12..=0x18 | 0x1A..=0x1D | 0xFE)
}

/// Whether the length header at the start of `message` announces exactly
/// `message.len()` octets, room for the type octet included (either form; the three-octet form is not required to be
/// used only for 256 octets or more here: that is the packet decoder's business).
///
/// A forwarder encapsulation (one-octet Length, MsgType 0xFE) announces only its header;
/// it must be followed by exactly one message that announces its own length (itself
/// possibly encapsulated).
pub(super) fn announces_own_length(message: &[u8]) -> bool {
    let mut m = message;
    loop {
        let (declared, header_len) = match m {
            [0x01, hi, lo, ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), 3),
            [0x00 | 0x01, ..] | [] => return false,
            [n, ..] => (usize::from(*n), 1),
        };
        if m.get(header_len) == Some(&ENCAPSULATED) {
            if header_len != 1 || declared < ENCAP_MIN_LEN {
                return false;
            }
            match m.get(declared..) {
                Some(inner) if !inner.is_empty() => {
                    m = inner;
                    continue;
                }
                _ => return false,
            }
        }
        // The message type octet must be there too.
        return declared == m.len() && declared > header_len;
    }
}

/// One length header judged on its own.
enum One {
    NeedMore,
    Noise,
    /// A message of this many octets.
    Message(usize),
    /// An encapsulation header of this many octets; the encapsulated message follows.
    Encapsulation(usize),
}

fn check_one(prefix: &[u8]) -> One {
    let Some(&first) = prefix.first() else {
        return One::NeedMore;
    };
    let (total, header_len) = match first {
        // A length of 0 does not exist.
        0x00 => return One::Noise,
        // Three-octet form: 0x01, then the length big-endian. Senders must use it only
        // from 256 octets on (spec 5.2.1), but some always use it, and the packet decoder
        // accepts it on short messages too: so does the framer, from the smallest
        // message it can hold (three length octets and the type).
        0x01 => {
            let (Some(&hi), Some(&lo)) = (prefix.get(1), prefix.get(2)) else {
                return One::NeedMore;
            };
            let total = usize::from(u16::from_be_bytes([hi, lo]));
            if total < 4 {
                return One::Noise;
            }
            (total, 3)
        }
        // One-octet form: 2..=255.
        n => (usize::from(n), 1),
    };
    let Some(&msg_type) = prefix.get(header_len) else {
        return One::NeedMore;
    };
    if msg_type == ENCAPSULATED {
        // Spec 5.5: the encapsulation Length is one octet and covers at least Length,
        // MsgType and Ctrl.
        if header_len == 1 && total >= ENCAP_MIN_LEN {
            One::Encapsulation(total)
        } else {
            One::Noise
        }
    } else if !is_known_type(msg_type) || total <= header_len {
        One::Noise
    } else {
        One::Message(total)
    }
}

/// Raw framing: judges `prefix`, the octets received since the last frame boundary.
///
/// A forwarder encapsulation's frame is its header plus the encapsulated message, whose
/// own header is judged in turn (encapsulations may nest).
pub(super) fn check(prefix: &[u8], capacity: usize) -> Check {
    let mut offset = 0usize;
    loop {
        match check_one(prefix.get(offset..).unwrap_or_default()) {
            One::NeedMore => return Check::NeedMore,
            One::Noise => return Check::Noise,
            One::Message(total) => {
                let total = offset.saturating_add(total);
                return if total > capacity {
                    Check::TooLong
                } else {
                    Check::Frame(total)
                };
            }
            One::Encapsulation(header) => {
                offset = offset.saturating_add(header);
                // The smallest encapsulated message has two octets.
                if offset.saturating_add(2) > capacity {
                    return Check::TooLong;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_octet_form() {
        assert_eq!(check(&[], 64), Check::NeedMore);
        assert_eq!(check(&[0x02], 64), Check::NeedMore);
        assert_eq!(check(&[0x02, 0x16], 64), Check::Frame(2));
        assert_eq!(check(&[0xFF, 0x0C], 255), Check::Frame(255));
        assert_eq!(check(&[0xFF, 0x0C], 254), Check::TooLong);
        assert_eq!(check(&[0x02, 0x03], 64), Check::Noise);
        assert_eq!(check(&[0x00], 64), Check::Noise);
    }

    #[test]
    fn three_octet_form() {
        assert_eq!(check(&[0x01], 1024), Check::NeedMore);
        assert_eq!(check(&[0x01, 0x01], 1024), Check::NeedMore);
        assert_eq!(check(&[0x01, 0x01, 0x00], 1024), Check::NeedMore);
        assert_eq!(check(&[0x01, 0x01, 0x00, 0x0C], 1024), Check::Frame(256));
        assert_eq!(check(&[0x01, 0x01, 0x00, 0x0C], 255), Check::TooLong);
        assert_eq!(check(&[0x01, 0x01, 0x00, 0x03], 1024), Check::Noise);
        // Also on short messages (lenient, as the packet decoder), never below 4 octets.
        assert_eq!(check(&[0x01, 0x00, 0xFF], 1024), Check::NeedMore);
        assert_eq!(check(&[0x01, 0x00, 0x04, 0x16], 1024), Check::Frame(4));
        assert_eq!(check(&[0x01, 0x00, 0x03], 1024), Check::Noise);
        assert_eq!(check(&[0x01, 0x00, 0x00], 1024), Check::Noise);
        assert_eq!(check(&[0x01, 0xFF, 0xFF, 0x0C], 65535), Check::Frame(65535));
    }

    #[test]
    fn encapsulation_is_its_header_plus_the_encapsulated_message() {
        // Header: Length 5, 0xFE, Ctrl, node id 0xAB 0xCD; then a PINGREQ.
        let enc = [0x05, 0xFE, 0x00, 0xAB, 0xCD, 0x02, 0x16];
        for n in 0..enc.len() {
            assert_eq!(check(&enc[..n], 64), Check::NeedMore, "{n} octets");
        }
        assert_eq!(check(&enc, 64), Check::Frame(7));
        assert_eq!(check(&enc, 6), Check::TooLong);
        assert_eq!(check(&enc[..2], 6), Check::TooLong);
        // Nested (a forwarder behind a forwarder), and a long encapsulated message.
        assert_eq!(
            check(&[0x03, 0xFE, 0x01, 0x04, 0xFE, 0x00, 0x07, 0x02, 0x16], 64),
            Check::Frame(9)
        );
        assert_eq!(
            check(&[0x03, 0xFE, 0x00, 0x01, 0x01, 0x00, 0x0C], 1024),
            Check::Frame(259)
        );
        // Impossible encapsulations: shorter than Length+MsgType+Ctrl, three-octet form,
        // or followed by noise.
        assert_eq!(check(&[0x02, 0xFE], 64), Check::Noise);
        assert_eq!(check(&[0x01, 0x01, 0x00, 0xFE], 1024), Check::Noise);
        assert_eq!(check(&[0x03, 0xFE, 0x00, 0x02, 0x03], 64), Check::Noise);

        assert!(announces_own_length(&enc));
        assert!(announces_own_length(&[
            0x03, 0xFE, 0x01, 0x04, 0xFE, 0x00, 0x07, 0x02, 0x16
        ]));
        assert!(!announces_own_length(&enc[..6]));
        assert!(!announces_own_length(&[0x05, 0xFE, 0x00, 0xAB, 0xCD]));
        assert!(!announces_own_length(&[0x05, 0xFE, 0x00, 0xAB, 0xCD, 0x02, 0x16, 0x00]));
        assert!(!announces_own_length(&[0x07, 0xFE, 0x00, 0xAB, 0xCD, 0x02, 0x16]));
        assert!(!announces_own_length(&[0x02, 0xFE, 0x02, 0x16]));
    }

    #[test]
    fn own_length() {
        assert!(announces_own_length(&[0x02, 0x16]));
        assert!(announces_own_length(&[0x03, 0x16, 0x00]));
        assert!(!announces_own_length(&[0x03, 0x16]));
        assert!(!announces_own_length(&[]));
        assert!(!announces_own_length(&[0x00]));
        assert!(!announces_own_length(&[0x01]));
        assert!(!announces_own_length(&[0x01, 0x00, 0x03]));
        assert!(announces_own_length(&[0x01, 0x00, 0x04, 0x16]));
        let mut long = [0u8; 300];
        long[..3].copy_from_slice(&[0x01, 0x01, 0x2C]);
        assert!(announces_own_length(&long));
        assert!(!announces_own_length(&long[..299]));
    }

    #[test]
    fn known_types() {
        let known = (0..=255u8).filter(|&t| is_known_type(t)).count();
        assert_eq!(known, 28);
        for t in [0x03, 0x11, 0x19, 0x1E, 0x1F, 0x20, 0xFD, 0xFF] {
            assert!(!is_known_type(t));
        }
    }
}
