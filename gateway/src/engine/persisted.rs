//! What the gateway keeps of a clean-session-false device between its sessions: its topic
//! table, bounded in number (`limits.max_persisted_sessions`) and, with
//! `limits.session_expiry_secs`, in time: a device that does not come back within the
//! expiry loses them, like a broker's persistent-client expiration.
//!
//! With a state store (`state.dir`), what is kept here is also written there (the
//! engine queues [`crate::store::StoreOp`]s), and read back at start
//! ([`crate::engine::Gateway::restore`]), its expiry in wall-clock time.
//!
//! In transparent mode the broker holds the rest of such a device's session (its
//! subscriptions and queued QoS 1/2 messages) and expires it by its own setting (for
//! mosquitto, `persistent_client_expiration`); the gateway never clears a session at the
//! broker, since the device may be connected through another gateway by then.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::qos2::Qos2Ledger;
use crate::topics::TopicTable;

/// What is kept of a clean-session-false device's session while it is not connected.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// Its topic ids.
    pub topics: TopicTable,
    /// Its QoS 2 deliveries in progress.
    pub qos2: Qos2Ledger,
}

impl From<TopicTable> for Kept {
    fn from(topics: TopicTable) -> Self {
        Kept {
            topics,
            qos2: Qos2Ledger::default(),
        }
    }
}

/// What is kept of clean-session-false devices that are not connected.
#[derive(Debug)]
pub(crate) struct Persisted {
    limit: usize,
    expiry: Option<Duration>,
    tables: HashMap<Arc<str>, Entry>,
    /// Expiry deadlines, earliest first (only with an expiry set).
    deadlines: BTreeSet<(Instant, Arc<str>)>,
}

#[derive(Debug)]
struct Entry {
    kept: Kept,
    expires: Option<Instant>,
}

/// What [`Persisted::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Kept.
    Kept,
    /// Not kept: `limits.max_persisted_sessions` are held already.
    Full,
}

impl Persisted {
    /// At most `limit` tables, each for `expiry` after its device went (`None`: until
    /// the device comes back or the limit is reached).
    pub(crate) fn new(limit: usize, expiry: Option<Duration>) -> Self {
        Persisted {
            limit,
            expiry,
            tables: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// Keeps `table` for `client_id`, whose session ended at `now` (replacing what was
    /// kept for it, and restarting its expiry).
    pub(crate) fn store(&mut self, now: Instant, client_id: Arc<str>, table: Kept) -> Stored {
        let expires = self.expiry.and_then(|d| now.checked_add(d));
        self.keep(client_id, table, expires)
    }

    /// The expiry [`Persisted::store`] gives a table kept at `now`.
    pub(crate) fn expiry(&self) -> Option<Duration> {
        self.expiry
    }

    /// Keeps `table` for `client_id` until `expires` (a table read back from the state
    /// store, whose expiry was set before the restart).
    pub(crate) fn keep(&mut self, client_id: Arc<str>, kept: Kept, expires: Option<Instant>) -> Stored {
        if self.tables.len() >= self.limit && !self.tables.contains_key(&client_id) {
            return Stored::Full;
        }
        self.remove(&client_id);
        if let Some(at) = expires {
            self.deadlines.insert((at, client_id.clone()));
        }
        self.tables.insert(client_id, Entry { kept, expires });
        Stored::Kept
    }

    /// Takes what was kept for `client_id` (it connects again).
    pub(crate) fn take(&mut self, client_id: &str) -> Option<Kept> {
        let (key, entry) = self.tables.remove_entry(client_id)?;
        if let Some(at) = entry.expires {
            self.deadlines.remove(&(at, key));
        }
        Some(entry.kept)
    }

    /// Whether something is kept for `client_id`.
    pub(crate) fn contains(&self, client_id: &str) -> bool {
        self.tables.contains_key(client_id)
    }

    /// Forgets what was kept for `client_id` (it connects with clean session).
    pub(crate) fn remove(&mut self, client_id: &str) {
        let _ = self.take(client_id);
    }

    /// The earliest expiry deadline.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Drops every table whose expiry passed by `now`; returns the client ids dropped.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        while let Some((at, id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, id.clone()));
            if self.tables.get(&id).is_some_and(|e| e.expires == Some(at)) {
                self.tables.remove(&id);
                gone.push(id);
            }
        }
        gone
    }

    /// Tables kept.
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn kept_until_taken_without_an_expiry() {
        let t0 = Instant::now();
        let mut p = Persisted::new(10, None);
        assert_eq!(p.store(t0, id("a"), Kept::default()), Stored::Kept);
        assert_eq!(p.next_expiry(), None);
        assert!(p.expire(t0 + Duration::from_secs(1_000_000)).is_empty());
        assert!(p.take("a").is_some());
        assert!(p.take("a").is_none());
    }

    #[test]
    fn the_limit_refuses_new_devices_but_not_a_known_one() {
        let t0 = Instant::now();
        let mut p = Persisted::new(1, None);
        assert_eq!(p.store(t0, id("a"), Kept::default()), Stored::Kept);
        assert_eq!(p.store(t0, id("b"), Kept::default()), Stored::Full);
        assert_eq!(p.store(t0, id("a"), Kept::default()), Stored::Kept);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn expires_after_the_expiry_and_a_new_store_restarts_it() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Persisted::new(10, Some(s(60)));
        p.store(t0, id("a"), Kept::default());
        p.store(t0 + s(10), id("b"), Kept::default());
        assert_eq!(p.next_expiry(), Some(t0 + s(60)));
        // "a" comes back and goes again at 30 s: its expiry moves to 90 s.
        assert!(p.take("a").is_some());
        p.store(t0 + s(30), id("a"), Kept::default());
        assert_eq!(p.next_expiry(), Some(t0 + s(70)));
        assert!(p.expire(t0 + s(69)).is_empty());
        assert_eq!(p.expire(t0 + s(70)), vec![id("b")]);
        assert_eq!(p.expire(t0 + s(90)), vec![id("a")]);
        assert_eq!(p.len(), 0);
        assert_eq!(p.next_expiry(), None);
    }

    #[test]
    fn a_taken_table_leaves_no_deadline_behind() {
        let t0 = Instant::now();
        let mut p = Persisted::new(10, Some(Duration::from_secs(5)));
        p.store(t0, id("a"), Kept::default());
        assert!(p.take("a").is_some());
        assert_eq!(p.next_expiry(), None);
        assert!(p.expire(t0 + Duration::from_secs(10)).is_empty());
    }
}
