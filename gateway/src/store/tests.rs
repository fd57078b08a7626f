//! The store against a model: any sequence of operations, interrupted anywhere, reads
//! back as the state after some commit (the last one, when the interruption is a dropped
//! transaction or a copy of the file taken in the middle of one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// A fresh directory under the system's temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gateway-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the store should hold: the operations' meaning, written plainly. The set holds
/// the client ids with a session record (`Connected`, `Away`); a client with only topic
/// ids or held messages is read back too (as connected), one with nothing is not.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model(BTreeMap<String, StoredSession>, BTreeSet<String>);

impl Model {
    fn session(&mut self, id: &str) -> &mut StoredSession {
        self.0.entry(id.to_string()).or_insert_with(|| StoredSession {
            client_id: id.to_string(),
            presence: Presence::Connected,
            topics: Vec::new(),
            held: Vec::new(),
            subs: Vec::new(),
            sleeper: None,
            qos2: Vec::new(),
        })
    }

    fn apply(&mut self, op: &StoreOp) {
        match op {
            StoreOp::Connected { client_id, topics } => {
                self.1.insert(client_id.to_string());
                let s = self.session(client_id);
                s.presence = Presence::Connected;
                s.sleeper = None;
                s.topics.clear();
                for (id, name) in topics {
                    s.topics.retain(|(i, _)| i != id);
                    s.topics.push((*id, name.to_string()));
                }
                s.topics.sort();
            }
            StoreOp::Away { client_id, expires } => {
                self.1.insert(client_id.to_string());
                let s = self.session(client_id);
                s.presence = Presence::Away { expires: *expires };
                s.sleeper = None;
            }
            StoreOp::Topic { client_id, id, name } => {
                let s = self.session(client_id);
                s.topics.retain(|(i, _)| i != id);
                s.topics.push((*id, name.to_string()));
                s.topics.sort();
            }
            StoreOp::Untopic { client_id, id } => {
                if let Some(s) = self.0.get_mut(&**client_id) {
                    s.topics.retain(|(i, _)| i != id);
                }
            }
            StoreOp::Forget { client_id } => {
                self.0.remove(&**client_id);
                self.1.remove(&**client_id);
            }
            StoreOp::PutHeld {
                client_id,
                seq,
                message,
            } => {
                let s = self.session(client_id);
                s.held.retain(|(q, _)| q != seq);
                s.held.push((*seq, message.clone()));
                s.held.sort_by_key(|(q, _)| *q);
            }
            StoreOp::RemoveHeld { client_id, seq } => {
                if let Some(s) = self.0.get_mut(&**client_id) {
                    s.held.retain(|(q, _)| q != seq);
                }
            }
            StoreOp::Subscribe { client_id, filter, qos } => {
                let s = self.session(client_id);
                s.subs.retain(|(f, _)| **f != **filter);
                s.subs.push((filter.to_string(), *qos));
                s.subs.sort();
            }
            StoreOp::Unsubscribe { client_id, filter } => {
                if let Some(s) = self.0.get_mut(&**client_id) {
                    s.subs.retain(|(f, _)| **f != **filter);
                }
            }
            // Read back apart from the sessions (RedbStore::load_wills,
            // load_broker_filters).
            StoreOp::Will { .. } | StoreOp::BrokerFilter { .. } => {}
            StoreOp::Sleep {
                client_id,
                sleeper: Some(sleeper),
            } => self.session(client_id).sleeper = Some(sleeper.clone()),
            StoreOp::Sleep {
                client_id,
                sleeper: None,
            } => {
                if let Some(s) = self.0.get_mut(&**client_id) {
                    s.sleeper = None;
                }
            }
            StoreOp::Qos2 {
                client_id,
                msg_id,
                state: Some(q),
            } => {
                let s = self.session(client_id);
                s.qos2.retain(|(m, _)| m != msg_id);
                s.qos2.push((*msg_id, *q));
                s.qos2.sort_by_key(|(m, _)| *m);
            }
            StoreOp::Qos2 {
                client_id,
                msg_id,
                state: None,
            } => {
                if let Some(s) = self.0.get_mut(&**client_id) {
                    s.qos2.retain(|(m, _)| m != msg_id);
                }
            }
        }
    }

    /// What a load returns, by client id.
    fn sessions(&self) -> Vec<StoredSession> {
        self.0
            .values()
            .filter(|s| {
                self.1.contains(&s.client_id)
                    || !s.topics.is_empty()
                    || !s.held.is_empty()
                    || !s.subs.is_empty()
                    || s.sleeper.is_some()
                    || !s.qos2.is_empty()
            })
            .cloned()
            .collect()
    }
}

fn op() -> impl Strategy<Value = StoreOp> {
    let client = prop::sample::select(vec!["dev-a", "dev-b", "dev-c"]).prop_map(Arc::<str>::from);
    let name = prop::sample::select(vec!["s/1", "s/2", "a/b/c", "t"]).prop_map(Arc::<str>::from);
    let id = 1u16..6;
    // "a" and "a/#" and "ab" sort next to one another: a client's range must not reach its
    // neighbours'.
    let filter = prop::sample::select(vec!["a", "a/#", "ab", "+/x", ""]).prop_map(Arc::<str>::from);
    prop_oneof![
        (client.clone(), prop::collection::vec((id.clone(), name.clone()), 0..4))
            .prop_map(|(client_id, topics)| StoreOp::Connected { client_id, topics }),
        (client.clone(), prop::option::of(0u64..u64::MAX))
            .prop_map(|(client_id, expires)| StoreOp::Away { client_id, expires }),
        (client.clone(), id.clone(), name).prop_map(|(client_id, id, name)| StoreOp::Topic { client_id, id, name }),
        (client.clone(), id).prop_map(|(client_id, id)| StoreOp::Untopic { client_id, id }),
        client.clone().prop_map(|client_id| StoreOp::Forget { client_id }),
        (
            client.clone(),
            0u64..4,
            prop::collection::vec(any::<u8>(), 0..20),
            1u8..3,
            any::<bool>()
        )
            .prop_map(|(client_id, seq, payload, qos, retain)| StoreOp::PutHeld {
                client_id,
                seq,
                message: HeldMessage {
                    topic: "h/x".into(),
                    payload,
                    qos,
                    retain,
                },
            }),
        (client.clone(), 0u64..4).prop_map(|(client_id, seq)| StoreOp::RemoveHeld { client_id, seq }),
        (client.clone(), filter.clone(), 0u8..3).prop_map(|(client_id, filter, qos)| StoreOp::Subscribe {
            client_id,
            filter,
            qos
        }),
        (client.clone(), filter.clone()).prop_map(|(client_id, filter)| StoreOp::Unsubscribe { client_id, filter }),
        (client.clone(), prop::option::of((0u16..3, 0u32..100_000))).prop_map(|(client_id, sleep)| {
            StoreOp::Sleep {
                client_id,
                sleeper: sleep.map(|(port, duration_secs)| crate::store::Sleeper {
                    peer: crate::link::Peer::direct(crate::link::LinkAddr::Serial(port)),
                    keep_alive: 30,
                    duration_secs,
                }),
            }
        }),
        (client.clone(), 1u16..4, prop::option::of((any::<u64>(), any::<bool>()))).prop_map(
            |(client_id, msg_id, state)| StoreOp::Qos2 {
                client_id,
                msg_id,
                state: state.map(|(digest, released)| crate::store::Qos2State { digest, released }),
            }
        ),
        (0u16..2, filter, any::<bool>()).prop_map(|(connection, filter, held)| StoreOp::BrokerFilter {
            connection,
            filter,
            held
        }),
        (client, prop::option::of(0u8..3)).prop_map(|(client_id, qos)| StoreOp::Will {
            client_id,
            will: qos.map(|qos| HeldMessage {
                topic: "w".into(),
                payload: vec![qos],
                qos,
                retain: false
            })
        }),
    ]
}

/// How one batch of operations ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Committed.
    Commit,
    /// The transaction is dropped without a commit (the process died before it).
    Abort,
    /// The file is copied after the operations are written and before the commit (what
    /// a `kill -9` at that instant leaves on disk), then committed.
    CopyMidway,
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![3 => Just(End::Commit), 1 => Just(End::Abort), 1 => Just(End::CopyMidway)]
}

/// What the store in `dir` holds, read as a restarted gateway reads it.
fn load_dir(dir: &Path) -> Result<Vec<StoredSession>, StoreError> {
    RedbStore::open_file(&dir.join(STORE_FILE)).map(|(_, s)| s)
}

proptest! {
    // Each commit is an fsync: few cases, each a long sequence.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn an_interrupted_store_reopens_to_what_was_committed(
        batches in prop::collection::vec((prop::collection::vec(op(), 1..6), end()), 1..8)
    ) {
        let scratch = Scratch::new();
        let live = scratch.0.join("live");
        let mut store = RedbStore::open(&live, false).expect("a new store").store;
        let mut committed = Model::default();
        for (i, (ops, end)) in batches.iter().enumerate() {
            let copy = scratch.0.join(format!("copy-{i}"));
            let mut next = committed.clone();
            for op in ops {
                next.apply(op);
            }
            match end {
                End::Commit => {
                    store.write(ops, |_| true).expect("commit");
                    committed = next;
                }
                End::Abort => {
                    store.write(ops, |_| false).expect("abort");
                }
                End::CopyMidway => {
                    store.write(ops, |path| {
                        std::fs::create_dir_all(&copy).expect("copy directory");
                        std::fs::copy(path, copy.join(STORE_FILE)).expect("copy");
                        true
                    }).expect("commit");
                    // The copy was taken before this commit: it holds the state before.
                    let read = load_dir(&copy).expect("a copy taken mid-commit opens");
                    prop_assert_eq!(read, committed.sessions(), "copy taken in batch {}", i);
                    committed = next;
                }
            }
            // What the live store holds is exactly what was committed so far.
            prop_assert_eq!(store.load().expect("load"), committed.sessions());
        }
        // The process dies (no clean close): the file reopens to the last commit.
        drop(store);
        prop_assert_eq!(load_dir(&live).expect("reopens"), committed.sessions());
    }

    #[test]
    fn a_truncated_store_is_refused_or_reads_as_a_committed_state(
        batches in prop::collection::vec(prop::collection::vec(op(), 1..6), 1..6),
        cut in 0.0f64..1.0,
    ) {
        let scratch = Scratch::new();
        let live = scratch.0.join("live");
        let mut store = RedbStore::open(&live, false).expect("a new store").store;
        let mut model = Model::default();
        let mut states = vec![model.sessions()];
        for ops in &batches {
            store.commit(ops).expect("commit");
            for op in ops {
                model.apply(op);
            }
            states.push(model.sessions());
        }
        drop(store);
        let file = live.join(STORE_FILE);
        let len = std::fs::metadata(&file).expect("metadata").len();
        // Truncate a copy somewhere past the start (a zero-length file is a new store).
        let at = 1 + ((len - 1) as f64 * cut) as u64;
        let cut_dir = scratch.0.join("cut");
        std::fs::create_dir_all(&cut_dir).expect("dir");
        std::fs::copy(&file, cut_dir.join(STORE_FILE)).expect("copy");
        let f = std::fs::OpenOptions::new().write(true).open(cut_dir.join(STORE_FILE)).expect("open");
        f.set_len(at).expect("truncate");
        drop(f);
        match load_dir(&cut_dir) {
            Ok(read) => prop_assert!(states.contains(&read), "a truncated store read as a state never committed: {:?}", read),
            Err(StoreError::Damaged { .. }) => {}
            Err(e) => prop_assert!(false, "a truncated store gave {e}, not Damaged"),
        }
    }
}

#[test]
fn a_garbled_store_is_damaged_and_recover_sets_it_aside() {
    let scratch = Scratch::new();
    let dir = scratch.0.join("state");
    let mut store = RedbStore::open(&dir, false).expect("new").store;
    store
        .commit(&[StoreOp::Connected {
            client_id: "dev".into(),
            topics: vec![(1, "a/b".into())],
        }])
        .expect("commit");
    drop(store);
    let file = dir.join(STORE_FILE);
    let mut bytes = std::fs::read(&file).expect("read");
    // Garble everything past the first 64 octets (the header's magic stays).
    for b in bytes.iter_mut().skip(64) {
        *b = !*b;
    }
    std::fs::write(&file, &bytes).expect("write");
    let err = RedbStore::open(&dir, false).expect_err("a garbled store is refused");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("gateway.redb"), "{err}");
    let opened = RedbStore::open(&dir, true).expect("recover starts afresh");
    assert!(opened.sessions.is_empty());
    let (aside, why) = opened.set_aside.expect("the damaged file was set aside");
    assert!(matches!(why, StoreError::Damaged { .. }));
    assert_eq!(std::fs::read(&aside).expect("kept aside"), bytes, "kept as it was");
}

#[test]
fn a_newer_schema_is_refused_even_with_recover() {
    let scratch = Scratch::new();
    let dir = scratch.0.join("state");
    drop(RedbStore::open(&dir, false).expect("new"));
    {
        let db = redb::Database::create(dir.join(STORE_FILE)).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .expect("meta")
            .insert("schema_version", SCHEMA_VERSION + 1)
            .expect("insert");
        txn.commit().expect("commit");
    }
    for recover in [false, true] {
        let err = RedbStore::open(&dir, recover).expect_err("refused");
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
    }
}

#[test]
fn a_version_1_store_is_migrated_and_keeps_what_it_held() {
    let scratch = Scratch::new();
    let dir = scratch.0.join("state");
    std::fs::create_dir_all(&dir).expect("dir");
    {
        // A store as version 1 wrote it: no subscriptions table.
        let db = redb::Database::create(dir.join(STORE_FILE)).expect("create");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .expect("meta")
            .insert("schema_version", 1)
            .expect("insert");
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("sessions"))
            .expect("sessions")
            .insert("dev", [1u8].as_slice())
            .expect("insert");
        txn.open_table(redb::TableDefinition::<(&str, u16), &str>::new("topics"))
            .expect("topics")
            .insert(("dev", 3), "a/b")
            .expect("insert");
        txn.open_table(redb::TableDefinition::<(&str, u64), &[u8]>::new("held"))
            .expect("held");
        txn.commit().expect("commit");
    }
    let mut opened = RedbStore::open(&dir, false).expect("a version 1 store opens");
    assert_eq!(opened.sessions.len(), 1);
    assert_eq!(opened.sessions[0].topics, vec![(3, "a/b".to_string())]);
    assert_eq!(opened.sessions[0].presence, Presence::Away { expires: None });
    // The migrated store takes subscriptions, and says it is version 2 from now on.
    opened
        .store
        .commit(&[StoreOp::Subscribe {
            client_id: "dev".into(),
            filter: "a/#".into(),
            qos: 1,
        }])
        .expect("commit");
    drop(opened);
    let read = load_dir(&dir).expect("reopens");
    assert_eq!(read[0].subs, vec![("a/#".to_string(), 1)]);
    let db = redb::Database::open(dir.join(STORE_FILE)).expect("open");
    let txn = db.begin_read().expect("txn");
    let meta = txn
        .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
        .expect("meta");
    let version = meta.get("schema_version").expect("read").map(|v| v.value());
    assert_eq!(version, Some(SCHEMA_VERSION));
}

#[test]
fn wills_are_kept_apart_from_sessions_and_survive_forget() {
    let scratch = Scratch::new();
    let dir = scratch.0.join("state");
    let mut store = RedbStore::open(&dir, false).expect("new").store;
    let will = |qos| HeldMessage {
        topic: "gone/x".into(),
        payload: b"bye".to_vec(),
        qos,
        retain: true,
    };
    store
        .commit(&[
            StoreOp::Will {
                client_id: "a".into(),
                will: Some(will(0)),
            },
            StoreOp::Will {
                client_id: "b".into(),
                will: Some(will(2)),
            },
            StoreOp::Will {
                client_id: "c".into(),
                will: Some(will(1)),
            },
            StoreOp::Will {
                client_id: "c".into(),
                will: None,
            },
            // The engine's Forget (a clean-session CONNECT) leaves the will to the link.
            StoreOp::Forget { client_id: "b".into() },
        ])
        .expect("commit");
    drop(store);
    let opened = RedbStore::open(&dir, false).expect("reopens");
    assert!(
        opened.sessions.is_empty(),
        "a will is no session: {:?}",
        opened.sessions
    );
    assert_eq!(
        opened.wills,
        vec![("a".to_string(), will(0)), ("b".to_string(), will(2))]
    );
}

#[test]
fn a_second_process_on_the_same_directory_is_refused() {
    let scratch = Scratch::new();
    let _first = RedbStore::open(&scratch.0, false).expect("new");
    let err = RedbStore::open(&scratch.0, false).expect_err("in use");
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
}

#[test]
fn a_file_that_is_no_store_is_damaged() {
    let scratch = Scratch::new();
    std::fs::write(scratch.0.join(STORE_FILE), b"not a database, just some text\n").expect("write");
    let err = RedbStore::open(&scratch.0, false).expect_err("refused");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
}
