//! The simulator's broker side over TLS: `mqtt-sn-sim run --broker mqtts://... --broker-ca
//! FILE` verifies a fleet through the gateway (itself on `mqtts://`) at a mosquitto
//! with a TLS listener on a CA the test makes (the `e2e` harness, openssl).
//!
//! mosquitto or openssl missing: a failure under `CI=true`, otherwise a note and the test
//! returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};

use e2e::init_logging;
use e2e::tls::{Pki, TlsMosquitto};
use gateway::config::Config;

/// The gateway in-process on a free loopback UDP port, to `broker` over TLS with `ca`.
async fn gateway_over_tls(broker: SocketAddr, ca: &std::path::Path) -> gateway::runtime::Running {
    let mut config = Config::default();
    config.udp.listen = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
    config.broker.url = Some(format!("mqtts://{broker}"));
    config.broker.ca_file = Some(ca.to_path_buf());
    config.gateway.stats_interval_secs = 0;
    let settings = config.validate().expect("valid gateway settings");
    gateway::runtime::start(settings).await.expect("the gateway starts")
}

/// `mqtt-sn-sim run` with `args`, off the async runtime (the gateway runs on it).
async fn sim_run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mqtt-sn-sim"))
            .arg("run")
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("runs")
    })
    .await
    .expect("the simulator's process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_verifier_works_over_mqtts_with_broker_ca() {
    init_logging();
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = TlsMosquitto::start(&pki, false) else {
        return;
    };
    let gw = gateway_over_tls(broker.addr(), &pki.ca).await;
    let url = format!("mqtts://{}", broker.addr());
    let report = pki.ca.with_file_name("report.json");
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = ["-g", &gw.udp_addrs[0].to_string(), "-b", &url, "-n", "3", "-d", "2s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--drain", "2s", "-Q"].iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let out = sim_run(base(&[
        "--broker-ca",
        &pki.ca.to_string_lossy(),
        "--report",
        &report.to_string_lossy(),
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stderr}\nmosquitto:\n{}",
        String::from_utf8_lossy(&out.stdout),
        broker.log()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the report")).expect("JSON");
    assert_eq!(json["verified"], true, "{json:#}");
    let counts = &json["total"]["counts"];
    assert_eq!(counts["connected"], 3, "{counts:#}");
    assert!(counts["arrived"].as_u64().unwrap_or(0) > 0, "{counts:#}");

    // Trusting the system's roots instead of the test CA, the verifier cannot start:
    // one clear error naming the certificate problem.
    let out = sim_run(base(&[])).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot verify at the broker {}", broker.addr())) && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    gw.shutdown().await;
}
