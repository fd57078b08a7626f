//! Several gateways in front of one broker (docs/scaling.md): in transparent mode the
//! broker holds each clean-session-false device's session, so a device can leave one
//! gateway and come back through another, and find there what was published meanwhile.
//! Topic ids are the gateway's own, so the device registers again at the new gateway.
//! In aggregating mode the gateway holds the session, so the device is pinned to it.

use std::net::Ipv4Addr;

use e2e::{BrokerKind, Harness, QoS, ReturnCode, Rx, TopicFilter, TopicRef};
use gateway::broker::mqtt::LinkMode;

e2e::broker_suite! {
    a_device_moves_to_another_gateway_and_gets_what_was_queued,
    each_gateway_serves_its_own_devices_on_one_broker,
}

async fn a_device_moves_to_another_gateway_and_gets_what_was_queued(kind: BrokerKind) {
    let Some(a) = Harness::start(kind).await else { return };
    let b = Harness::start_beside(&a).await;
    let mut publisher = a.observer().await;

    // Through gateway A: a clean-session-false session with a subscription, then away.
    let mut dev = a.device("roamer").await;
    dev.connect(60, false).await;
    let ack = dev
        .subscribe(TopicFilter::Name("scale/roamer/down"), QoS::AtLeastOnce)
        .await;
    assert_eq!(ack.code, ReturnCode::Accepted);
    let id_at_a = dev.register("scale/roamer/up").await;
    dev.disconnect().await;
    a.wait_stats("A has no session left", |s| s.sessions == 0).await;

    // Published while the device is connected nowhere: the broker queues it (in
    // aggregating mode, gateway A does).
    publisher.publish("scale/roamer/down", 1, false, b"while away").await;

    if e2e::link_mode() == LinkMode::Aggregating {
        // Aggregating mode: the session lives in gateway A, not at the broker, so the
        // device is pinned to A. Through B it finds nothing (a new session there)...
        let mut dev = b.device_at(Ipv4Addr::new(127, 0, 0, 2), "roamer").await;
        dev.connect(60, false).await;
        dev.expect_silence().await;
        dev.disconnect().await;
        // ...and back through A (from another address) it gets what A kept, on the
        // topic id it already holds (A kept its topic ids too).
        let mut dev = a.device_at(Ipv4Addr::new(127, 0, 0, 4), "roamer").await;
        dev.connect(60, false).await;
        let p = dev.expect_publish().await;
        assert_eq!(p.data, b"while away");
        assert_eq!(p.topic, TopicRef::Normal(ack.topic_id));
        dev.ack(&p).await;
        let mut watch = a.observe("scale/roamer/up").await;
        dev.publish_qos1(TopicRef::Normal(id_at_a), b"up via A again").await;
        watch.expect_msg_eq("scale/roamer/up", b"up via A again").await;
        dev.disconnect().await;
        b.shutdown().await;
        a.shutdown().await;
        return;
    }

    // Back through gateway B, from another address: the broker resumes the session and
    // hands over what it queued; B registers the topic with the device, then delivers.
    let mut dev = b.device_at(Ipv4Addr::new(127, 0, 0, 2), "roamer").await;
    dev.connect(60, false).await;
    let reg = dev.expect_register().await;
    assert_eq!(reg.topic_name, "scale/roamer/down");
    dev.regack(&reg).await;
    let p = dev.expect_publish().await;
    assert_eq!(p.data, b"while away");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(p.topic, TopicRef::Normal(reg.topic_id));
    dev.ack(&p).await;

    // The subscription came along too (it lives at the broker): a new message arrives.
    publisher
        .publish("scale/roamer/down", 1, false, b"after the move")
        .await;
    let p = dev.expect_publish().await;
    assert_eq!(p.data, b"after the move");
    dev.ack(&p).await;

    // Topic ids do not: the id A gave is unknown at B, and the device registers again.
    dev.send_publish(false, TopicRef::Normal(id_at_a), QoS::AtLeastOnce, false, 9, b"x")
        .await;
    match dev.recv().await {
        Rx::PubAck(ack) => assert_eq!(ack.code, ReturnCode::InvalidTopicId),
        other => panic!("expected PUBACK invalid topic id, got {other:?}"),
    }
    let mut watch = b.observe("scale/roamer/up").await;
    let id_at_b = dev.register("scale/roamer/up").await;
    dev.publish_qos1(TopicRef::Normal(id_at_b), b"up via B").await;
    watch.expect_msg_eq("scale/roamer/up", b"up via B").await;
    dev.disconnect().await;
    b.shutdown().await;
    a.shutdown().await;
}

async fn each_gateway_serves_its_own_devices_on_one_broker(kind: BrokerKind) {
    let Some(a) = Harness::start(kind).await else { return };
    let b = Harness::start_beside(&a).await;
    let mut watch = a.observe("scale/both/#").await;
    let mut da = a.device("via-a").await;
    let mut db = b.device_at(Ipv4Addr::new(127, 0, 0, 3), "via-b").await;
    da.connect(60, true).await;
    db.connect(60, true).await;
    // A device of A subscribes; a device of B publishes: it crosses through the broker.
    da.subscribe(TopicFilter::Name("scale/both/x"), QoS::AtLeastOnce).await;
    let id = db.register("scale/both/x").await;
    db.publish_qos1(TopicRef::Normal(id), b"from B to A").await;
    watch.expect_msg_eq("scale/both/x", b"from B to A").await;
    let p = da.expect_publish().await;
    assert_eq!(p.data, b"from B to A");
    da.ack(&p).await;
    // Each gateway counts only its own.
    a.wait_stats("one session at A", |s| s.sessions == 1).await;
    b.wait_stats("one session at B", |s| s.sessions == 1).await;
    da.disconnect().await;
    db.disconnect().await;
    b.shutdown().await;
    a.shutdown().await;
}
