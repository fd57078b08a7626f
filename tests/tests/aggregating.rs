//! Aggregating mode against a real mosquitto: what the gateway now does in the broker's
//! place (docs/scaling.md, "Aggregating mode"), checked from the broker's side where the
//! broker can show it (`$SYS` counts, its in-flight window) and from the devices' side.
//! The rest of the end-to-end suite runs in this mode too (`broker_suite!`).

use std::net::Ipv4Addr;
use std::time::Duration;

use e2e::{Harness, Mosquitto, Observer, QoS, Rx, TopicFilter, TopicRef, WAIT};
use gateway::broker::mqtt::LinkMode;
use gateway::config::Settings;

/// mosquitto publishing its `$SYS` counts every second, with `extra` configuration.
fn mosquitto(extra: &str) -> Option<Mosquitto> {
    Mosquitto::start_with_conf(&format!("sys_interval 1\n{extra}"))
}

/// The gateway in aggregating mode with `connections` shared connections.
async fn gateway(m: Mosquitto, connections: usize) -> Harness {
    gateway_with(m, connections, |_| {}).await
}

/// [`gateway`], with the settings adjusted by `tweak`.
async fn gateway_with(m: Mosquitto, connections: usize, tweak: impl FnOnce(&mut Settings)) -> Harness {
    Harness::start_custom(Some(m), |s| {
        s.broker.mode = LinkMode::Aggregating;
        s.broker.connections = connections;
        tweak(s);
    })
    .await
    .expect("mosquitto is there")
}

/// Waits until the `$SYS` topic `topic` reads `want`, and returns every value seen.
async fn sys_reaches(o: &mut Observer, topic: &str, want: u64) -> Vec<u64> {
    let until = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = o.recv_within(left).await else {
            panic!("{topic} never read {want}; seen {seen:?}");
        };
        if m.topic != topic {
            continue;
        }
        let v: u64 = String::from_utf8_lossy(&m.payload).trim().parse().unwrap_or(u64::MAX);
        seen.push(v);
        if v == want {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sees_n_connections_whatever_the_number_of_devices() {
    let Some(m) = mosquitto("") else { return };
    let h = gateway(m, 2).await;
    let mut devices = Vec::new();
    for i in 0..12u8 {
        let mut d = h.device_at(Ipv4Addr::new(127, 0, 3, 1 + i), &format!("many-{i}")).await;
        d.connect(60, true).await;
        devices.push(d);
    }
    h.wait_stats("12 sessions", |s| s.sessions == 12).await;
    let mut o = h.observe("$SYS/broker/clients/connected").await;
    // The two shared connections and this observer; never one per device.
    let seen = sys_reaches(&mut o, "$SYS/broker/clients/connected", 3).await;
    assert!(seen.iter().all(|v| *v <= 3), "connections seen at the broker: {seen:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Some(m) = o.recv_within(Duration::from_millis(10)).await {
        assert_eq!(m.payload, b"3", "still 3 connections");
    }
    for mut d in devices {
        d.disconnect().await;
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_filters_at_different_qos_deliver_once_each_at_the_right_qos() {
    let Some(m) = mosquitto("") else { return };
    let h = gateway(m, 1).await;
    let mut one = h.device("overlap-1").await;
    let mut two = h.device_at(Ipv4Addr::new(127, 0, 0, 2), "overlap-2").await;
    one.connect(60, true).await;
    two.connect(60, true).await;
    one.subscribe(TopicFilter::Name("agg/o/#"), QoS::AtMostOnce).await;
    // Two overlapping filters on one device: one copy, at the higher of the two.
    two.subscribe(TopicFilter::Name("agg/o/+"), QoS::AtMostOnce).await;
    let named = two.subscribe(TopicFilter::Name("agg/o/t"), QoS::AtLeastOnce).await;
    let mut publisher = h.observer().await;
    publisher.publish("agg/o/t", 1, false, b"once").await;
    let p = one.receive().await;
    assert_eq!((p.data.as_slice(), p.qos), (&b"once"[..], QoS::AtMostOnce));
    let p = two.receive().await;
    assert_eq!((p.data.as_slice(), p.qos), (&b"once"[..], QoS::AtLeastOnce));
    assert_eq!(p.topic, TopicRef::Normal(named.topic_id));
    one.expect_nothing_new().await;
    two.expect_nothing_new().await;
    assert_eq!(
        h.stats().aggregate.filters,
        3,
        "one broker subscription per distinct filter"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_reaches_a_second_subscriber_of_a_held_filter_alone() {
    let Some(m) = mosquitto("") else { return };
    let h = gateway(m, 1).await;
    let mut publisher = h.observer().await;
    publisher.publish("agg/r/x", 1, true, b"kept").await;
    let mut first = h.device("ret-1").await;
    first.connect(60, true).await;
    first.subscribe(TopicFilter::Name("agg/r/#"), QoS::AtLeastOnce).await;
    let p = first.receive().await;
    assert_eq!((p.data.as_slice(), p.retain), (&b"kept"[..], true));
    // The filter is held now; a second device subscribes to it and still gets the
    // retained message, flagged so, and the first device does not get it again.
    let mut second = h.device_at(Ipv4Addr::new(127, 0, 0, 2), "ret-2").await;
    second.connect(60, true).await;
    second.subscribe(TopicFilter::Name("agg/r/#"), QoS::AtLeastOnce).await;
    let p = second.receive().await;
    assert_eq!((p.data.as_slice(), p.retain), (&b"kept"[..], true));
    first.expect_nothing_new().await;
    // A live publish reaches both, without RETAIN.
    publisher.publish("agg/r/x", 1, false, b"live").await;
    for d in [&mut first, &mut second] {
        let p = d.receive().await;
        assert_eq!((p.data.as_slice(), p.retain), (&b"live"[..], false));
    }
    publisher.publish("agg/r/x", 1, true, b"").await; // clears the retained message
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_subscription_goes_with_the_last_device_to_unsubscribe() {
    let Some(m) = mosquitto("") else { return };
    let h = gateway(m, 1).await;
    let mut o = h.observe("$SYS/broker/subscriptions/count").await;
    // Before: the observer's own subscription only.
    sys_reaches(&mut o, "$SYS/broker/subscriptions/count", 1).await;
    let mut one = h.device("unsub-1").await;
    let mut two = h.device_at(Ipv4Addr::new(127, 0, 0, 2), "unsub-2").await;
    for d in [&mut one, &mut two] {
        d.connect(60, true).await;
        d.subscribe(TopicFilter::Name("agg/u/+"), QoS::AtLeastOnce).await;
    }
    // Two devices, one filter: one broker subscription.
    let seen = sys_reaches(&mut o, "$SYS/broker/subscriptions/count", 2).await;
    assert!(seen.iter().all(|v| *v <= 2), "{seen:?}");
    one.unsubscribe(TopicFilter::Name("agg/u/+")).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while let Some(m) = o.recv_within(Duration::from_millis(10)).await {
        assert_eq!(m.payload, b"2", "kept while a device holds it");
    }
    two.unsubscribe(TopicFilter::Name("agg/u/+")).await;
    sys_reaches(&mut o, "$SYS/broker/subscriptions/count", 1).await;
    assert_eq!(h.stats().aggregate.filters, 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_message_is_acknowledged_to_the_broker_after_every_device() {
    // A broker window of one message: the next is sent only once the gateway has
    // acknowledged the first, which shows at the devices when it does.
    let Some(m) = mosquitto("max_inflight_messages 1") else {
        return;
    };
    // Retransmissions slow enough that the gateway does not give up on the slow device
    // (and release the message) while the test watches.
    let h = gateway_with(m, 1, |s| s.engine.retry_interval = Duration::from_secs(5)).await;
    let mut quick = h.device("ack-quick").await;
    let mut slow = h.device_at(Ipv4Addr::new(127, 0, 0, 2), "ack-slow").await;
    let mut ids = Vec::new();
    for d in [&mut quick, &mut slow] {
        d.connect(60, true).await;
        ids.push(d.subscribe(TopicFilter::Name("agg/a"), QoS::AtLeastOnce).await.topic_id);
    }
    let mut publisher = h.observer().await;
    publisher.publish("agg/a", 1, false, b"m1").await;
    publisher.publish("agg/a", 1, false, b"m2").await;
    let p = quick.receive().await;
    assert_eq!(p.data, b"m1");
    let held = slow.expect_publish().await;
    assert_eq!(held.data, b"m1");
    // The slow device has not acknowledged m1: the broker has no PUBACK, so m2 stays
    // with it.
    quick.expect_silence_for(Duration::from_millis(1500)).await;
    assert_eq!(h.stats().aggregate.unacked, 1);
    slow.ack(&held).await;
    let p = quick.receive().await;
    assert_eq!(p.data, b"m2", "m2 follows once every device has m1");
    loop {
        match slow.recv().await {
            Rx::Publish(p) if p.data == b"m1" => slow.ack(&p).await, // a retransmission
            Rx::Publish(p) => {
                assert_eq!(p.data, b"m2");
                assert_eq!(p.topic, TopicRef::Normal(ids[1]));
                slow.ack(&p).await;
                break;
            }
            other => panic!("expected m2, got {other:?}"),
        }
    }
    h.shutdown().await;
}
