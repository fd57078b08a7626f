//! The engine with a state store: what it queues for the store, the durability rule
//! (nothing answers a registration before it is stored), and a restart from what a real
//! store file holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use super::tests::{cfg, dev, T};
use super::*;
use crate::store::{RedbStore, StateStore, StoreOp};
use sn_codec::{Connect, Publish, RegAck, Register, ReturnCode, TopicRef};

/// A store in a fresh directory under the system's temporary directory.
struct Disk {
    dir: PathBuf,
    store: Option<RedbStore>,
}

impl Disk {
    fn new(name: &str) -> Disk {
        let dir = std::env::temp_dir().join(format!("gateway-engine-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RedbStore::open(&dir, false).unwrap().store;
        Disk {
            dir,
            store: Some(store),
        }
    }

    /// What the runtime does between events: commit what the engine queued.
    fn settle(&mut self, t: &mut T) -> Vec<StoreOp> {
        let ops = t.gw.take_store_ops();
        self.store.as_mut().unwrap().commit(&ops).unwrap();
        t.gw.store_committed(true);
        ops
    }

    /// The gateway dies (no clean close); a new one starts from the same directory.
    fn restart(&mut self, t: &mut T, wall: SystemTime) -> Restored {
        self.store = None;
        let opened = RedbStore::open(&self.dir, false).unwrap();
        self.store = Some(opened.store);
        *t = T::with(t.gw.config().clone());
        let restored = t.gw.restore(t.now, wall, opened.sessions);
        self.settle(t);
        restored
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.store = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CONNECT (no will) accepted by the broker, the store settled, CONNACK received.
fn connect(t: &mut T, disk: &mut Disk, from: &LinkAddr, id: &str, clean: bool) -> ClientKey {
    t.send(
        from,
        Packet::Connect(Connect {
            will: false,
            clean_session: clean,
            duration: 60,
            client_id: id,
        }),
    );
    let key = match t.cmds().as_slice() {
        [.., (key, Command::Connect(_))] => *key,
        other => panic!("expected a broker connect, got {other:?}"),
    };
    t.event(key, BrokerEvent::Connected { session_present: false });
    disk.settle(t);
    t.expect(from, &[Packet::ConnAck(ReturnCode::Accepted)]);
    key
}

fn register(t: &mut T, from: &LinkAddr, name: &str, msg_id: u16) {
    t.send(
        from,
        Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name: name,
        }),
    );
}

fn publish(t: &mut T, from: &LinkAddr, topic_id: u16) {
    t.send(
        from,
        Packet::Publish(Publish {
            dup: false,
            qos: sn_codec::QoS::AtMostOnce,
            retain: false,
            topic: TopicRef::Normal(topic_id),
            msg_id: 0,
            data: b"21.5",
        }),
    );
}

#[test]
fn a_regack_waits_until_the_registration_is_stored() {
    let mut t = T::with(cfg());
    let mut disk = Disk::new("regack");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let d = dev(1);
    connect(&mut t, &mut disk, &d, "keeper", false);
    register(&mut t, &d, "sensors/a", 7);
    assert!(t.gw.store_pending());
    assert!(
        t.gw.poll_transmit().is_none(),
        "REGACK before the registration is stored"
    );
    let ops = disk.settle(&mut t);
    assert_eq!(
        ops,
        vec![StoreOp::Topic {
            client_id: "keeper".into(),
            id: 1,
            name: "sensors/a".into()
        }]
    );
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 1,
            msg_id: 7,
            code: ReturnCode::Accepted,
        })],
    );
}

#[test]
fn a_clean_session_device_writes_nothing_and_drops_what_was_kept() {
    let mut t = T::with(cfg());
    let mut disk = Disk::new("clean");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let d = dev(1);
    connect(&mut t, &mut disk, &d, "c", true);
    register(&mut t, &d, "sensors/a", 1);
    assert!(!t.gw.store_pending(), "a clean session's registration is not stored");
    assert_eq!(t.tx().len(), 1);
    // The same client id, clean session false, then clean again: kept, then dropped.
    t.send(&d, Packet::Disconnect(None));
    disk.settle(&mut t);
    t.tx();
    connect(&mut t, &mut disk, &d, "c", false);
    register(&mut t, &d, "sensors/b", 2);
    disk.settle(&mut t);
    t.send(&d, Packet::Disconnect(None));
    disk.settle(&mut t);
    t.tx();
    t.cmds();
    assert_eq!(disk.store.as_ref().unwrap().load().unwrap().len(), 1);
    connect(&mut t, &mut disk, &d, "c", true);
    assert!(disk.store.as_ref().unwrap().load().unwrap().is_empty());
}

#[test]
fn topic_ids_survive_a_crash_while_connected_and_publishes_with_them_reach_the_broker() {
    let mut t = T::with(cfg());
    let mut disk = Disk::new("crash");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let d = dev(1);
    connect(&mut t, &mut disk, &d, "keeper", false);
    register(&mut t, &d, "sensors/a", 1);
    register(&mut t, &d, "sensors/b", 2);
    disk.settle(&mut t);
    assert_eq!(t.tx().len(), 2);
    // kill -9: nothing more is written.
    let restored = disk.restart(&mut t, SystemTime::now());
    assert_eq!(restored.kept, 1);
    assert_eq!(t.gw.stats().persisted_sessions, 1);
    let key = connect(&mut t, &mut disk, &d, "keeper", false);
    publish(&mut t, &d, 2);
    match t.cmds().as_slice() {
        [(k, Command::Publish { topic, .. })] => {
            assert_eq!(*k, key);
            assert_eq!(&**topic, "sensors/b");
        }
        other => panic!("expected the publish on sensors/b, got {other:?}"),
    }
    t.expect_nothing();
    assert_eq!(t.gw.stats().metrics.invalid_topic, 0);
    // A new registration takes a new id, not one in use before the restart.
    register(&mut t, &d, "sensors/c", 3);
    disk.settle(&mut t);
    t.expect(
        &d,
        &[Packet::RegAck(RegAck {
            topic_id: 3,
            msg_id: 3,
            code: ReturnCode::Accepted,
        })],
    );
}

#[test]
fn session_expiry_runs_on_wall_clock_time_across_a_restart() {
    let mut t = T::with(EngineConfig {
        session_expiry: Some(Duration::from_secs(100)),
        ..cfg()
    });
    let mut disk = Disk::new("expiry");
    let wall = SystemTime::now();
    t.gw.restore(t.now, wall, Vec::new());
    let (a, b) = (dev(1), dev(2));
    connect(&mut t, &mut disk, &a, "early", false);
    register(&mut t, &a, "x", 1);
    t.send(&a, Packet::Disconnect(None));
    disk.settle(&mut t);
    t.tx();
    t.cmds();
    t.at(50.0);
    connect(&mut t, &mut disk, &b, "late", false);
    register(&mut t, &b, "y", 1);
    t.send(&b, Packet::Disconnect(None));
    disk.settle(&mut t);
    // Down from 50 s to 120 s of wall-clock time: "early" (gone at 0 s) expired at
    // 100 s, "late" (gone at 50 s) expires at 150 s, 30 s after the restart.
    let restored = disk.restart(&mut t, wall + Duration::from_secs(120));
    assert_eq!((restored.kept, restored.expired), (1, 1));
    assert_eq!(t.gw.stats().metrics.sessions_expired, 1);
    assert_eq!(t.gw.poll_timeout(), Some(t.now + Duration::from_secs(30)));
    t.at(30.0);
    disk.settle(&mut t);
    assert_eq!(t.gw.stats().persisted_sessions, 0);
    assert!(
        disk.store.as_ref().unwrap().load().unwrap().is_empty(),
        "expired in the store too"
    );
}

#[test]
fn a_device_connected_at_the_crash_starts_its_expiry_at_the_restart() {
    let mut t = T::with(EngineConfig {
        session_expiry: Some(Duration::from_secs(100)),
        ..cfg()
    });
    let mut disk = Disk::new("connected");
    let wall = SystemTime::now();
    t.gw.restore(t.now, wall, Vec::new());
    let d = dev(1);
    connect(&mut t, &mut disk, &d, "on", false);
    register(&mut t, &d, "x", 1);
    disk.settle(&mut t);
    // Restarted a long time later: kept for the expiry from now.
    let restored = disk.restart(&mut t, wall + Duration::from_secs(10_000));
    assert_eq!(restored.kept, 1);
    assert_eq!(t.gw.poll_timeout(), Some(t.now + Duration::from_secs(100)));
}

#[test]
fn a_lowered_expiry_bounds_what_was_stored_and_a_far_deadline_does_not_overflow() {
    let wall = SystemTime::now();
    let now_ms = crate::store::unix_millis(wall);
    let stored = |id: &str, expires| crate::store::StoredSession {
        client_id: id.into(),
        presence: crate::store::Presence::Away { expires },
        topics: vec![(1, "x".into())],
        held: Vec::new(),
        subs: Vec::new(),
    };
    let mut t = T::with(EngineConfig {
        session_expiry: Some(Duration::from_secs(10)),
        ..cfg()
    });
    let restored = t.gw.restore(
        t.now,
        wall,
        vec![stored("far", Some(u64::MAX)), stored("soon", Some(now_ms + 5_000))],
    );
    assert_eq!(restored.kept, 2);
    // "far" is bounded by the 10 s in force, "soon" keeps its 5 s.
    assert_eq!(t.gw.poll_timeout(), Some(t.now + Duration::from_secs(5)));
    t.at(5.0);
    assert_eq!(t.gw.stats().persisted_sessions, 1);
    t.at(10.0);
    assert_eq!(t.gw.stats().persisted_sessions, 0);
    // Without an expiry in force, nothing expires, whatever was stored.
    let mut t = T::with(cfg());
    t.gw.restore(
        t.now,
        wall,
        vec![stored("far", Some(u64::MAX)), stored("past", Some(now_ms - 1))],
    );
    assert_eq!(t.gw.stats().persisted_sessions, 2);
    assert_eq!(t.gw.poll_timeout(), None);
}
