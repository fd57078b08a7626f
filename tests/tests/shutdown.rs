//! The graceful stop (what SIGTERM/SIGINT do, through `Running::shutdown`): awake devices
//! are told, exchanges in flight finish, broker connections close with an MQTT
//! DISCONNECT so that no will fires, unless `publish_wills_on_shutdown` asks for them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e::{
    init_logging, test_engine_config, Mosquitto, Observer, PubAck, QoS, ReturnCode, Rx, SnClient, TopicRef, WillSpec,
    PREDEFINED_ID, PREDEFINED_TOPIC, QUIET, WAIT,
};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::Settings;
use gateway::runtime::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

async fn gateway_to(broker: SocketAddr, publish_wills: bool) -> (Running, SocketAddr) {
    init_logging();
    let settings = Settings {
        engine: test_engine_config(),
        udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        broker: BrokerConfig {
            host: broker.ip().to_string(),
            port: broker.port(),
            ..BrokerConfig::default()
        },
        embedded_broker: None,
        stats_interval: None,
        shutdown_timeout: Duration::from_secs(10),
        publish_wills_on_shutdown: publish_wills,
        ..Settings::default()
    };
    let running = gateway::runtime::start(settings).await.expect("the gateway starts");
    let addr = running.udp_addrs[0];
    (running, addr)
}

/// One awake device and one asleep, each with a will on `wills/<id>`; the observer
/// subscribed to `wills/#`.
async fn two_devices_with_wills(m: &Mosquitto, gateway: SocketAddr, tag: &str) -> (SnClient, SnClient, Observer) {
    let mut obs = Observer::connect(m.addr(), &format!("wills-observer-{tag}")).await;
    obs.subscribe("wills/#", 1).await;
    let mut awake = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, &format!("awake-{tag}")).await;
    awake
        .connect_with_will(60, true, &WillSpec::new(&format!("wills/awake-{tag}"), b"awake gone"))
        .await;
    let mut asleep = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, &format!("asleep-{tag}")).await;
    asleep
        .connect_with_will(
            60,
            false,
            &WillSpec::new(&format!("wills/asleep-{tag}"), b"asleep gone"),
        )
        .await;
    asleep.send(&e2e::Packet::Disconnect(Some(600))).await;
    asleep.expect(Rx::Disconnect(None)).await;
    (awake, asleep, obs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_stop_disconnects_devices_and_fires_no_will() {
    let Some(m) = Mosquitto::start() else { return };
    let (running, gateway) = gateway_to(m.addr(), false).await;
    let (mut awake, mut asleep, mut obs) = two_devices_with_wills(&m, gateway, "nowill").await;
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("the stop finishes in time");
    awake.expect(Rx::Disconnect(None)).await;
    // A sleeping device cannot hear it: nothing is sent to it.
    asleep.expect_silence().await;
    // Every broker connection was closed with DISCONNECT: the broker publishes no will.
    obs.expect_none_for(QUIET * 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wills_on_shutdown_publishes_every_will() {
    let Some(m) = Mosquitto::start() else { return };
    let (running, gateway) = gateway_to(m.addr(), true).await;
    let (mut awake, _asleep, mut obs) = two_devices_with_wills(&m, gateway, "wills").await;
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("the stop finishes in time");
    awake.expect(Rx::Disconnect(None)).await;
    let mut got = [obs.expect_msg().await, obs.expect_msg().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), m.payload.as_slice()))
            .collect::<Vec<_>>(),
        [
            ("wills/asleep-wills", &b"asleep gone"[..]),
            ("wills/awake-wills", &b"awake gone"[..])
        ]
    );
    obs.expect_none_for(QUIET).await;
}

/// A TCP proxy to `upstream` whose broker-to-gateway direction can be held (the gate
/// closed), to keep the broker's acknowledgements in flight.
struct GateProxy {
    addr: SocketAddr,
    gate: watch::Sender<bool>,
}

async fn gate_proxy(upstream: SocketAddr) -> GateProxy {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (gate, open) = watch::channel(true);
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let Ok(up) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut down_r, mut down_w) = down.into_split();
            let (mut up_r, mut up_w) = up.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
                let _ = up_w.shutdown().await;
            });
            let mut open = open.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                loop {
                    let n = match up_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if open.wait_for(|o| *o).await.is_err() || down_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = down_w.shutdown().await;
            });
        }
    });
    GateProxy { addr, gate }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publish_in_flight_is_acknowledged_before_the_stop() {
    let Some(m) = Mosquitto::start() else { return };
    let proxy = gate_proxy(m.addr()).await;
    let (running, gateway) = gateway_to(proxy.addr, false).await;
    let mut obs = Observer::connect(m.addr(), "inflight-observer").await;
    obs.subscribe(PREDEFINED_TOPIC, 1).await;
    let mut d = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, "inflight-dev").await;
    d.connect(60, true).await;

    // The broker gets the publish; its PUBACK is held in the proxy.
    proxy.gate.send_replace(false);
    let topic = TopicRef::Predefined(PREDEFINED_ID);
    let msg_id = d.publish(topic, QoS::AtLeastOnce, false, b"in flight").await;
    obs.expect_msg_eq(PREDEFINED_TOPIC, b"in flight").await;

    let stop = tokio::spawn(running.shutdown());
    // The gateway waits for the acknowledgement: the device hears nothing yet.
    d.expect_silence_for(QUIET * 2).await;
    assert!(!stop.is_finished(), "the gateway stopped with a publish in flight");

    proxy.gate.send_replace(true);
    d.expect(Rx::PubAck(PubAck {
        topic_id: PREDEFINED_ID,
        msg_id,
        code: ReturnCode::Accepted,
    }))
    .await;
    d.expect(Rx::Disconnect(None)).await;
    tokio::time::timeout(WAIT, stop)
        .await
        .expect("the stop finishes once nothing is in flight")
        .expect("the stop task");
}
