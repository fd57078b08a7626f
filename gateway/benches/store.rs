//! The state store's cost (docs/benchmarks.md): commits with `Durability::Immediate`
//! (an fsync each), one operation per commit against group commits, the held-message
//! write rate, and the restart time with 100,000 stored sessions.
//!
//! `cargo bench -p gateway --bench store` (prints figures; the directory is under the
//! system's temporary directory, so it measures that file system).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gateway::engine::{EngineConfig, Gateway};
use gateway::store::{HeldMessage, RedbStore, StateStore, StoreOp};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gateway-store-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `commits` commits of `batch` operations each, made by `op(i)`; prints the rate.
fn commits(what: &str, batch: usize, commits: usize, op: impl Fn(usize) -> StoreOp) {
    let d = dir(what);
    let mut store = RedbStore::open(&d, false).unwrap().store;
    let mut lat = Vec::with_capacity(commits);
    let start = Instant::now();
    for c in 0..commits {
        let ops: Vec<StoreOp> = (0..batch).map(|i| op(c * batch + i)).collect();
        let t = Instant::now();
        store.commit(&ops).unwrap();
        lat.push(t.elapsed());
    }
    let took = start.elapsed();
    lat.sort();
    let n = (batch * commits) as f64;
    println!(
        "{what:<44} batch {batch:>4}: {:>9.0} ops/s, {:>7.0} commits/s, commit p50 {:>6.2} ms p99 {:>6.2} ms",
        n / took.as_secs_f64(),
        commits as f64 / took.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&d);
}

fn topic(i: usize) -> StoreOp {
    StoreOp::Topic {
        client_id: format!("dev-{}", i % 1000).into(),
        id: (i % 60_000 + 1) as u16,
        name: format!("sensors/dev-{}/t{}", i % 1000, i % 7).into(),
    }
}

fn held(i: usize) -> StoreOp {
    StoreOp::PutHeld {
        client_id: format!("dev-{}", i % 1000).into(),
        seq: i as u64,
        message: HeldMessage {
            topic: format!("cmd/dev-{}", i % 1000),
            payload: vec![0x5a; 100],
            qos: 1,
            retain: false,
        },
    }
}

fn restart(sessions: usize) {
    let d = dir("restart");
    let mut store = RedbStore::open(&d, false).unwrap().store;
    let t = Instant::now();
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(10_000) {
        let ops: Vec<StoreOp> = chunk
            .iter()
            .map(|i| StoreOp::Connected {
                client_id: format!("sensor-{i:06}").into(),
                topics: vec![
                    (1, Arc::from(format!("sensors/{i:06}/temp"))),
                    (2, Arc::from(format!("sensors/{i:06}/hum"))),
                ],
            })
            .collect();
        store.commit(&ops).unwrap();
    }
    let written = t.elapsed();
    // No clean close: the file as the last commit left it, copied while the store is
    // still open (what a `kill -9` leaves), is what the restart opens.
    let crashed = dir("restart-crashed");
    std::fs::create_dir_all(&crashed).unwrap();
    let file = crashed.join(gateway::store::STORE_FILE);
    std::fs::copy(d.join(gateway::store::STORE_FILE), &file).unwrap();
    drop(store);
    let size = std::fs::metadata(&file).unwrap().len();
    let t = Instant::now();
    let (store, stored) = RedbStore::open_file(&file).unwrap();
    let opened = t.elapsed();
    assert_eq!(stored.len(), sessions);
    let mut gw = Gateway::new(EngineConfig {
        max_persisted_sessions: sessions,
        ..EngineConfig::default()
    });
    let t = Instant::now();
    let restored = gw.restore(Instant::now(), SystemTime::now(), stored);
    let rebuilt = t.elapsed();
    let mut store = store;
    let t = Instant::now();
    store.commit(&gw.take_store_ops()).unwrap();
    let committed = t.elapsed();
    assert_eq!(restored.kept, sessions);
    println!(
        "restart with {sessions} stored sessions (2 topic ids each, file {:.1} MiB): written in {:.2} s; open + read {:.0} ms, engine restore {:.0} ms, first commit (expiry records) {:.0} ms",
        size as f64 / (1 << 20) as f64,
        written.as_secs_f64(),
        opened.as_secs_f64() * 1e3,
        rebuilt.as_secs_f64() * 1e3,
        committed.as_secs_f64() * 1e3,
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&crashed);
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep it quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick { 5 } else { 200 };
    commits("topic registration, one per commit", 1, n, topic);
    commits("topic registrations, group commit", 16, n, topic);
    commits("topic registrations, group commit", 256, n / 2, topic);
    commits("held QoS 1 message (100 B), one per commit", 1, n, held);
    commits("held QoS 1 messages (100 B), group commit", 256, n / 2, held);
    restart(if quick { 1_000 } else { 100_000 });
}
