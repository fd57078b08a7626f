//! The payload of a fleet device's PUBLISH: who sent it, its sequence number, its QoS and
//! when it was sent, so that the broker-side verifier can match arrivals, find losses and
//! duplicates and measure latency.
//!
//! Text, `RUN:DEVICE:SEQ:QOS:SENT_US:` followed by `.` padding up to the group's payload
//! size, e.g. `9f3a01c2:17:4:1:12034567:..........`. QOS is `m` for -1, else the digit.

use sn_codec::QoS;

/// What a payload identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Run id (tells this run's messages from another's).
    pub run: u32,
    /// Device index in the fleet.
    pub device: u32,
    /// Sequence number of the device's publish (from 0).
    pub seq: u32,
    /// QoS the device published with.
    pub qos: QoS,
    /// When it was published, µs since the simulator's epoch.
    pub sent_us: u64,
}

fn qos_char(q: QoS) -> char {
    match q {
        QoS::MinusOne => 'm',
        QoS::AtMostOnce => '0',
        QoS::AtLeastOnce => '1',
        QoS::ExactlyOnce => '2',
    }
}

impl Stamp {
    /// Writes the payload into `out` (cleared first), padded to `size` bytes.
    pub fn encode(&self, size: usize, out: &mut Vec<u8>) {
        use std::io::Write;
        out.clear();
        let _ = write!(
            out,
            "{:08x}:{}:{}:{}:{}:",
            self.run,
            self.device,
            self.seq,
            qos_char(self.qos),
            self.sent_us
        );
        if out.len() < size {
            out.resize(size, b'.');
        }
    }

    /// Reads a payload; `None` if it is not one of ours.
    pub fn decode(payload: &[u8]) -> Option<Stamp> {
        // The header is ASCII and short: look at the start only.
        let text = std::str::from_utf8(payload.get(..payload.len().min(80))?).ok()?;
        let mut it = text.split(':');
        let run = u32::from_str_radix(it.next()?, 16).ok()?;
        let device = it.next()?.parse().ok()?;
        let seq = it.next()?.parse().ok()?;
        let qos = match it.next()? {
            "m" => QoS::MinusOne,
            "0" => QoS::AtMostOnce,
            "1" => QoS::AtLeastOnce,
            "2" => QoS::ExactlyOnce,
            _ => return None,
        };
        let sent_us = it.next()?.parse().ok()?;
        it.next()?;
        Some(Stamp {
            run,
            device,
            seq,
            qos,
            sent_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp {
            run: 0x9f3a_01c2,
            device: 17,
            seq: 4,
            qos: QoS::ExactlyOnce,
            sent_us: 12_034_567,
        };
        let mut buf = Vec::new();
        s.encode(64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert_eq!(Stamp::decode(&buf), Some(s));
        s.encode(0, &mut buf);
        assert_eq!(Stamp::decode(&buf), Some(s));
        assert_eq!(Stamp::decode(b"hello"), None);
        assert_eq!(Stamp::decode(b"zz:1:2:1:3:"), None);
    }
}
