//! The simulator against the real gateway (in-process) and a real mosquitto (started by
//! the shared `e2e` harness).
//!
//! mosquitto missing: a failure under `CI=true`, otherwise a note and the test returns.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use device_sim::fleet::{self, FleetOptions};
use device_sim::radio::LinkModel;
use device_sim::scenario::{Dur, Group, QosMix, Scenario, SleepSpec};
use device_sim::tools::{self, Common, PubArgs, SubArgs, TopicArg};
use device_sim::verifier::BrokerUrl;
use e2e::{init_logging, Mosquitto};
use gateway::runtime::Running;
use gateway::topics::Predefined;
use sn_codec::QoS;

const PREDEFINED_ID: u16 = 77;

async fn start_gateway(broker: SocketAddr) -> Running {
    let mut settings = common::gateway_settings(broker, 5);
    settings.engine.predefined =
        Arc::new(Predefined::new([(PREDEFINED_ID, "sim/predefined".to_string())]).expect("valid predefined topic"));
    gateway::runtime::start(settings).await.expect("the gateway starts")
}

fn ms(n: u64) -> Dur {
    Dur(Duration::from_millis(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_300_sleepy_lossy_devices_keeps_qos_guarantees() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let gateway = gw.udp_addrs[0];
    let lossy = LinkModel {
        loss: 0.10,
        delay_ms: 5,
        jitter_ms: 10,
        duplicate: 0.02,
        ..LinkModel::PERFECT
    };
    let scenario = Scenario {
        groups: vec![
            Group {
                name: "lossy".into(),
                count: 150,
                publish_interval: ms(400),
                jitter: ms(200),
                payload_size: 40,
                qos: QosMix {
                    minus_one: 0.0,
                    q0: 0.3,
                    q1: 0.4,
                    q2: 0.3,
                },
                t_retry: ms(300),
                n_retry: 6,
                ramp: ms(500),
                downlink_interval: ms(1000),
                downlink_qos: 2,
                radio: lossy,
                ..Group::default()
            },
            Group {
                name: "sleepers".into(),
                count: 75,
                publish_interval: ms(0),
                t_retry: ms(300),
                n_retry: 6,
                ramp: ms(300),
                sleep: Some(SleepSpec {
                    duration: Dur(Duration::from_secs(1)),
                    awake: ms(100),
                }),
                downlink_interval: ms(500),
                downlink_qos: 1,
                will: true,
                radio: lossy,
                ..Group::default()
            },
            Group {
                name: "sleepy-publishers".into(),
                count: 75,
                publish_interval: ms(1500),
                jitter: ms(300),
                qos: QosMix {
                    minus_one: 0.2,
                    q0: 0.2,
                    q1: 0.3,
                    q2: 0.3,
                },
                short_topic: Some("sq".into()),
                t_retry: ms(300),
                n_retry: 6,
                ramp: ms(300),
                sleep: Some(SleepSpec {
                    duration: Dur(Duration::from_secs(2)),
                    awake: ms(300),
                }),
                ..Group::default()
            },
        ],
        ..Scenario::default()
    };
    let report = fleet::run(FleetOptions {
        gateway,
        broker: BrokerUrl {
            host: mosquitto.addr().ip().to_string(),
            port: mosquitto.addr().port(),
            tls: None,
        },
        scenario,
        duration: Duration::from_secs(4),
        seed: 7,
        drain: Duration::from_secs(4),
        topic_prefix: "simtest".into(),
        progress: false,
        echo: false,
        gateway_metrics: None,
        client_id: None,
        dtls: None,
    })
    .await
    .expect("the fleet runs");
    println!("{}", report.table());
    let t = &report.total.counts;
    assert!(report.ok(), "broken guarantees: {:#?}", report.violations);
    assert_eq!(t.devices, 300);
    assert_eq!(t.connected, 300, "every device connected");
    assert!(t.published > 100, "devices published: {}", t.published);
    assert!(t.acknowledged > 30, "QoS 1/2 acknowledged: {}", t.acknowledged);
    assert!(t.arrived > 0 && t.arrived <= t.published);
    assert!(t.sleeps > 0, "devices slept");
    assert!(t.wakes > 0, "devices woke with PINGREQ");
    assert!(t.radio_dropped > 0, "the radio lost packets");
    assert!(t.downlink_sent > 0, "the broker side sent downlink messages");
    assert!(t.downlink_received > 0, "devices received downlink messages");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_tools_round_trip() {
    init_logging();
    let Some(mosquitto) = Mosquitto::start() else { return };
    let gw = start_gateway(mosquitto.addr()).await;
    let common = |id: &str| Common {
        gateway: gw.udp_addrs[0],
        client_id: id.into(),
        keep_alive: 30,
        timeout: Duration::from_secs(10),
        t_retry_ms: 500,
        n_retry: 4,
        dtls: None,
    };
    let sub = SubArgs {
        common: common("sim-test-sub"),
        topic: TopicArg::Name("tools/#".into()),
        qos: QoS::ExactlyOnce,
        count: Some(4),
        wait: Some(Duration::from_secs(15)),
        verbose: true,
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let subscriber = tokio::spawn(async move {
        let mut out = Vec::new();
        let n = tools::subscribe_then(&sub, &mut out, move || {
            let _ = ready_tx.send(());
        })
        .await;
        (n.map_err(|e| e.to_string()), String::from_utf8(out).expect("utf-8"))
    });
    // The gateway answers SUBACK once the broker has the subscription.
    tokio::time::timeout(Duration::from_secs(15), ready_rx)
        .await
        .expect("subscribed in time")
        .expect("subscriber running");
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        tools::publish(&PubArgs {
            common: common(&format!("sim-test-pub{i}")),
            topic: TopicArg::Name(format!("tools/q{i}")),
            message: format!("m{i}").into_bytes(),
            qos,
            retain: false,
        })
        .await
        .expect("published");
    }
    // Short topic, QoS -1 does not reach a "tools/#" subscriber: publish to a name instead.
    tools::publish(&PubArgs {
        common: common("sim-test-pub3"),
        topic: TopicArg::Name("tools/last".into()),
        message: b"last".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
    })
    .await
    .expect("published");
    let (n, out) = subscriber.await.expect("subscriber task");
    assert_eq!(n, Ok(4), "output so far:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["tools/q0 m0", "tools/q1 m1", "tools/q2 m2", "tools/last last"]);

    // QoS -1 to a predefined topic, and errors are errors.
    tools::publish(&PubArgs {
        common: common("sim-test-m1"),
        topic: TopicArg::Predefined(PREDEFINED_ID),
        message: b"x".to_vec(),
        qos: QoS::MinusOne,
        retain: false,
    })
    .await
    .expect("QoS -1 needs no answer");
    let nobody = Common {
        gateway: SocketAddr::from((Ipv4Addr::LOCALHOST, 9)),
        timeout: Duration::from_millis(500),
        ..common("sim-test-lost")
    };
    let err = tools::publish(&PubArgs {
        common: nobody,
        topic: TopicArg::Name("tools/x".into()),
        message: b"x".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
    })
    .await
    .expect_err("no gateway there");
    assert!(err.to_string().contains("no answer"), "{err}");
    gw.shutdown().await;
}
