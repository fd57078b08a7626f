//! The fleet against the in-process echo gateway: no sockets, no broker.

use std::time::Duration;

use device_sim::fleet::{self, FleetOptions};
use device_sim::radio::LinkModel;
use device_sim::scenario::{Dur, Group, Scenario, SleepSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_against_the_echo_gateway() {
    let ms = |n| Dur(Duration::from_millis(n));
    let scenario = Scenario {
        groups: vec![
            Group {
                name: "busy".into(),
                count: 800,
                publish_interval: ms(300),
                jitter: ms(100),
                t_retry: ms(500),
                ramp: ms(300),
                downlink_interval: ms(0),
                radio: LinkModel {
                    loss: 0.05,
                    ..LinkModel::PERFECT
                },
                ..Group::default()
            },
            Group {
                name: "sleepy".into(),
                count: 200,
                publish_interval: ms(700),
                t_retry: ms(500),
                ramp: ms(300),
                will: true,
                sleep: Some(SleepSpec {
                    duration: Dur(Duration::from_secs(1)),
                    awake: ms(100),
                }),
                ..Group::default()
            },
        ],
        ..Scenario::default()
    };
    let report = fleet::run(FleetOptions {
        gateway: "127.0.0.1:9".parse().expect("address"),
        broker: "mqtt://127.0.0.1:9".parse().expect("url"),
        scenario,
        duration: Duration::from_secs(2),
        seed: 1,
        drain: Duration::from_secs(2),
        topic_prefix: "echo".into(),
        progress: false,
        echo: true,
        gateway_metrics: None,
        client_id: None,
        dtls: None,
    })
    .await
    .expect("runs without a broker");
    println!("{}", report.table());
    let t = &report.total.counts;
    assert!(!report.verified);
    assert_eq!(t.connected, 1000);
    assert!(t.published > 3000, "published {}", t.published);
    assert!(t.acknowledged > 1000, "acknowledged {}", t.acknowledged);
    assert!(t.sleeps > 0);
    assert_eq!(report.guarantees_broken, 0);
    assert!(report.echo_datagrams > t.published);
}
