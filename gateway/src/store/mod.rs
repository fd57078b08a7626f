//! The state store: what the gateway keeps of clean-session-false devices across a
//! restart or a crash (`--state-dir`, see `docs/persistence.md`).
//!
//! The engine stays sans-IO: it never calls the store. It queues [`StoreOp`]s, plain data,
//! as it queues datagrams and broker commands, and the runtime applies them with
//! [`StateStore::commit`], one transaction for everything queued in one turn of its loop
//! (a group commit: one fsync for up to a whole batch of datagrams, not one per
//! registration). The engine holds back every datagram queued after a store write until
//! the runtime says the write is durable ([`crate::engine::Gateway::store_committed`]), so
//! a REGACK never leaves before the registration it acknowledges is on disk.
//!
//! What is stored, per clean-session-false device: its client id, whether it is
//! connected or gone (and then until when, in wall-clock time), and its topic ids in both
//! directions (those it registered and those the gateway registered with it). In
//! aggregating mode, where the broker knows only the gateway, also its subscriptions
//! ([`StoreOp::Subscribe`]) and the QoS 1/2 messages the gateway holds for it
//! ([`StoreOp::PutHeld`]), written by the shared connection's task before it acknowledges
//! them to the broker; transparent mode leaves both to the broker's session and never
//! writes them.

mod disk;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use disk::{Opened, RedbStore, STORE_FILE};

/// The schema version this build writes. A store with a higher one was written by a
/// newer gateway and is refused; a lower one is migrated when opened (1 to 2: the table of
/// subscriptions is added).
pub const SCHEMA_VERSION: u64 = 2;

/// Wall-clock time as the store keeps it: milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// `t` as [`UnixMillis`] (0 before the epoch, saturating far in the future).
pub fn unix_millis(t: SystemTime) -> UnixMillis {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` as a [`SystemTime`].
pub fn system_time(ms: UnixMillis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Where a stored session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Its device was connected (or asleep) when this was written: its expiry had not
    /// started. After a restart it counts from the restart.
    Connected,
    /// Its device went; what is kept expires at this time (`None`: never, until
    /// `limits.max_persisted_sessions` is reached).
    Away {
        /// When it expires.
        expires: Option<UnixMillis>,
    },
}

/// A broker message held for a device (aggregating mode; see [`StoreOp::PutHeld`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMessage {
    /// The topic, as the broker named it.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// 1 or 2 (QoS 0 messages are never held; a will may have 0).
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
}

/// One change to the stored state. Operations on one client id apply in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A clean-session-false session began: whatever was kept for the client is replaced
    /// by this, connected, with these topic ids.
    Connected {
        /// The client id.
        client_id: Arc<str>,
        /// Its topic ids and names.
        topics: Vec<(u16, Arc<str>)>,
    },
    /// Its session ended; kept until `expires` (`None`: no expiry).
    Away {
        /// The client id.
        client_id: Arc<str>,
        /// When it expires.
        expires: Option<UnixMillis>,
    },
    /// A topic id was assigned (either direction).
    Topic {
        /// The client id.
        client_id: Arc<str>,
        /// The id.
        id: u16,
        /// The topic name.
        name: Arc<str>,
    },
    /// A topic id was forgotten.
    Untopic {
        /// The client id.
        client_id: Arc<str>,
        /// The id.
        id: u16,
    },
    /// Everything kept for the client is dropped (clean session, expiry, limit).
    Forget {
        /// The client id.
        client_id: Arc<str>,
    },
    /// A message held for the client, under a sequence number that orders its held
    /// messages (aggregating mode: written before the broker is acknowledged).
    PutHeld {
        /// The client id.
        client_id: Arc<str>,
        /// Its position in the client's queue.
        seq: u64,
        /// The message.
        message: HeldMessage,
    },
    /// A held message was delivered (or dropped).
    RemoveHeld {
        /// The client id.
        client_id: Arc<str>,
        /// Its position in the client's queue.
        seq: u64,
    },
    /// The client holds a subscription, granted at `qos` (aggregating mode).
    Subscribe {
        /// The client id.
        client_id: Arc<str>,
        /// The topic filter.
        filter: Arc<str>,
        /// The QoS granted (0 to 2).
        qos: u8,
    },
    /// The will of the client's session now connected (`None`: it has none, or it went
    /// cleanly), kept so that a gateway that dies with the device connected publishes
    /// it after its restart (aggregating mode, where the broker holds no will). For any
    /// device, whatever its clean-session flag; [`StoreOp::Forget`] leaves it alone.
    Will {
        /// The client id.
        client_id: Arc<str>,
        /// The will (its `qos` may be 0).
        will: Option<HeldMessage>,
    },
    /// The client's device went to sleep (`Some`), or is awake again (`None`). Written
    /// when a clean-session-false device enters sleep, not at every wake-up, so that a
    /// gateway restarted while it sleeps recognises its PINGREQ.
    Sleep {
        /// The client id.
        client_id: Arc<str>,
        /// Where and how long it sleeps.
        sleeper: Option<Sleeper>,
    },
    /// A QoS 2 delivery to the device that it may hold state for: sent (`released`
    /// false: it may have the message, awaiting PUBREL after its PUBREC), released (the
    /// gateway had its PUBREC and sends PUBREL), or, `None`, complete (PUBCOMP). Written
    /// before the PUBLISH (or PUBREL) leaves, so that after a crash the same message goes
    /// out again under the same message id and the device, which dedups by message id,
    /// delivers it once (clean-session-false devices, both modes).
    Qos2 {
        /// The client id.
        client_id: Arc<str>,
        /// The message id toward the device.
        msg_id: u16,
        /// Where the exchange stands.
        state: Option<Qos2State>,
    },
    /// A filter the broker holds (`held`), or no longer holds, for shared connection
    /// `connection`'s persistent MQTT session (aggregating mode): written before the
    /// SUBSCRIBE leaves, so that after a restart the filters no device needs any more can
    /// be unsubscribed. Not tied to a client id; [`StoreOp::Forget`] leaves it alone.
    BrokerFilter {
        /// The shared connection's number.
        connection: u16,
        /// The filter.
        filter: Arc<str>,
        /// Held (subscribed) or not.
        held: bool,
    },
    /// The client no longer holds a subscription (aggregating mode).
    Unsubscribe {
        /// The client id.
        client_id: Arc<str>,
        /// The topic filter.
        filter: Arc<str>,
    },
}

/// A QoS 2 delivery in progress toward a device (see [`StoreOp::Qos2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos2State {
    /// A digest of the message's topic and payload (a stable hash: it must match across
    /// processes), to recognise the message when the broker or the store delivers it again.
    pub digest: u64,
    /// The device's PUBREC was received: only PUBREL and PUBCOMP remain.
    pub released: bool,
}

/// A clean-session-false device asleep when this was written: where it was, and what
/// the gateway needs to hold its session again after a restart (its broker keep-alive
/// and its sleep duration, counted again from the restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sleeper {
    /// Its address (a PINGREQ from elsewhere is judged as a wake from another address).
    pub peer: crate::link::Peer,
    /// The keep-alive of its CONNECT, in seconds (for its broker connection).
    pub keep_alive: u16,
    /// Its sleep duration, in seconds.
    pub duration_secs: u32,
}

/// What the store holds for one client, as read back at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The client id.
    pub client_id: String,
    /// Connected or gone.
    pub presence: Presence,
    /// Topic ids and names, by id.
    pub topics: Vec<(u16, String)>,
    /// Held messages, by sequence number.
    pub held: Vec<(u64, HeldMessage)>,
    /// Subscriptions and their granted QoS, by filter (aggregating mode).
    pub subs: Vec<(String, u8)>,
    /// Asleep when the gateway stopped: where and for how long.
    pub sleeper: Option<Sleeper>,
    /// QoS 2 deliveries to it in progress, by message id.
    pub qos2: Vec<(u16, Qos2State)>,
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be read as a store: damaged, truncated, or not a store at all.
    #[error("the state store {path} is damaged: {why}")]
    Damaged {
        /// The file.
        path: String,
        /// What the reader found.
        why: String,
    },
    /// Written by a newer gateway (a schema version this build does not know).
    #[error("the state store {path} has schema version {found}; this gateway knows versions up to {SCHEMA_VERSION}: it was written by a newer gateway")]
    NewerSchema {
        /// The file.
        path: String,
        /// Its version.
        found: u64,
    },
    /// Another process has it open.
    #[error("the state store {path} is in use by another process (one gateway per state directory)")]
    InUse {
        /// The file.
        path: String,
    },
    /// The file system refused (permissions, disk full).
    #[error("the state store {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A write or a read failed while running.
    #[error("state store: {0}")]
    Failed(String),
}

/// A store of [`StoreOp`]s, crash-safe: after [`StateStore::commit`] returns `Ok`, its
/// operations survive a crash; a crash before leaves none of them.
pub trait StateStore: Send {
    /// Applies `ops`, in order, in one durable transaction.
    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError>;

    /// Everything stored, by client id.
    fn load(&self) -> Result<Vec<StoredSession>, StoreError>;
}

/// The store, shared by the runtime (the engine's writes) and, in aggregating mode, the
/// shared broker connections' tasks (subscriptions and held messages). One commit at a
/// time; each is one durable transaction.
#[derive(Clone)]
pub struct StoreHandle {
    store: Arc<Mutex<Box<dyn StateStore>>>,
    /// Commits of the broker link's writes that failed.
    link_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").finish_non_exhaustive()
    }
}

impl StoreHandle {
    /// A handle on `store`.
    pub fn new(store: Box<dyn StateStore>) -> StoreHandle {
        StoreHandle {
            store: Arc::new(Mutex::new(store)),
            link_errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Applies `ops` in one durable transaction (see [`StateStore::commit`]).
    pub fn commit(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        // A commit that panicked cannot have committed; the store itself stays usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner()).commit(ops)
    }

    /// Commits the broker link's writes, counting and logging a failure (the link then
    /// serves on from memory, as the engine does).
    pub fn commit_for_link(&self, ops: &[StoreOp]) {
        if let Err(e) = self.commit(ops) {
            if self.link_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!(error = %e, "state store write of held messages or subscriptions failed: serving on from memory (counted in store_write_errors)");
            } else {
                tracing::debug!(error = %e, "state store write failed");
            }
        }
    }

    /// How many of the broker link's commits failed.
    pub fn link_errors(&self) -> u64 {
        self.link_errors.load(Ordering::Relaxed)
    }
}

/// The store as the runtime drives it: opened from `[state]`, fed the engine's writes.
pub struct StoreLink {
    store: StoreHandle,
    /// Whether the last commit failed (the error is logged once per run of failures).
    failing: bool,
    /// What the broker link stored (subscriptions, held messages) for the sessions the
    /// engine kept at start, until [`StoreLink::take_restored`].
    restored: Vec<StoredSession>,
    /// The wills of devices connected when the gateway stopped, until
    /// [`StoreLink::take_wills`].
    wills: Vec<(String, HeldMessage)>,
    /// The filters the broker held for the shared connections' sessions, until
    /// [`StoreLink::take_broker_filters`].
    broker_filters: Vec<(u16, String)>,
}

impl std::fmt::Debug for StoreLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLink").field("failing", &self.failing).finish()
    }
}

impl StoreLink {
    /// Opens the store of `[state]` (none without `state.dir`), gives the engine what it
    /// holds ([`crate::engine::Gateway::restore`]) and commits what that changed. A
    /// damaged store is an error, or with `state.recover` set aside, loudly.
    pub fn open(
        state: &crate::config::StateSettings,
        gw: &mut crate::engine::Gateway,
    ) -> Result<Option<StoreLink>, StoreError> {
        let Some(dir) = &state.dir else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let opened = RedbStore::open(dir, state.recover)?;
        if let Some((aside, why)) = &opened.set_aside {
            tracing::error!(
                %why,
                kept_as = %aside.display(),
                "STATE STORE DAMAGED: starting with an empty store (state.recover); every device's kept topic ids are lost, the damaged file is kept aside"
            );
        }
        let linked: Vec<StoredSession> = opened
            .sessions
            .iter()
            .filter(|s| !s.subs.is_empty() || !s.held.is_empty())
            .cloned()
            .collect();
        let wills = opened.wills;
        let broker_filters = opened.broker_filters;
        let restored = gw.restore(std::time::Instant::now(), SystemTime::now(), opened.sessions);
        // Expired or over the limit: the engine's Forget drops their rows as well.
        let linked = linked.into_iter().filter(|s| gw.keeps_session(&s.client_id)).collect();
        let mut link = StoreLink {
            store: StoreHandle::new(Box::new(opened.store)),
            failing: false,
            restored: linked,
            wills,
            broker_filters,
        };
        link.flush(gw);
        tracing::info!(
            dir = %dir.display(),
            sessions = restored.kept,
            asleep = restored.asleep,
            expired = restored.expired,
            over_limit = restored.over_limit,
            took_ms = started.elapsed().as_millis(),
            "state store opened"
        );
        Ok(Some(link))
    }

    /// The store, for the broker link's own writes (aggregating mode).
    pub fn handle(&self) -> StoreHandle {
        self.store.clone()
    }

    /// The subscriptions and held messages stored by the broker link for the sessions
    /// kept at start (once; aggregating mode puts them back).
    pub fn take_restored(&mut self) -> Vec<StoredSession> {
        std::mem::take(&mut self.restored)
    }

    /// The stored wills of the devices that were connected when the gateway stopped
    /// (once; aggregating mode publishes them, as a broker would for a lost client).
    pub fn take_wills(&mut self) -> Vec<(String, HeldMessage)> {
        std::mem::take(&mut self.wills)
    }

    /// The filters the broker held for each shared connection's persistent session when
    /// the gateway stopped (once; aggregating mode unsubscribes those no device needs).
    pub fn take_broker_filters(&mut self) -> Vec<(u16, String)> {
        std::mem::take(&mut self.broker_filters)
    }

    /// Commits what the engine queued, in one transaction, and tells it so.
    pub fn flush(&mut self, gw: &mut crate::engine::Gateway) {
        let ops = gw.take_store_ops();
        if ops.is_empty() {
            if gw.store_pending() {
                gw.store_committed(true);
            }
            return;
        }
        let result = self.store.commit(&ops);
        match &result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("state store writes succeed again");
            }
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!(error = %e, "state store write failed: serving on from memory, but what was not written is lost if the gateway dies (counted in store_write_errors)");
            }
            _ => {}
        }
        gw.store_committed(result.is_ok());
    }
}

#[cfg(test)]
mod tests;
