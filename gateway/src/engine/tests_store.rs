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
        sleeper: None,
        qos2: Vec::new(),
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

/// The store's record of where and how long a device sleeps.
fn asleep_at(from: &LinkAddr, secs: u32) -> Option<crate::store::Sleeper> {
    Some(crate::store::Sleeper {
        peer: Peer::direct(from.clone()),
        keep_alive: 60,
        duration_secs: secs,
    })
}

#[test]
fn a_sleeping_device_is_asleep_again_after_a_crash_and_its_pingreq_gets_what_was_held_then_pingresp() {
    let mut t = T::with(EngineConfig {
        auth: crate::auth::AuthConfig {
            address_change: crate::auth::AddressChange::Deny,
            ..crate::auth::AuthConfig::default()
        },
        ..cfg()
    });
    let mut disk = Disk::new("sleeper");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let (d, other) = (dev(1), dev(2));
    connect(&mut t, &mut disk, &d, "sleepy", false);
    register(&mut t, &d, "out/a", 1);
    disk.settle(&mut t);
    t.tx();
    t.send(&d, Packet::Disconnect(Some(600)));
    let ops = disk.settle(&mut t);
    assert_eq!(
        ops,
        vec![StoreOp::Sleep {
            client_id: "sleepy".into(),
            sleeper: asleep_at(&d, 600)
        }]
    );
    t.expect(&d, &[Packet::Disconnect(None)]);
    // Woken and asleep again: no write (the device sleeps on).
    t.send(&d, Packet::PingReq(Some("sleepy")));
    t.expect(&d, &[Packet::PingResp]);
    assert!(disk.settle(&mut t).is_empty(), "a wake is not a change");

    // kill -9; the restarted gateway holds the session asleep and opens its broker
    // connection again (clean session false, no will).
    let restored = disk.restart(&mut t, SystemTime::now());
    assert_eq!((restored.kept, restored.asleep), (1, 1));
    let key = match t.cmds().as_slice() {
        [(key, Command::Connect(p))] => {
            assert!(!p.clean_session && p.will.is_none() && p.client_id == "sleepy");
            *key
        }
        other => panic!("expected the broker connection reopened, got {other:?}"),
    };
    assert_eq!(t.gw.stats().asleep, 1);
    assert_eq!(t.gw.poll_timeout(), Some(t.now + Duration::from_secs(900)));
    t.event(key, BrokerEvent::Connected { session_present: true });
    t.event(key, super::tests::msg("out/a", "held", MqttQos::AtLeastOnce, 5));
    t.expect_nothing();

    // Another address cannot wake it (and take what is held).
    t.send(&other, Packet::PingReq(Some("sleepy")));
    t.expect(&other, &[Packet::Disconnect(None)]);
    assert_eq!(t.gw.stats().metrics.auth_wake_refused, 1);

    // Its own wake: the held message under the topic id it registered before the
    // crash, then PINGRESP once it is acknowledged.
    t.send(&d, Packet::PingReq(Some("sleepy")));
    let sent = t.tx();
    let [(to, bytes)] = sent.as_slice() else {
        panic!("expected one PUBLISH, got {sent:?}");
    };
    assert_eq!(to, &d);
    let msg_id = match Packet::decode(bytes) {
        Ok(Packet::Publish(p)) => {
            assert_eq!((p.topic, p.data), (TopicRef::Normal(1), &b"held"[..]));
            p.msg_id
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    t.send(&d, super::tests::puback(1, msg_id));
    t.expect(&d, &[Packet::PingResp]);
    assert!(matches!(t.cmds().as_slice(), [(k, Command::Ack { .. })] if *k == key));
}

#[test]
fn a_restored_sleeper_woken_before_its_broker_connection_is_back_waits_for_it() {
    let mut t = T::with(cfg());
    let mut disk = Disk::new("sleeper-early");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let d = dev(1);
    connect(&mut t, &mut disk, &d, "early", false);
    t.send(&d, Packet::Disconnect(Some(60)));
    disk.settle(&mut t);
    t.tx();
    disk.restart(&mut t, SystemTime::now());
    let key = match t.cmds().as_slice() {
        [(key, Command::Connect(_))] => *key,
        other => panic!("expected a broker connect, got {other:?}"),
    };
    t.send(&d, Packet::PingReq(Some("early")));
    t.expect_nothing();
    t.event(key, BrokerEvent::Connected { session_present: true });
    t.expect(&d, &[Packet::PingResp]);
    // Awake after all (it was, when the gateway died): its PUBLISH is answered
    // DISCONNECT, and it connects. That writes nothing (one write per sleep, not per
    // cycle); the record goes with the session.
    publish(&mut t, &d, 1);
    t.expect(&d, &[Packet::Disconnect(None)]);
    t.send(
        &d,
        Packet::Connect(Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "early",
        }),
    );
    assert!(disk.settle(&mut t).is_empty());
    t.expect(&d, &[Packet::ConnAck(ReturnCode::Accepted)]);
    t.send(&d, Packet::Disconnect(None));
    disk.settle(&mut t);
    let stored = disk.store.as_ref().unwrap().load().unwrap();
    assert_eq!(stored[0].sleeper, None, "gone: no longer asleep");
}

#[test]
fn a_restored_sleeper_the_registry_no_longer_admits_there_is_kept_as_gone() {
    let mut t = T::with(cfg());
    let disk = Disk::new("sleeper-dtls");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    // Stored asleep under a DTLS identity no registry binds (there is none now).
    let stored = crate::store::StoredSession {
        client_id: "gone".into(),
        presence: crate::store::Presence::Connected,
        topics: vec![(1, "x".into())],
        held: Vec::new(),
        subs: Vec::new(),
        sleeper: Some(crate::store::Sleeper {
            peer: Peer::direct(LinkAddr::Dtls(0, "127.0.0.1:9".parse().unwrap(), "id".into())),
            keep_alive: 60,
            duration_secs: 60,
        }),
        qos2: Vec::new(),
    };
    let restored = t.gw.restore(t.now, SystemTime::now(), vec![stored]);
    assert_eq!((restored.kept, restored.asleep), (1, 0));
    assert!(t.cmds().is_empty());
    assert_eq!(t.gw.stats().persisted_sessions, 1);
    drop(disk);
}

/// The PUBLISH datagrams and PUBRELs sent to `to`, decoded as (msg id, dup) and PUBREL ids.
fn qos2_sent(t: &mut T, to: &LinkAddr) -> (Vec<(u16, bool)>, Vec<u16>) {
    let (mut publishes, mut pubrels) = (Vec::new(), Vec::new());
    for (addr, data) in t.tx() {
        assert_eq!(&addr, to);
        match Packet::decode(&data).unwrap() {
            Packet::Publish(p) => publishes.push((p.msg_id, p.dup)),
            Packet::PubRel(id) => pubrels.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    (publishes, pubrels)
}

#[test]
fn a_qos2_delivery_cut_by_a_crash_goes_out_again_under_its_message_id_and_its_pubrel_is_owed() {
    let mut t = T::with(cfg());
    let mut disk = Disk::new("qos2");
    t.gw.restore(t.now, SystemTime::now(), Vec::new());
    let d = dev(1);
    let key = connect(&mut t, &mut disk, &d, "q2", false);
    register(&mut t, &d, "down/q2", 1);
    disk.settle(&mut t);
    t.tx();
    t.event(key, super::tests::msg("down/q2", "once", MqttQos::ExactlyOnce, 9));
    assert!(t.gw.poll_transmit().is_none(), "the PUBLISH waits for its record");
    let ops = disk.settle(&mut t);
    assert!(
        matches!(ops.as_slice(), [StoreOp::Qos2 { msg_id, state: Some(s), .. }] if !s.released && *msg_id != 0),
        "{ops:?}"
    );
    let (first, _) = qos2_sent(&mut t, &d);
    let [(msg_id, false)] = first.as_slice() else {
        panic!("expected one new PUBLISH, got {first:?}");
    };
    let msg_id = *msg_id;

    // kill -9 before the device's PUBREC. The broker (or the store) delivers it again:
    // the same message id, DUP set, so the device passes it on once.
    disk.restart(&mut t, SystemTime::now());
    let key = connect(&mut t, &mut disk, &d, "q2", false);
    // A message before it does not take that id (the device may hold it).
    t.event(key, super::tests::msg("down/q2", "first", MqttQos::AtLeastOnce, 1));
    disk.settle(&mut t);
    let (publishes, _) = qos2_sent(&mut t, &d);
    let [(q1_id, false)] = publishes.as_slice() else {
        panic!("expected the QoS 1 PUBLISH, got {publishes:?}");
    };
    assert_ne!(*q1_id, msg_id);
    t.send(&d, super::tests::puback(1, *q1_id));
    t.event(key, super::tests::msg("down/q2", "once", MqttQos::ExactlyOnce, 1));
    disk.settle(&mut t);
    assert_eq!(qos2_sent(&mut t, &d).0, vec![(msg_id, true)]);
    t.event(key, super::tests::msg("down/q2", "other", MqttQos::ExactlyOnce, 2));
    t.send(&d, Packet::PubRec(msg_id));
    disk.settle(&mut t);
    let (publishes, pubrels) = qos2_sent(&mut t, &d);
    assert_eq!(pubrels, vec![msg_id]);
    assert!(publishes.is_empty(), "one exchange at a time: {publishes:?}");

    // kill -9 after PUBREC, before PUBCOMP: the next session owes the device its PUBREL
    // before anything else, or the device would hold the id for ever.
    disk.restart(&mut t, SystemTime::now());
    t.send(
        &d,
        Packet::Connect(Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "q2",
        }),
    );
    let key = match t.cmds().as_slice() {
        [.., (key, Command::Connect(_))] => *key,
        other => panic!("expected a broker connect, got {other:?}"),
    };
    t.event(key, BrokerEvent::Connected { session_present: true });
    disk.settle(&mut t);
    t.expect(&d, &[Packet::ConnAck(ReturnCode::Accepted), Packet::PubRel(msg_id)]);
    t.event(key, super::tests::msg("down/q2", "other", MqttQos::ExactlyOnce, 3));
    disk.settle(&mut t);
    assert!(qos2_sent(&mut t, &d).0.is_empty(), "the PUBREL comes first");
    t.send(&d, Packet::PubComp(msg_id));
    let ops = disk.settle(&mut t);
    assert!(ops.contains(&StoreOp::Qos2 {
        client_id: "q2".into(),
        msg_id,
        state: None
    }));
    let (publishes, _) = qos2_sent(&mut t, &d);
    assert!(
        matches!(publishes.as_slice(), [(_, false)]),
        "the next message, new: {publishes:?}"
    );
}
