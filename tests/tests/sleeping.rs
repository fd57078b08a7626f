//! Sleeping clients end to end: messages held while a device sleeps, delivered on wake,
//! wills of devices that oversleep. Every case runs against mosquitto and against the
//! embedded broker.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use e2e::{BrokerKind, Harness, Packet, QoS, Rx, TopicFilter, TopicRef, WillSpec, RETRY};

e2e::broker_suite! {
    held_messages_arrive_in_order_on_wake,
    qos0_held_messages_drop_oldest,
    inflight_at_sleep_is_resent_on_wake,
    wake_registers_topics_before_delivering,
    overslept_device_will_is_published,
    wake_from_new_source_address,
    connect_from_asleep_delivers_held,
    many_sleeping_clients_no_cross_talk,
}

/// (payload, QoS) of what a device received, for comparisons.
fn summary(got: &[e2e::Pub]) -> Vec<(String, QoS)> {
    got.iter()
        .map(|p| (String::from_utf8_lossy(&p.data).into_owned(), p.qos))
        .collect()
}

async fn held_messages_arrive_in_order_on_wake(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut watch = h.observe("sl/#").await;
    let mut publisher = h.observer().await;
    let mut dev = h.device("sl-dev").await;
    dev.connect(60, false).await;
    let ack = dev.subscribe(TopicFilter::Name("sl/t"), QoS::ExactlyOnce).await;
    dev.sleep(30).await;
    h.wait_stats("the device asleep", |s| s.asleep == 1).await;

    let sent = [("m0", 0u8), ("m1", 1), ("m2", 2), ("m3", 1), ("m4", 0), ("m5", 2)];
    for (data, qos) in sent {
        publisher.publish("sl/t", qos, false, data.as_bytes()).await;
    }
    // All held by the gateway; nothing reaches the sleeping device.
    h.wait_stats("six held messages", |s| s.held_messages == sent.len())
        .await;
    dev.expect_silence().await;

    // Wake: every message in order, each acknowledged, then PINGRESP.
    let got = dev.wake().await;
    let want: Vec<(String, QoS)> = sent
        .iter()
        .map(|(d, q)| (d.to_string(), h.delivery_qos(*q, QoS::ExactlyOnce)))
        .collect();
    assert_eq!(summary(&got), want);
    assert!(got.iter().all(|p| p.topic == TopicRef::Normal(ack.topic_id) && !p.dup));
    let s = h
        .wait_stats("asleep again, nothing held", |s| s.asleep == 1 && s.held_messages == 0)
        .await;
    assert_eq!(s.metrics.wakes, 1);

    // A second wake finds nothing: every message was taken off the gateway's buffer.
    assert!(dev.wake().await.is_empty());

    // Nothing duplicated on the broker side: each message was published once...
    for (data, _) in sent {
        watch.expect_msg_eq("sl/t", data.as_bytes()).await;
    }
    watch.expect_none().await;
    // ...and each QoS 1/2 message was acknowledged to the broker: on a new broker
    // connection with the same persistent session, the broker redelivers nothing.
    dev.disconnect().await;
    dev.connect(60, false).await;
    dev.expect_silence().await;
    // Still subscribed (persistent session), with the same topic id.
    publisher.publish("sl/t", 1, false, b"later").await;
    let p = dev.receive().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(ack.topic_id), &b"later"[..])
    );
    watch.expect_msg_eq("sl/t", b"later").await;
    watch.expect_none().await;
    dev.expect_silence().await;
}

async fn qos0_held_messages_drop_oldest(kind: BrokerKind) {
    let Some(h) = Harness::start_with(kind, |c| c.max_queued_messages = 3).await else {
        return;
    };
    let mut publisher = h.observer().await;
    let mut dev = h.device("q0-dev").await;
    dev.connect(60, true).await;
    // Subscribed at QoS 0, so that every message arrives at QoS 0 whatever the broker.
    dev.subscribe(TopicFilter::Name("q0/t"), QoS::AtMostOnce).await;
    dev.sleep(30).await;
    for i in 0..6 {
        publisher.publish("q0/t", 0, false, format!("m{i}").as_bytes()).await;
    }
    let s = h
        .wait_stats("three dropped", |s| s.metrics.qos0_dropped == 3 && s.held_messages == 3)
        .await;
    assert_eq!(s.asleep, 1);
    let got = dev.wake().await;
    let want: Vec<(String, QoS)> = ["m3", "m4", "m5"]
        .iter()
        .map(|d| (d.to_string(), QoS::AtMostOnce))
        .collect();
    assert_eq!(summary(&got), want, "the oldest QoS 0 messages are dropped");
}

async fn inflight_at_sleep_is_resent_on_wake(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut publisher = h.observer().await;
    let mut dev = h.device("if-dev").await;
    dev.connect(60, true).await;
    dev.subscribe(TopicFilter::Name("if/t"), QoS::AtLeastOnce).await;
    publisher.publish("if/t", 1, false, b"unacked").await;
    // Received, not acknowledged, and the device goes to sleep (retransmissions before
    // the DISCONNECT reached the gateway are ignored too).
    let first = dev.expect_publish().await;
    dev.send(&Packet::Disconnect(Some(30))).await;
    loop {
        match dev.recv().await {
            Rx::Disconnect(None) => break,
            Rx::Publish(p)
                if p == (e2e::Pub {
                    dup: true,
                    ..first.clone()
                }) => {}
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
    }
    publisher.publish("if/t", 1, false, b"while asleep").await;
    h.wait_stats("two held", |s| s.held_messages == 2).await;
    // No retransmission to a sleeping device.
    dev.expect_silence_for(RETRY * 3).await;
    let got = dev.wake().await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got.first(),
        Some(&e2e::Pub {
            dup: true,
            ..first.clone()
        })
    );
    assert_eq!(got.get(1).map(|p| p.data.as_slice()), Some(&b"while asleep"[..]));
    h.wait_stats("nothing held", |s| s.held_messages == 0 && s.asleep == 1)
        .await;
}

async fn wake_registers_topics_before_delivering(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut publisher = h.observer().await;
    let mut dev = h.device("wr-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("wr/#"), QoS::AtLeastOnce).await;
    assert_eq!(ack.topic_id, 0);
    dev.sleep(30).await;
    publisher.publish("wr/a", 1, false, b"a1").await;
    publisher.publish("wr/b", 0, false, b"b1").await;
    publisher.publish("wr/a", 1, false, b"a2").await;
    h.wait_stats("three held", |s| s.held_messages == 3).await;
    dev.send(&Packet::PingReq(Some("wr-dev"))).await;
    // wr/a: REGISTER, then its PUBLISH.
    let reg_a = dev.expect_register().await;
    assert_eq!(reg_a.topic_name, "wr/a");
    dev.regack(&reg_a).await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(reg_a.topic_id), &b"a1"[..])
    );
    dev.ack(&p).await;
    // wr/b: REGISTER, then its PUBLISH.
    let reg_b = dev.expect_register().await;
    assert_eq!(reg_b.topic_name, "wr/b");
    assert_ne!(reg_b.topic_id, reg_a.topic_id);
    dev.regack(&reg_b).await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(reg_b.topic_id), &b"b1"[..])
    );
    dev.ack(&p).await;
    // wr/a again: already registered.
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(reg_a.topic_id), &b"a2"[..])
    );
    dev.ack(&p).await;
    dev.expect(Rx::PingResp).await;
    dev.expect_silence().await;
}

async fn overslept_device_will_is_published(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut watch = h.observe("os/#").await;
    let mut dev = h.device("os-dev").await;
    dev.connect_with_will(60, true, &WillSpec::new("os/will", b"os-dev overslept"))
        .await;
    // Sleeps 1 s: lost once 1.5 s pass without a wake.
    dev.sleep(1).await;
    watch.expect_none_for(Duration::from_millis(800)).await;
    let m = watch.expect_msg_eq("os/will", b"os-dev overslept").await;
    h.assert_published_qos(&m, 1);
    let s = h
        .wait_stats("the client lost", |s| s.metrics.lost == 1 && s.sessions == 0)
        .await;
    assert_eq!(s.asleep, 0);
    // A late wake is told to connect again.
    dev.send(&Packet::PingReq(Some("os-dev"))).await;
    dev.expect(Rx::Disconnect(None)).await;
    watch.expect_none().await;

    // A device that keeps waking in time is not lost.
    let mut steady = h.device("os-steady").await;
    steady
        .connect_with_will(60, true, &WillSpec::new("os/will", b"steady lost"))
        .await;
    steady.sleep(2).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(steady.wake().await.is_empty());
    }
    watch.expect_none().await;
    steady.disconnect().await;
    watch.expect_none().await;
}

async fn wake_from_new_source_address(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut publisher = h.observer().await;
    let mut old = h.device_at(Ipv4Addr::new(127, 0, 0, 21), "na-dev").await;
    old.connect(60, true).await;
    old.subscribe(TopicFilter::Name("na/t"), QoS::AtLeastOnce).await;
    old.sleep(30).await;
    publisher.publish("na/t", 1, false, b"one").await;
    publisher.publish("na/t", 2, false, b"two").await;
    h.wait_stats("two held", |s| s.held_messages == 2).await;

    // Same client, woken from another address (and port).
    let mut new = h.device_at(Ipv4Addr::new(127, 0, 0, 22), "na-dev").await;
    let got = new.wake().await;
    assert_eq!(
        summary(&got),
        vec![
            ("one".to_string(), QoS::AtLeastOnce),
            ("two".to_string(), QoS::AtLeastOnce)
        ]
    );
    old.expect_silence().await;
    // The session now lives at the new address; the old one is unknown.
    new.send(&Packet::Disconnect(None)).await;
    new.expect(Rx::Disconnect(None)).await;
    old.send(&Packet::PingReq(None)).await;
    old.expect(Rx::Disconnect(None)).await;
    h.wait_stats("no session left", |s| s.sessions == 0).await;
}

async fn connect_from_asleep_delivers_held(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut publisher = h.observer().await;
    let mut dev = h.device("ca-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("ca/t"), QoS::ExactlyOnce).await;
    dev.sleep(30).await;
    publisher.publish("ca/t", 1, false, b"a").await;
    publisher.publish("ca/t", 0, false, b"b").await;
    publisher.publish("ca/t", 2, false, b"c").await;
    h.wait_stats("three held", |s| s.held_messages == 3).await;

    // CONNECT from asleep: CONNACK, then the held messages.
    dev.connect(60, true).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(dev.receive().await);
    }
    assert_eq!(
        summary(&got),
        vec![
            ("a".to_string(), h.delivery_qos(1, QoS::ExactlyOnce)),
            ("b".to_string(), h.delivery_qos(0, QoS::ExactlyOnce)),
            ("c".to_string(), h.delivery_qos(2, QoS::ExactlyOnce))
        ]
    );
    assert!(got.iter().all(|p| p.topic == TopicRef::Normal(ack.topic_id)));
    // Active again: no PINGRESP-terminated wake, live messages flow at once.
    dev.expect_silence().await;
    publisher.publish("ca/t", 1, false, b"live").await;
    assert_eq!(dev.receive().await.data, b"live");
    dev.ping().await;
    let s = h
        .wait_stats("one active session", |s| s.active == 1 && s.asleep == 0)
        .await;
    assert_eq!(s.held_messages, 0);
}

async fn many_sleeping_clients_no_cross_talk(kind: BrokerKind) {
    const N: usize = 200;
    let Some(h) = Harness::start(kind).await else { return };
    let mut devices = Vec::with_capacity(N);
    // Spread over several loopback addresses.
    for i in 0..N {
        let ip = Ipv4Addr::new(127, 0, 1, 1 + (i % 50) as u8);
        devices.push(h.device_at(ip, &format!("many-{i:03}")).await);
    }
    // Connect, subscribe and sleep, all at once.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut dev) in devices.into_iter().enumerate() {
        tasks.spawn(async move {
            dev.connect(60, true).await;
            let ack = dev
                .subscribe(TopicFilter::Name(&format!("many/{i:03}")), QoS::AtLeastOnce)
                .await;
            dev.sleep(60).await;
            (i, dev, ack.topic_id)
        });
    }
    let mut asleep = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (i, dev, topic_id) = r.expect("device task");
        asleep.insert(i, (dev, topic_id));
    }
    h.wait_stats("every device asleep", |s| s.asleep == N).await;

    // Two messages for each device, interleaved across devices.
    let mut publisher = h.observer().await;
    for round in 0..2u8 {
        for i in 0..N {
            let qos = round; // One QoS 0 message, then one QoS 1.
            publisher
                .publish(
                    &format!("many/{i:03}"),
                    qos,
                    false,
                    format!("{i:03}:{round}").as_bytes(),
                )
                .await;
        }
    }
    h.wait_stats("every message held", |s| s.held_messages == 2 * N).await;

    // All wake at once: each gets exactly its own two messages, in order.
    let qos = [h.delivery_qos(0, QoS::AtLeastOnce), h.delivery_qos(1, QoS::AtLeastOnce)];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (mut dev, topic_id)) in asleep {
        tasks.spawn(async move {
            let got = dev.wake().await;
            let want = vec![(format!("{i:03}:0"), qos[0]), (format!("{i:03}:1"), qos[1])];
            assert_eq!(summary(&got), want, "device {i}");
            assert!(got.iter().all(|p| p.topic == TopicRef::Normal(topic_id)), "device {i}");
            dev.expect_nothing_new().await;
            i
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.expect("device task");
        done += 1;
    }
    assert_eq!(done, N);
    let s = h
        .wait_stats("all asleep, nothing held", |s| s.asleep == N && s.held_messages == 0)
        .await;
    assert_eq!(s.metrics.publishes_out, 2 * N as u64);
    assert_eq!(s.metrics.wakes, N as u64);
}
