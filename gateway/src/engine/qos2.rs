//! The QoS 2 deliveries toward one device that the device may hold state for, kept with
//! its session (across sessions of a clean-session-false device, and with a state store
//! across a crash).
//!
//! MQTT-SN QoS 2 toward a device is exactly once because the device remembers the
//! message id of a PUBLISH it has passed on until the gateway's PUBREL. A message that
//! reaches the gateway again after its session ended (the broker redelivers what was not
//! acknowledged; aggregating mode puts back what it held) must go out under the same
//! message id, with DUP, or the device takes it for a new message and delivers it twice.
//! And a delivery the device acknowledged with PUBREC must still get its PUBREL, or the
//! device holds that message id forever and drops a later message that reuses it.
//!
//! So each QoS 2 PUBLISH sent is entered here (message id and a digest of its topic and
//! payload), marked released at the device's PUBREC, and removed at its PUBCOMP. A new
//! session starts with what the last one left: released entries get their PUBREL first;
//! an unreleased entry is matched, by digest, to the next QoS 2 message with the same
//! topic and payload, which then goes out under the entry's message id with DUP. Message
//! ids in here are not handed out to other messages.

use crate::store::Qos2State;

/// Entries kept at most; beyond, the oldest unreleased one is dropped (a message the
/// broker never delivered again).
const MAX_ENTRIES: usize = 16;

/// The ledger of one device's QoS 2 deliveries in progress.
#[derive(Debug, Clone, Default)]
pub(crate) struct Qos2Ledger {
    /// In the order they were entered.
    entries: Vec<(u16, Qos2State)>,
    /// Changes since the last [`Qos2Ledger::take_changes`], while recording.
    journal: Option<Vec<(u16, Option<Qos2State>)>>,
}

/// A digest of a message as the device gets it (topic name and payload) that is the
/// same in every process and build: FNV-1a, 64 bits.
pub(crate) fn digest(topic: &str, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes().chain([0xff]).chain(payload.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Qos2Ledger {
    /// A ledger holding `entries` (read back from the state store).
    pub(crate) fn from_entries(entries: impl IntoIterator<Item = (u16, Qos2State)>) -> Self {
        let mut l = Qos2Ledger {
            entries: entries.into_iter().filter(|(id, _)| *id != 0).collect(),
            journal: None,
        };
        l.entries.truncate(MAX_ENTRIES);
        l
    }

    /// Starts (or stops) recording changes for the state store.
    pub(crate) fn record(&mut self, on: bool) {
        self.journal = on.then(Vec::new);
    }

    /// The changes recorded since the last call.
    pub(crate) fn take_changes(&mut self) -> Vec<(u16, Option<Qos2State>)> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn note(&mut self, msg_id: u16, state: Option<Qos2State>) {
        if let Some(j) = &mut self.journal {
            j.push((msg_id, state));
        }
    }

    /// Whether `msg_id` is in use here (not to be given to another message).
    pub(crate) fn holds(&self, msg_id: u16) -> bool {
        self.entries.iter().any(|(id, _)| *id == msg_id)
    }

    /// The message id of an unreleased delivery of the same message, if there is one:
    /// it goes out again under that id, with DUP.
    pub(crate) fn matching(&self, digest: u64) -> Option<u16> {
        self.entries
            .iter()
            .find(|(_, s)| !s.released && s.digest == digest)
            .map(|(id, _)| *id)
    }

    /// A released delivery still owed its PUBREL, other than `except`.
    pub(crate) fn owed_pubrel(&self, except: Option<u16>) -> Option<u16> {
        self.entries
            .iter()
            .find(|(id, s)| s.released && Some(*id) != except)
            .map(|(id, _)| *id)
    }

    /// A QoS 2 PUBLISH goes out under `msg_id` (again, if it is in here already).
    pub(crate) fn sent(&mut self, msg_id: u16, digest: u64) {
        if self.holds(msg_id) {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES {
            let oldest = self.entries.iter().position(|(_, s)| !s.released).unwrap_or(0);
            let (gone, _) = self.entries.remove(oldest);
            self.note(gone, None);
        }
        let state = Qos2State {
            digest,
            released: false,
        };
        self.entries.push((msg_id, state));
        self.note(msg_id, Some(state));
    }

    /// The device's PUBREC for `msg_id`: PUBREL follows.
    pub(crate) fn released(&mut self, msg_id: u16) {
        let mut changed = None;
        for (id, s) in &mut self.entries {
            if *id == msg_id && !s.released {
                s.released = true;
                changed = Some(*s);
            }
        }
        if let Some(s) = changed {
            self.note(msg_id, Some(s));
        }
    }

    /// The device's PUBCOMP for `msg_id`: the delivery is complete.
    pub(crate) fn completed(&mut self, msg_id: u16) {
        let before = self.entries.len();
        self.entries.retain(|(id, _)| *id != msg_id);
        if self.entries.len() != before {
            self.note(msg_id, None);
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_fixed_and_tells_topic_from_payload() {
        // Fixed across processes and builds: a stored digest must still match.
        assert_eq!(digest("a/b", b"21.5"), 0x7dcc_ba83_cebc_b8fe);
        assert_ne!(digest("a/b", b"1"), digest("a/b1", b""));
        assert_ne!(digest("a", b"x"), digest("b", b"x"));
    }

    #[test]
    fn a_delivery_is_matched_until_released_and_owes_pubrel_until_completed() {
        let mut l = Qos2Ledger::default();
        l.record(true);
        let d = digest("t", b"p");
        l.sent(7, d);
        assert_eq!(l.matching(d), Some(7));
        assert!(l.holds(7));
        assert_eq!(l.owed_pubrel(None), None);
        l.released(7);
        assert_eq!(l.matching(d), None, "released: a new copy is a new message");
        assert_eq!(l.owed_pubrel(None), Some(7));
        assert_eq!(l.owed_pubrel(Some(7)), None);
        l.completed(7);
        assert!(!l.holds(7));
        let changes = l.take_changes();
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[2], (7, None));
    }

    #[test]
    fn it_is_bounded_dropping_the_oldest_unreleased() {
        let mut l = Qos2Ledger::default();
        l.sent(1, 1);
        l.released(1);
        for id in 2..=(MAX_ENTRIES as u16 + 1) {
            l.sent(id, u64::from(id));
        }
        assert_eq!(l.len(), MAX_ENTRIES);
        assert!(l.holds(1), "a released entry still owed PUBREL stays");
        assert!(!l.holds(2));
    }
}
