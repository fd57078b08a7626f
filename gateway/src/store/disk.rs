//! The store on disk: one redb file, `gateway.redb`, in the state directory.
//!
//! Why redb: pure Rust with no C library and one dependency (libc, already in the tree),
//! so it adds one crate to the build (about 15 s of a clean release build here, on two
//! cores, beside much longer ones); its commits are atomic and,
//! with `Durability::Immediate`, durable when they return (copy-on-write B-trees, two
//! commit slots, checksummed pages), which is the property the durability rule needs. A
//! hand-written append-only log would be smaller still, but its torn-write handling,
//! compaction and checksums would be ours to get right and test; fjall (an LSM tree) is
//! built for write volumes far beyond a table of topic ids, and brings more dependencies.
//!
//! Commits do not use redb's quick repair. With it, every commit saves the allocator
//! state, a copy that grows with the file: measured end to end (aggregating mode, 10,000
//! sleepy devices, `docs/benchmarks.md`), it tripled the gateway's CPU and held answers
//! back for seconds. Without it, reopening after a `kill -9` repairs the file by walking
//! it, which for 100,000 stored sessions (32.6 MiB) is part of the 0.3 s the open takes.
//!
//! Tables: `meta` (`schema_version`), `sessions` (client id -> presence), `topics`
//! ((client id, topic id) -> name), `held` ((client id, sequence) -> message), `subs`
//! ((client id, filter) -> granted QoS; schema version 2), `wills` (client id -> will, as
//! a held message is written; version 2), `sleepers` (client id -> where and how long
//! its device sleeps; version 2), `qos2` ((client id, message id) -> a QoS 2 delivery in
//! progress toward it; version 2), `broker_filters` ((shared connection, filter) -> 0:
//! what the broker holds for the aggregating-mode connections' sessions; version 2).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::{
    HeldMessage, Presence, Qos2State, Sleeper, StateStore, StoreError, StoreOp, StoredSession, SCHEMA_VERSION,
};
use crate::link::{LinkAddr, Peer};

/// The store's file name in the state directory.
pub const STORE_FILE: &str = "gateway.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const TOPICS: TableDefinition<(&str, u16), &str> = TableDefinition::new("topics");
const HELD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("held");
const SUBS: TableDefinition<(&str, &str), u8> = TableDefinition::new("subs");
const WILLS: TableDefinition<&str, &[u8]> = TableDefinition::new("wills");
const SLEEPERS: TableDefinition<&str, &[u8]> = TableDefinition::new("sleepers");
const QOS2: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("qos2");
const BROKER_FILTERS: TableDefinition<(u16, &str), u8> = TableDefinition::new("broker_filters");

const VERSION_KEY: &str = "schema_version";

/// The store in a redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

/// A store opened by [`RedbStore::open`], with what it holds.
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: RedbStore,
    /// What it holds.
    pub sessions: Vec<StoredSession>,
    /// The wills it holds, by client id.
    pub wills: Vec<(String, HeldMessage)>,
    /// The filters the broker holds for each shared connection's session.
    pub broker_filters: Vec<(u16, String)>,
    /// Where a damaged store was renamed to (only with `recover`).
    pub set_aside: Option<(PathBuf, StoreError)>,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir` (created if missing). A damaged file is an
    /// error, or with `recover`, renamed aside to `gateway.redb.damaged-<unix secs>` and
    /// replaced by an empty store. A newer schema version is an error either way.
    pub fn open(dir: &Path, recover: bool) -> Result<Opened, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join(STORE_FILE);
        match Self::open_file(&path) {
            Ok((store, sessions)) => Ok(Opened {
                wills: store.load_wills()?,
                broker_filters: store.load_broker_filters()?,
                store,
                sessions,
                set_aside: None,
            }),
            Err(damage @ StoreError::Damaged { .. }) if recover => {
                let secs = super::unix_millis(SystemTime::now()) / 1000;
                let aside = dir.join(format!("{STORE_FILE}.damaged-{secs}"));
                std::fs::rename(&path, &aside).map_err(|source| StoreError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                let (store, sessions) = Self::open_file(&path)?;
                Ok(Opened {
                    wills: store.load_wills()?,
                    broker_filters: store.load_broker_filters()?,
                    store,
                    sessions,
                    set_aside: Some((aside, damage)),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Opens (or creates) the store file at `path` and reads it whole (which checks every
    /// page it reads against its checksum, and every value against its encoding).
    pub fn open_file(path: &Path) -> Result<(RedbStore, Vec<StoredSession>), StoreError> {
        let shown = path.display().to_string();
        let damaged = |why: String| StoreError::Damaged {
            path: shown.clone(),
            why,
        };
        // redb reports damage as errors; should a garbled page reach a panic inside it
        // instead, that is damage too, not a reason for the gateway to die with a trace.
        let opened = catch_unwind(AssertUnwindSafe(|| Database::builder().create(path)))
            .map_err(|_| damaged("the store library failed reading it".into()))?;
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse { path: shown }),
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) if environmental(&e) => {
                return Err(StoreError::Io { path: shown, source: e })
            }
            Err(e) => return Err(damaged(e.to_string())),
        };
        let store = RedbStore {
            db,
            path: path.to_path_buf(),
        };
        let read = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<StoredSession>, StoreError> {
            store.check_schema()?;
            store.load()
        }));
        match read {
            Ok(Ok(sessions)) => Ok((store, sessions)),
            Ok(Err(StoreError::Failed(why))) => Err(damaged(why)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(damaged("the store library failed reading it".into())),
        }
    }

    /// Reads the schema version; a new store gets [`SCHEMA_VERSION`] and its tables.
    fn check_schema(&self) -> Result<(), StoreError> {
        let found = {
            let txn = self.db.begin_read().map_err(failed)?;
            match txn.open_table(META) {
                Ok(meta) => Some(meta.get(VERSION_KEY).map_err(failed)?.map(|v| v.value())),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(failed(e)),
            }
        };
        match found {
            Some(Some(v)) if v == SCHEMA_VERSION => Ok(()),
            Some(Some(v)) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema {
                path: self.path.display().to_string(),
                found: v,
            }),
            Some(Some(1)) => self.migrate_from_1(),
            // Versions before 1 never existed.
            Some(Some(v)) => Err(StoreError::Failed(format!("unknown schema version {v}"))),
            Some(None) => Err(StoreError::Failed("no schema version".into())),
            None => {
                let txn = self.db.begin_write().map_err(failed)?;
                let has_tables = txn.list_tables().map_err(failed)?.next().is_some();
                if has_tables {
                    return Err(StoreError::Failed(
                        "a redb file without a schema version: not a gateway store".into(),
                    ));
                }
                {
                    txn.open_table(META)
                        .map_err(failed)?
                        .insert(VERSION_KEY, SCHEMA_VERSION)
                        .map_err(failed)?;
                    txn.open_table(SESSIONS).map_err(failed)?;
                    txn.open_table(TOPICS).map_err(failed)?;
                    txn.open_table(HELD).map_err(failed)?;
                    txn.open_table(SUBS).map_err(failed)?;
                    txn.open_table(WILLS).map_err(failed)?;
                    txn.open_table(SLEEPERS).map_err(failed)?;
                    txn.open_table(QOS2).map_err(failed)?;
                    txn.open_table(BROKER_FILTERS).map_err(failed)?;
                }
                txn.commit().map_err(failed)
            }
        }
    }

    /// Version 1 (topic ids and presence only) to 2: the tables of subscriptions, wills
    /// and sleepers are added, empty, since version 1 never stored any. One transaction: a
    /// crash leaves version 1.
    fn migrate_from_1(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(failed)?;
        txn.set_durability(Durability::Immediate);
        {
            txn.open_table(SUBS).map_err(failed)?;
            txn.open_table(WILLS).map_err(failed)?;
            txn.open_table(SLEEPERS).map_err(failed)?;
            txn.open_table(QOS2).map_err(failed)?;
            txn.open_table(BROKER_FILTERS).map_err(failed)?;
            txn.open_table(META)
                .map_err(failed)?
                .insert(VERSION_KEY, SCHEMA_VERSION)
                .map_err(failed)?;
        }
        txn.commit().map_err(failed)?;
        tracing::info!(path = %self.path.display(), "state store migrated from schema version 1 to {SCHEMA_VERSION}");
        Ok(())
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wills stored (see [`StoreOp::Will`]), by client id. One that does not decode
    /// is damage, as any other record.
    pub fn load_wills(&self) -> Result<Vec<(String, HeldMessage)>, StoreError> {
        let damaged = |why: String| StoreError::Damaged {
            path: self.path.display().to_string(),
            why,
        };
        let read = || -> Result<Vec<(String, HeldMessage)>, String> {
            let txn = self.db.begin_read().map_err(|e| e.to_string())?;
            let wills = txn.open_table(WILLS).map_err(|e| e.to_string())?;
            let mut all = Vec::new();
            for row in wills.iter().map_err(|e| e.to_string())? {
                let (k, v) = row.map_err(|e| e.to_string())?;
                all.push((k.value().to_string(), decode_message(v.value(), 0)?));
            }
            Ok(all)
        };
        catch_unwind(AssertUnwindSafe(read))
            .map_err(|_| damaged("the store library failed reading it".into()))?
            .map_err(damaged)
    }
}

impl RedbStore {
    /// The filters stored for the shared connections' sessions (see
    /// [`StoreOp::BrokerFilter`]), by connection.
    pub fn load_broker_filters(&self) -> Result<Vec<(u16, String)>, StoreError> {
        let damaged = |why: String| StoreError::Damaged {
            path: self.path.display().to_string(),
            why,
        };
        let read = || -> Result<Vec<(u16, String)>, String> {
            let txn = self.db.begin_read().map_err(|e| e.to_string())?;
            let table = txn.open_table(BROKER_FILTERS).map_err(|e| e.to_string())?;
            let mut all = Vec::new();
            for row in table.iter().map_err(|e| e.to_string())? {
                let (k, _) = row.map_err(|e| e.to_string())?;
                let (connection, filter) = k.value();
                all.push((connection, filter.to_string()));
            }
            Ok(all)
        };
        catch_unwind(AssertUnwindSafe(read))
            .map_err(|_| damaged("the store library failed reading it".into()))?
            .map_err(damaged)
    }
}

/// An I/O error that says nothing about the file's contents.
fn environmental(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::PermissionDenied | K::NotFound | K::WouldBlock)
}

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(e.to_string())
}

/// `sessions` values: 0 connected, 1 away without expiry, 2 away until (8 octets, big
/// endian milliseconds since the epoch).
fn encode_presence(p: Presence) -> Vec<u8> {
    match p {
        Presence::Connected => vec![0],
        Presence::Away { expires: None } => vec![1],
        Presence::Away { expires: Some(ms) } => {
            let mut v = vec![2];
            v.extend_from_slice(&ms.to_be_bytes());
            v
        }
    }
}

fn decode_presence(v: &[u8]) -> Result<Presence, String> {
    match v {
        [0] => Ok(Presence::Connected),
        [1] => Ok(Presence::Away { expires: None }),
        [2, ms @ ..] => {
            let ms: [u8; 8] = ms
                .try_into()
                .map_err(|_| "a session record of the wrong length".to_string())?;
            Ok(Presence::Away {
                expires: Some(u64::from_be_bytes(ms)),
            })
        }
        _ => Err("a session record of an unknown kind".into()),
    }
}

/// `held` values: QoS, retain (0 or 1), topic length (2 octets, big endian), topic,
/// payload.
fn encode_held(m: &HeldMessage) -> Vec<u8> {
    let topic = m.topic.as_bytes();
    let len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(4 + topic.len() + m.payload.len());
    v.push(m.qos);
    v.push(u8::from(m.retain));
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&topic[..usize::from(len)]);
    v.extend_from_slice(&m.payload);
    v
}

fn decode_held(v: &[u8]) -> Result<HeldMessage, String> {
    decode_message(v, 1)
}

/// A held message or a will (whose QoS may be 0: `min_qos`).
fn decode_message(v: &[u8], min_qos: u8) -> Result<HeldMessage, String> {
    let bad = || "a held message that does not decode".to_string();
    let [qos, retain, a, b, rest @ ..] = v else {
        return Err(bad());
    };
    let len = usize::from(u16::from_be_bytes([*a, *b]));
    if rest.len() < len || !(min_qos..=2).contains(qos) || *retain > 1 {
        return Err(bad());
    }
    let (topic, payload) = rest.split_at(len);
    Ok(HeldMessage {
        topic: String::from_utf8(topic.to_vec()).map_err(|_| bad())?,
        payload: payload.to_vec(),
        qos: *qos,
        retain: *retain == 1,
    })
}

/// `sleepers` values: keep-alive (2 octets), sleep duration (4), link kind (0 UDP, 1
/// serial, 2 DTLS), listener or port index (2), then for UDP and DTLS the address as
/// text (1 octet of length, the text), for DTLS the identity (2 octets of length, the
/// identity), and last the node id of a client behind a forwarder (1 octet of length,
/// 0 for none, the id). Numbers big endian.
fn encode_sleeper(s: &Sleeper) -> Vec<u8> {
    fn text(v: &mut Vec<u8>, t: &str, wide: bool) {
        let b = t.as_bytes();
        if wide {
            let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&b[..usize::from(len)]);
        } else {
            let len = u8::try_from(b.len()).unwrap_or(u8::MAX);
            v.push(len);
            v.extend_from_slice(&b[..usize::from(len)]);
        }
    }
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&s.keep_alive.to_be_bytes());
    v.extend_from_slice(&s.duration_secs.to_be_bytes());
    match &s.peer.link {
        LinkAddr::Udp(i, a) => {
            v.push(0);
            v.extend_from_slice(&i.to_be_bytes());
            text(&mut v, &a.to_string(), false);
        }
        LinkAddr::Serial(i) => {
            v.push(1);
            v.extend_from_slice(&i.to_be_bytes());
        }
        LinkAddr::Dtls(i, a, identity) => {
            v.push(2);
            v.extend_from_slice(&i.to_be_bytes());
            text(&mut v, &a.to_string(), false);
            text(&mut v, identity, true);
        }
    }
    let node = s.peer.node.as_deref().unwrap_or(&[]);
    let len = u8::try_from(node.len()).unwrap_or(u8::MAX);
    v.push(len);
    v.extend_from_slice(&node[..usize::from(len)]);
    v
}

fn decode_sleeper(v: &[u8]) -> Result<Sleeper, String> {
    let bad = || "a sleeper record that does not decode".to_string();
    fn take<'a>(v: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (v.len() >= n).then(|| v.split_at(n))?;
        *v = rest;
        Some(head)
    }
    fn text(v: &mut &[u8], wide: bool) -> Option<String> {
        let len = if wide {
            let b = take(v, 2)?;
            usize::from(u16::from_be_bytes([b[0], b[1]]))
        } else {
            usize::from(*take(v, 1)?.first()?)
        };
        String::from_utf8(take(v, len)?.to_vec()).ok()
    }
    fn decode(r: &mut &[u8]) -> Option<Sleeper> {
        let ka = take(r, 2)?;
        let d = take(r, 4)?;
        let kind = *take(r, 1)?.first()?;
        let i = take(r, 2)?;
        let index = u16::from_be_bytes([i[0], i[1]]);
        let link = match kind {
            0 => LinkAddr::Udp(index, text(r, false)?.parse().ok()?),
            1 => LinkAddr::Serial(index),
            2 => {
                let addr = text(r, false)?.parse().ok()?;
                LinkAddr::Dtls(index, addr, text(r, true)?.into())
            }
            _ => return None,
        };
        let len = usize::from(*take(r, 1)?.first()?);
        let node = take(r, len)?;
        if !r.is_empty() {
            return None;
        }
        Some(Sleeper {
            peer: Peer {
                link,
                node: (!node.is_empty()).then(|| node.into()),
            },
            keep_alive: u16::from_be_bytes([ka[0], ka[1]]),
            duration_secs: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        })
    }
    let mut v = v;
    decode(&mut v).ok_or_else(bad)
}

impl RedbStore {
    /// Applies `ops` in one write transaction, then calls `before_commit` with the
    /// file's path (tests copy the file there: a crash in the middle of a commit), then
    /// commits if it returns true, or drops the transaction (an abort) if not.
    pub(super) fn write(
        &mut self,
        ops: &[StoreOp],
        before_commit: impl FnOnce(&Path) -> bool,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(failed)?;
        txn.set_durability(Durability::Immediate);
        txn.set_quick_repair(false);
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(failed)?;
            let mut topics = txn.open_table(TOPICS).map_err(failed)?;
            let mut held = txn.open_table(HELD).map_err(failed)?;
            let mut subs = txn.open_table(SUBS).map_err(failed)?;
            let mut wills = txn.open_table(WILLS).map_err(failed)?;
            let mut sleepers = txn.open_table(SLEEPERS).map_err(failed)?;
            let mut qos2 = txn.open_table(QOS2).map_err(failed)?;
            let mut broker_filters = txn.open_table(BROKER_FILTERS).map_err(failed)?;
            for op in ops {
                match op {
                    StoreOp::Connected {
                        client_id,
                        topics: entries,
                    } => {
                        let id: &str = client_id;
                        topics
                            .retain_in((id, 0u16)..=(id, u16::MAX), |_, _| false)
                            .map_err(failed)?;
                        sleepers.remove(id).map_err(failed)?;
                        sessions
                            .insert(id, encode_presence(Presence::Connected).as_slice())
                            .map_err(failed)?;
                        for (topic_id, name) in entries {
                            topics.insert((id, *topic_id), &**name).map_err(failed)?;
                        }
                    }
                    StoreOp::Away { client_id, expires } => {
                        let presence = encode_presence(Presence::Away { expires: *expires });
                        sessions.insert(&**client_id, presence.as_slice()).map_err(failed)?;
                        sleepers.remove(&**client_id).map_err(failed)?;
                    }
                    StoreOp::Topic { client_id, id, name } => {
                        topics.insert((&**client_id, *id), &**name).map_err(failed)?;
                    }
                    StoreOp::Untopic { client_id, id } => {
                        topics.remove((&**client_id, *id)).map_err(failed)?;
                    }
                    StoreOp::Forget { client_id } => {
                        let id: &str = client_id;
                        sessions.remove(id).map_err(failed)?;
                        sleepers.remove(id).map_err(failed)?;
                        qos2.retain_in((id, 0u16)..=(id, u16::MAX), |_, _| false)
                            .map_err(failed)?;
                        topics
                            .retain_in((id, 0u16)..=(id, u16::MAX), |_, _| false)
                            .map_err(failed)?;
                        held.retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)
                            .map_err(failed)?;
                        let mut filters = Vec::new();
                        for row in subs.range((id, "")..).map_err(failed)? {
                            let (k, _) = row.map_err(failed)?;
                            let (client, filter) = k.value();
                            if client != id {
                                break;
                            }
                            filters.push(filter.to_string());
                        }
                        for filter in filters {
                            subs.remove((id, filter.as_str())).map_err(failed)?;
                        }
                    }
                    StoreOp::PutHeld {
                        client_id,
                        seq,
                        message,
                    } => {
                        held.insert((&**client_id, *seq), encode_held(message).as_slice())
                            .map_err(failed)?;
                    }
                    StoreOp::RemoveHeld { client_id, seq } => {
                        held.remove((&**client_id, *seq)).map_err(failed)?;
                    }
                    StoreOp::Subscribe { client_id, filter, qos } => {
                        subs.insert((&**client_id, &**filter), *qos).map_err(failed)?;
                    }
                    StoreOp::Unsubscribe { client_id, filter } => {
                        subs.remove((&**client_id, &**filter)).map_err(failed)?;
                    }
                    StoreOp::Will {
                        client_id,
                        will: Some(w),
                    } => {
                        wills.insert(&**client_id, encode_held(w).as_slice()).map_err(failed)?;
                    }
                    StoreOp::Will { client_id, will: None } => {
                        wills.remove(&**client_id).map_err(failed)?;
                    }
                    StoreOp::Sleep {
                        client_id,
                        sleeper: Some(sleeper),
                    } => {
                        sleepers
                            .insert(&**client_id, encode_sleeper(sleeper).as_slice())
                            .map_err(failed)?;
                    }
                    StoreOp::Sleep {
                        client_id,
                        sleeper: None,
                    } => {
                        sleepers.remove(&**client_id).map_err(failed)?;
                    }
                    StoreOp::Qos2 {
                        client_id,
                        msg_id,
                        state: Some(q),
                    } => {
                        let mut v = [0u8; 9];
                        v[0] = u8::from(q.released);
                        v[1..].copy_from_slice(&q.digest.to_be_bytes());
                        qos2.insert((&**client_id, *msg_id), v.as_slice()).map_err(failed)?;
                    }
                    StoreOp::Qos2 {
                        client_id,
                        msg_id,
                        state: None,
                    } => {
                        qos2.remove((&**client_id, *msg_id)).map_err(failed)?;
                    }
                    StoreOp::BrokerFilter {
                        connection,
                        filter,
                        held: true,
                    } => {
                        broker_filters.insert((*connection, &**filter), 0).map_err(failed)?;
                    }
                    StoreOp::BrokerFilter {
                        connection,
                        filter,
                        held: false,
                    } => {
                        broker_filters.remove((*connection, &**filter)).map_err(failed)?;
                    }
                }
            }
        }
        if before_commit(&self.path) {
            txn.commit().map_err(failed)
        } else {
            txn.abort().map_err(failed)
        }
    }
}

impl StateStore for RedbStore {
    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.write(ops, |_| true)
    }

    fn load(&self) -> Result<Vec<StoredSession>, StoreError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let mut all: BTreeMap<String, StoredSession> = BTreeMap::new();
        let sessions = txn.open_table(SESSIONS).map_err(failed)?;
        for row in sessions.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let presence = decode_presence(v.value()).map_err(StoreError::Failed)?;
            session_of(&mut all, k.value()).presence = presence;
        }
        let topics = txn.open_table(TOPICS).map_err(failed)?;
        for row in topics.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let (client, id) = k.value();
            session_of(&mut all, client).topics.push((id, v.value().to_string()));
        }
        let held = txn.open_table(HELD).map_err(failed)?;
        for row in held.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let (client, seq) = k.value();
            let message = decode_held(v.value()).map_err(StoreError::Failed)?;
            session_of(&mut all, client).held.push((seq, message));
        }
        let subs = txn.open_table(SUBS).map_err(failed)?;
        for row in subs.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let (client, filter) = k.value();
            let qos = v.value();
            if qos > 2 {
                return Err(StoreError::Failed(format!("a subscription with QoS {qos}")));
            }
            session_of(&mut all, client).subs.push((filter.to_string(), qos));
        }
        let sleepers = txn.open_table(SLEEPERS).map_err(failed)?;
        for row in sleepers.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let sleeper = decode_sleeper(v.value()).map_err(StoreError::Failed)?;
            session_of(&mut all, k.value()).sleeper = Some(sleeper);
        }
        let qos2 = txn.open_table(QOS2).map_err(failed)?;
        for row in qos2.iter().map_err(failed)? {
            let (k, v) = row.map_err(failed)?;
            let (client, msg_id) = k.value();
            let state = match v.value() {
                [released @ (0 | 1), digest @ ..] if digest.len() == 8 => {
                    let mut d = [0u8; 8];
                    d.copy_from_slice(digest);
                    Qos2State {
                        digest: u64::from_be_bytes(d),
                        released: *released == 1,
                    }
                }
                _ => return Err(StoreError::Failed("a QoS 2 record that does not decode".into())),
            };
            session_of(&mut all, client).qos2.push((msg_id, state));
        }
        Ok(all.into_values().collect())
    }
}

/// The session of `id` in `all`, created (connected, empty) if it is not there yet.
fn session_of<'a>(all: &'a mut BTreeMap<String, StoredSession>, id: &str) -> &'a mut StoredSession {
    all.entry(id.to_string()).or_insert_with(|| StoredSession {
        client_id: id.to_string(),
        // Topic ids without a session record: written while connected.
        presence: Presence::Connected,
        topics: Vec::new(),
        held: Vec::new(),
        subs: Vec::new(),
        sleeper: None,
        qos2: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        for p in [
            Presence::Connected,
            Presence::Away { expires: None },
            Presence::Away {
                expires: Some(1_700_000_000_123),
            },
        ] {
            assert_eq!(decode_presence(&encode_presence(p)), Ok(p));
        }
        assert!(decode_presence(&[2, 1, 2]).is_err());
        assert!(decode_presence(&[9]).is_err());
        let m = HeldMessage {
            topic: "a/b".into(),
            payload: vec![1, 2, 3],
            qos: 2,
            retain: true,
        };
        assert_eq!(decode_held(&encode_held(&m)), Ok(m));
        assert!(decode_held(&[1, 0, 0, 9, b'a']).is_err());
        assert!(decode_held(&[3, 0, 0, 0]).is_err());
        let addr: std::net::SocketAddr = "[::1]:4000".parse().expect("address");
        for peer in [
            Peer::direct(LinkAddr::Udp(3, addr)),
            Peer::direct(LinkAddr::Serial(1)),
            Peer::direct(LinkAddr::Dtls(0, addr, "sensor-7".into())),
            Peer {
                link: LinkAddr::Udp(0, addr),
                node: Some(vec![0xab, 0x01].into()),
            },
        ] {
            let s = Sleeper {
                peer,
                keep_alive: 60,
                duration_secs: 86_400,
            };
            let bytes = encode_sleeper(&s);
            assert_eq!(decode_sleeper(&bytes), Ok(s));
            for cut in 0..bytes.len() {
                assert!(decode_sleeper(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        assert!(decode_sleeper(&[0, 60, 0, 0, 0, 9, 7, 0, 0, 0]).is_err());
    }
}
