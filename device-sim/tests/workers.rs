//! A fleet spread over worker processes (`--workers`, or by itself past the open-file
//! limit) against the real gateway (in-process) and a real mosquitto: the same totals and
//! guarantees as one process, and a worker that dies fails the run with its name.
//!
//! mosquitto missing: a failure under `CI=true`, otherwise a note and the test returns.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e::{init_logging, Mosquitto};
use gateway::runtime::Running;

const DEVICES: u64 = 60;

async fn start_gateway(broker: SocketAddr) -> Running {
    gateway::runtime::start(common::gateway_settings(broker, 5))
        .await
        .expect("the gateway starts")
}

/// A temporary directory with a lossless scenario of [`DEVICES`] devices, QoS 0, 1 and 2.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("device-sim-workers-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(
            dir.join("scenario.toml"),
            format!(
                "[[group]]\nname = \"steady\"\ncount = {DEVICES}\npublish_interval = \"300ms\"\njitter = \"100ms\"\n\
                 ramp = \"300ms\"\nqos = {{ q0 = 0.3, q1 = 0.4, q2 = 0.3 }}\nt_retry = \"2s\"\n"
            ),
        )
        .expect("scenario written");
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `mqtt-sn-sim run` on the scenario with `extra` arguments, through `sh -c` with
/// `shell_prefix` before it (e.g. `ulimit -n 130;`).
fn sim_run(
    gw: &Running,
    mosquitto: &Mosquitto,
    dir: &Dir,
    duration: &str,
    shell_prefix: &str,
    extra: &[&str],
) -> Command {
    let mut args = vec![
        "run".to_string(),
        "-Q".into(),
        "--seed".into(),
        "9".into(),
        "--drain".into(),
        "2s".into(),
        "--duration".into(),
        duration.into(),
        "--gateway".into(),
        gw.udp_addrs[0].to_string(),
        "--broker".into(),
        format!("mqtt://{}", mosquitto.addr()),
        "--scenario".into(),
        dir.path("scenario.toml").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{shell_prefix} exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_mqtt-sn-sim"))
        .args(args)
        .env("RUST_LOG", "warn");
    cmd
}

async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the run's thread")
        .expect("the binary runs")
}

fn report(out: &Output, json: &Path) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).expect("the JSON report")).expect("valid JSON")
}

fn total(v: &serde_json::Value, key: &str) -> u64 {
    v["total"]["counts"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("total.counts.{key} is not a number: {v}"))
}

/// What must hold of any lossless run of the scenario, however many processes ran it.
fn assert_complete(v: &serde_json::Value, what: &str) {
    assert_eq!(total(v, "devices"), DEVICES, "{what}");
    // Distinct client ids (one per device): no device took another's session over.
    assert_eq!(total(v, "connected"), DEVICES, "{what}");
    assert_eq!(total(v, "socket_errors"), 0, "{what}");
    let published = total(v, "published");
    assert!(published >= DEVICES, "{what}: only {published} published");
    // Lossless radio: every message reached the single verifier, once each at QoS 2.
    assert_eq!(total(v, "arrived"), published, "{what}");
    assert_eq!(total(v, "lost"), 0, "{what}");
    assert_eq!(total(v, "lost_acknowledged"), 0, "{what}");
    assert_eq!(total(v, "duplicated_qos2"), 0, "{what}");
    assert_eq!(v["guarantees_broken"].as_u64(), Some(0), "{what}");
    assert!(
        v["total"]["uplink_latency"]["samples"].as_u64().unwrap_or(0) > 0,
        "{what}: no latency samples"
    );
    // The workers stamp on the parent's clock: latencies are small, not clock offsets.
    let p99 = v["total"]["uplink_latency"]["p99_ms"].as_f64().unwrap_or(f64::MAX);
    assert!((0.0..1_000.0).contains(&p99), "{what}: p99 {p99} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_give_the_totals_and_guarantees_of_one_process() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let dir = Dir::new("three");
    let (one, three, csv) = (dir.path("one.json"), dir.path("three.json"), dir.path("three.csv"));
    let a = output(sim_run(
        &gw,
        &mosquitto,
        &dir,
        "2s",
        "",
        &["--workers", "1", "--report", &one.display().to_string()],
    ))
    .await;
    let one = report(&a, &one);
    let b = output(sim_run(
        &gw,
        &mosquitto,
        &dir,
        "2s",
        "",
        &[
            "--workers",
            "3",
            "--report",
            &three.display().to_string(),
            "--timeseries",
            &csv.display().to_string(),
        ],
    ))
    .await;
    let three = report(&b, &three);
    // The time series (as the progress line) sums the workers' live counters: its last
    // row has every worker's publishes, rising row by row.
    let text = std::fs::read_to_string(&csv).expect("the CSV");
    let mut rows = text.lines();
    let header: Vec<&str> = rows.next().expect("a header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "published")
        .expect("a published column");
    let published: Vec<u64> = rows
        .map(|r| r.split(',').nth(col).and_then(|v| v.parse().ok()).expect("a number"))
        .collect();
    assert!(published.windows(2).all(|w| w[0] <= w[1]), "{text}");
    assert_eq!(published.last().copied(), Some(total(&three, "published")), "{text}");
    assert_complete(&one, "one process");
    assert_complete(&three, "three workers");
    // The same form: the same keys at the top and in the counters.
    let keys = |v: &serde_json::Value, path: &[&str]| {
        let mut v = v;
        for p in path {
            v = &v[*p];
        }
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(keys(&one, &[]), keys(&three, &[]));
    assert_eq!(keys(&one, &["total", "counts"]), keys(&three, &["total", "counts"]));
    // The same QoS mix drawn by the same devices (same seeds): each QoS in both runs.
    for q in ["published_qos0", "published_qos1", "published_qos2"] {
        assert!(total(&one, q) > 0 && total(&three, q) > 0, "{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_spreads_the_fleet_by_itself() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let dir = Dir::new("ulimit");
    let json = dir.path("run.json");
    // 60 sockets and the reserve of 100 do not fit in 130 files: two workers of 30.
    let out = output(sim_run(
        &gw,
        &mosquitto,
        &dir,
        "2s",
        "ulimit -n 130 &&",
        &["--report", &json.display().to_string()],
    ))
    .await;
    let v = report(&out, &json);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spreading the fleet over worker processes"), "{stderr}");
    assert!(stderr.contains("workers=2"), "{stderr}");
    assert_complete(&v, "spread by the limit");
}

/// The pids of `parent`'s child processes (Linux `/proc`).
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_the_run_with_its_name() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let dir = Dir::new("killed");
    let mut cmd = sim_run(&gw, &mosquitto, &dir, "60s", "", &["--workers", "3"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("the binary starts");
    let parent = child.id();
    // The workers start one after the other; wait for all three, then give them a moment.
    let workers = loop {
        let c = children(parent);
        if c.len() == 3 {
            break c;
        }
        // A run that ends before its workers are up is a failure, not a wait forever.
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().expect("its output");
            panic!(
                "the run ended ({status}) before starting 3 workers: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let victim = workers[1];
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the run's thread")
        .expect("the run ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {victim}")) && stderr.contains("ended before reporting its devices"),
        "{stderr}"
    );
    // The others were killed with the run, not left behind.
    for pid in workers {
        let gone = !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
        assert!(gone, "worker {pid} outlived the run");
    }
}

#[test]
fn a_downlink_scenario_over_workers_is_refused_not_run_without_its_downlink() {
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/sleepy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_mqtt-sn-sim"))
        .args(["run", "-Q", "--workers", "2", "--scenario", scenario])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("downlink groups"), "{stderr}");
}
