//! The conformance suite against the real gateway (every check passes) and against
//! broken stand-ins (the real gateway behind a proxy that breaks one rule): each check
//! FAILs when its rule is broken.
//!
//! mosquitto missing: a failure under `CI=true`, otherwise a note and the test returns.

mod common;
#[path = "common/standin.rs"]
mod standin;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use device_sim::conformance::{self, CheckReport, ConformanceOptions, Outcome, Selection};
use device_sim::verifier::BrokerUrl;
use e2e::{init_logging, Mosquitto};
use gateway::runtime::Running;
use gateway::topics::Predefined;
use standin::{msg_type, type_at, Dir, Proxy, Rule, Verdict};

const PREDEFINED_ID: u16 = 77;
const PREDEFINED: &str = "sim/predefined";

/// Our gateway, with a predefined topic, a short Tretry, and a second listener on the
/// loopback broadcast address (where a broadcast SEARCHGW arrives).
async fn start_gateway(broker: SocketAddr) -> Running {
    let mut settings = common::gateway_settings(broker, 5);
    settings.engine.predefined =
        Arc::new(Predefined::new([(PREDEFINED_ID, PREDEFINED.to_string())]).expect("valid predefined topic"));
    settings.udp.push(SocketAddr::from((Ipv4Addr::new(127, 255, 255, 255), 0)));
    gateway::runtime::start(settings).await.expect("the gateway starts")
}

fn options(gateway: SocketAddr, broker: SocketAddr) -> ConformanceOptions {
    ConformanceOptions {
        gateway,
        broker: Some(BrokerUrl {
            host: broker.ip().to_string(),
            port: broker.port(),
        }),
        predefined: Some((PREDEFINED_ID, PREDEFINED.into())),
        discovery: None,
        timeout: Duration::from_secs(3),
        gateway_retry: Duration::from_millis(300),
        max_datagram: conformance::DEFAULT_MAX_DATAGRAM,
        select: Selection::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_our_gateway() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let mut opts = options(gw.udp_addrs[0], mosquitto.addr());
    opts.discovery = Some(gw.udp_addrs[1]);
    opts.timeout = Duration::from_secs(5);
    let reports = conformance::run(opts).await.expect("the broker is reachable");
    println!("{}", conformance::table(&reports));
    assert_eq!(reports.len(), conformance::CHECKS.len());
    let failed: Vec<_> = reports.iter().filter(|r| r.outcome != Outcome::Pass).collect();
    assert!(failed.is_empty(), "checks not passed: {failed:#?}");
    gw.shutdown().await;
}
