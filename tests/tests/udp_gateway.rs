//! The active-client protocol over UDP, end to end: what each device receives and what an
//! MQTT client on the broker sees. Every case runs against mosquitto and against the
//! embedded broker.

use std::net::Ipv4Addr;
use std::time::Duration;

use e2e::{
    encode, BrokerKind, Harness, Packet, PubAck, QoS, RegAck, ReturnCode, Rx, TopicFilter, TopicRef, WillSpec,
    WillTopic, MAX_RETRIES, PREDEFINED_ID, PREDEFINED_TOPIC, RETRY,
};

e2e::broker_suite! {
    connect_connack,
    searchgw_answered_with_gwinfo,
    will_handshake,
    will_published_on_keep_alive_loss,
    no_will_on_clean_disconnect,
    will_update_is_published_on_loss,
    publish_qos0,
    publish_qos1,
    publish_qos2_exactly_once,
    puback_invalid_topic_id,
    qos_minus_one_predefined_and_short,
    subscribe_by_name,
    subscribe_wildcard_registers_first,
    subscribe_predefined,
    subscribe_short,
    unsubscribe_stops_delivery,
    delivery_qos1_retransmitted_with_dup,
    delivery_qos2_pubrel_retransmitted,
    delivery_retries_exhausted_client_lost,
    retained_message_keeps_retain_flag,
    takeover_from_another_address,
    clean_session_false_keeps_topic_ids,
    hostile_datagrams_are_dropped_and_counted,
    hostile_topics_do_not_cut_qos_minus_one_delivery,
    max_clients_congestion,
}

async fn connect_connack(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("cc/#").await;
    let mut dev = h.device("cc-dev").await;
    dev.connect(60, true).await;
    // The session is live on both sides: a PINGREQ is answered, and a publish on a short
    // topic goes through the broker connection opened for this client.
    dev.ping().await;
    let short = TopicRef::Short(*b"cc");
    dev.publish_qos1(short, b"hello").await;
    let m = obs.expect_msg_eq("cc", b"hello").await;
    h.assert_published_qos(&m, 1);
    let s = h.wait_stats("one active session", |s| s.active == 1).await;
    assert_eq!((s.sessions, s.metrics.connects), (1, 1));

    // A retransmitted CONNECT after CONNACK starts a fresh session: answered again.
    dev.connect(60, true).await;
    dev.publish_qos1(short, b"again").await;
    obs.expect_msg_eq("cc", b"again").await;

    // A CONNECT without client id is refused.
    let mut anon = h.device("").await;
    assert_eq!(anon.try_connect(60, true).await, Rx::ConnAck(ReturnCode::NotSupported));
}

async fn searchgw_answered_with_gwinfo(kind: BrokerKind) {
    let Some(h) = Harness::start_with(kind, |c| c.gateway_id = 7).await else {
        return;
    };
    let mut dev = h.device_at(Ipv4Addr::new(127, 0, 0, 4), "gw-seeker").await;
    dev.send(&Packet::SearchGw { radius: 1 }).await;
    dev.expect(Rx::GwInfo(7)).await;
    // Searching creates no session.
    dev.expect_silence().await;
    assert_eq!(h.stats().sessions, 0);
}

async fn will_handshake(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("wh/#").await;
    let mut dev = h.device("wh-dev").await;
    let will = WillSpec::new("wh/will", b"gone");

    // The device repeats its CONNECT in the middle of the handshake (it missed the
    // WILLTOPICREQ): the handshake starts over and still completes.
    dev.send_raw(&encode(&Packet::Connect(e2e::Connect {
        will: true,
        clean_session: true,
        duration: 60,
        client_id: "wh-dev",
    })))
    .await;
    dev.expect(Rx::WillTopicReq).await;
    dev.connect_with_will(60, true, &will).await;
    dev.publish_qos1(TopicRef::Short(*b"wh"), b"up").await;
    obs.expect_msg_eq("wh", b"up").await;

    // An empty WILLTOPIC means no will: CONNACK comes without WILLMSGREQ.
    let mut nowill = h.device("wh-nowill").await;
    nowill
        .send(&Packet::Connect(e2e::Connect {
            will: true,
            clean_session: true,
            duration: 60,
            client_id: "wh-nowill",
        }))
        .await;
    nowill.expect(Rx::WillTopicReq).await;
    nowill.send(&Packet::WillTopic(None)).await;
    nowill.expect(Rx::ConnAck(ReturnCode::Accepted)).await;
    nowill.ping().await;

    // A will topic with wildcards is refused.
    let mut bad = h.device("wh-bad").await;
    bad.send(&Packet::Connect(e2e::Connect {
        will: true,
        clean_session: true,
        duration: 60,
        client_id: "wh-bad",
    }))
    .await;
    bad.expect(Rx::WillTopicReq).await;
    bad.send(&Packet::WillTopic(Some(WillTopic {
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "wh/#",
    })))
    .await;
    bad.expect(Rx::ConnAck(ReturnCode::NotSupported)).await;
    obs.expect_none().await;
}

async fn will_published_on_keep_alive_loss(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("kl/#").await;
    let mut dev = h.device("kl-dev").await;
    let will = WillSpec {
        topic: "kl/will".into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        message: b"kl-dev lost".to_vec(),
    };
    // Keep-alive 2 s: lost after 3 s of silence.
    dev.connect_with_will(2, true, &will).await;
    // Traffic keeps it alive well past 3 s in total.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        dev.ping().await;
    }
    obs.expect_none_for(Duration::from_millis(100)).await;
    // Now silent: the will appears.
    let m = obs.expect_msg_eq("kl/will", b"kl-dev lost").await;
    h.assert_published_qos(&m, 1);
    // A retained will stays on the broker for later subscribers.
    let mut late = h.observe("kl/will").await;
    let m = late.expect_msg_eq("kl/will", b"kl-dev lost").await;
    assert!(m.retain, "the will was published retained");
    let s = h
        .wait_stats("the client lost", |s| s.metrics.lost == 1 && s.sessions == 0)
        .await;
    assert_eq!(s.active, 0);
    // The gateway no longer knows the device: DISCONNECT tells it to connect again.
    dev.send(&Packet::PingReq(None)).await;
    dev.expect(Rx::Disconnect(None)).await;
    obs.expect_none().await;
    late.expect_none().await;
}

async fn no_will_on_clean_disconnect(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("nw/#").await;
    let mut dev = h.device("nw-dev").await;
    dev.connect_with_will(2, true, &WillSpec::new("nw/will", b"should not appear"))
        .await;
    dev.disconnect().await;
    // Longer than 1.5 x the keep-alive: neither the gateway nor the broker publishes it.
    obs.expect_none_for(Duration::from_millis(3500)).await;
    let s = h
        .wait_stats("the clean disconnect", |s| s.metrics.disconnects == 1)
        .await;
    assert_eq!((s.sessions, s.metrics.lost), (0, 0));
}

async fn will_update_is_published_on_loss(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("wu/#").await;
    let mut dev = h.device("wu-dev").await;
    dev.connect_with_will(2, true, &WillSpec::new("wu/old", b"old will"))
        .await;
    dev.send(&Packet::WillTopicUpd(Some(WillTopic {
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "wu/new",
    })))
    .await;
    dev.expect(Rx::WillTopicResp(ReturnCode::Accepted)).await;
    dev.send(&Packet::WillMsgUpd(b"new will")).await;
    dev.expect(Rx::WillMsgResp(ReturnCode::Accepted)).await;
    // Silent from here: lost after 3 s, and only the updated will is published.
    let m = obs.expect_msg_eq("wu/new", b"new will").await;
    h.assert_published_qos(&m, 2);
    obs.expect_none().await;
}

async fn publish_qos0(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("p0/#").await;
    let mut dev = h.device("p0-dev").await;
    dev.connect(60, true).await;
    let id = dev.register("p0/data").await;
    // Registering the same name again gives the same id.
    assert_eq!(dev.register("p0/data").await, id);
    dev.publish(TopicRef::Normal(id), QoS::AtMostOnce, false, b"zero").await;
    let m = obs.expect_msg_eq("p0/data", b"zero").await;
    h.assert_published_qos(&m, 0);
    assert!(!m.retain);
    // QoS 0 has no answer.
    dev.expect_silence().await;
    let s = h.wait_stats("one publish in", |s| s.metrics.publishes_in == 1).await;
    assert_eq!(s.metrics.invalid_topic, 0);
}

async fn publish_qos1(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("p1/#").await;
    let mut dev = h.device("p1-dev").await;
    dev.connect(60, true).await;
    let id = dev.register("p1/data").await;
    // PUBACK is sent once the broker has acknowledged: the message is already there.
    dev.publish_qos1(TopicRef::Normal(id), b"one").await;
    let m = obs.expect_msg_eq("p1/data", b"one").await;
    h.assert_published_qos(&m, 1);
    // A retransmission after PUBACK (the device missed it) is published again, as QoS 1
    // allows, and acknowledged again.
    let msg_id = dev.msg_id();
    dev.send_publish(false, TopicRef::Normal(id), QoS::AtLeastOnce, false, msg_id, b"two")
        .await;
    let ack = Rx::PubAck(PubAck {
        topic_id: id,
        msg_id,
        code: ReturnCode::Accepted,
    });
    dev.expect(ack.clone()).await;
    obs.expect_msg_eq("p1/data", b"two").await;
    dev.send_publish(true, TopicRef::Normal(id), QoS::AtLeastOnce, false, msg_id, b"two")
        .await;
    dev.expect(ack).await;
    let m = obs.expect_msg_eq("p1/data", b"two").await;
    h.assert_published_qos(&m, 1);
    // Retained publish from the device reaches the broker as retained.
    let msg_id = dev.publish(TopicRef::Normal(id), QoS::AtLeastOnce, true, b"kept").await;
    dev.expect(Rx::PubAck(PubAck {
        topic_id: id,
        msg_id,
        code: ReturnCode::Accepted,
    }))
    .await;
    obs.expect_msg_eq("p1/data", b"kept").await;
    let mut late = h.observe("p1/data").await;
    let m = late.expect_msg_eq("p1/data", b"kept").await;
    assert!(m.retain, "a retained device publish is retained on the broker");
    obs.expect_none().await;
}

async fn publish_qos2_exactly_once(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("p2/#").await;
    let mut dev = h.device("p2-dev").await;
    dev.connect(60, true).await;
    let id = dev.register("p2/data").await;
    let topic = TopicRef::Normal(id);

    let msg_id = dev.msg_id();
    // The device sends its PUBLISH twice at once, the second with DUP (it thinks the
    // first was lost), and again after PUBREC (it missed the PUBREC).
    dev.send_publish(false, topic, QoS::ExactlyOnce, false, msg_id, b"exactly")
        .await;
    dev.send_publish(true, topic, QoS::ExactlyOnce, false, msg_id, b"exactly")
        .await;
    dev.expect(Rx::PubRec(msg_id)).await;
    dev.send_publish(true, topic, QoS::ExactlyOnce, false, msg_id, b"exactly")
        .await;
    dev.send(&Packet::PubRel(msg_id)).await;
    // The second retransmission is answered with PUBREC; the first one too if the
    // broker's PUBREC reached the gateway before it did (timing), else not at all.
    let mut recs = 1;
    loop {
        match dev.recv().await {
            Rx::PubRec(id) if id == msg_id => recs += 1,
            Rx::PubComp(id) if id == msg_id => break,
            other => panic!("expected PUBREC or PUBCOMP, got {other:?}"),
        }
    }
    assert!((2..=3).contains(&recs), "{recs} PUBRECs");
    // A repeated PUBREL is answered again.
    dev.send(&Packet::PubRel(msg_id)).await;
    dev.expect(Rx::PubComp(msg_id)).await;
    let m = obs.expect_msg_eq("p2/data", b"exactly").await;
    h.assert_published_qos(&m, 2);
    // Exactly once on the broker.
    obs.expect_none().await;

    // The message id is free again after PUBCOMP: a new message with it goes through.
    dev.send_publish(false, topic, QoS::ExactlyOnce, false, msg_id, b"second")
        .await;
    dev.expect(Rx::PubRec(msg_id)).await;
    dev.send(&Packet::PubRel(msg_id)).await;
    dev.expect(Rx::PubComp(msg_id)).await;
    obs.expect_msg_eq("p2/data", b"second").await;
    obs.expect_none().await;
    let s = h.wait_stats("two publishes in", |s| s.metrics.publishes_in == 2).await;
    assert_eq!(s.metrics.publishes_in, 2);
}

async fn puback_invalid_topic_id(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("#").await;
    let mut dev = h.device("inv-dev").await;
    dev.connect(60, true).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let msg_id = dev.publish(TopicRef::Normal(999), qos, false, b"nowhere").await;
        dev.expect(Rx::PubAck(PubAck {
            topic_id: 999,
            msg_id,
            code: ReturnCode::InvalidTopicId,
        }))
        .await;
    }
    // An unknown predefined id too.
    let msg_id = dev
        .publish(TopicRef::Predefined(4242), QoS::AtLeastOnce, false, b"nowhere")
        .await;
    dev.expect(Rx::PubAck(PubAck {
        topic_id: 4242,
        msg_id,
        code: ReturnCode::InvalidTopicId,
    }))
    .await;
    obs.expect_none().await;
    h.wait_stats("four invalid topics", |s| s.metrics.invalid_topic == 4)
        .await;
    // The session is unharmed.
    dev.publish_qos1(TopicRef::Predefined(PREDEFINED_ID), b"fine").await;
    obs.expect_msg_eq(PREDEFINED_TOPIC, b"fine").await;
}

async fn qos_minus_one_predefined_and_short(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("#").await;
    // Never connected, from another loopback address.
    let mut dev = h.device_at(Ipv4Addr::new(127, 0, 0, 9), "unconnected").await;
    dev.publish(
        TopicRef::Predefined(PREDEFINED_ID),
        QoS::MinusOne,
        false,
        b"m1 predefined",
    )
    .await;
    let m = obs.expect_msg_eq(PREDEFINED_TOPIC, b"m1 predefined").await;
    h.assert_published_qos(&m, 0);
    dev.publish(TopicRef::Short(*b"m1"), QoS::MinusOne, false, b"m1 short")
        .await;
    obs.expect_msg_eq("m1", b"m1 short").await;
    // A normal topic id cannot be used without a connection; nor an unknown predefined id.
    dev.publish(TopicRef::Normal(1), QoS::MinusOne, false, b"dropped").await;
    dev.publish(TopicRef::Predefined(4242), QoS::MinusOne, false, b"dropped")
        .await;
    obs.expect_none().await;
    // QoS -1 has no answer, and the address has no session.
    dev.expect_silence().await;
    let s = h
        .wait_stats("QoS -1 counted", |s| {
            s.metrics.qos_minus_one == 2 && s.metrics.qos_minus_one_dropped == 2
        })
        .await;
    assert_eq!(s.sessions, 0);
    // A second device, another address, same broker connection.
    let other = h.device_at(Ipv4Addr::new(127, 0, 0, 10), "unconnected-2").await;
    other
        .send_publish(false, TopicRef::Short(*b"m1"), QoS::MinusOne, false, 0, b"from 10")
        .await;
    obs.expect_msg_eq("m1", b"from 10").await;
}

/// A message published on the broker by `obs` reaches `dev` as the PUBLISH returned
/// (acknowledged by the device).
async fn broker_to_device(
    obs: &mut e2e::Observer,
    dev: &mut e2e::SnClient,
    topic: &str,
    qos: u8,
    data: &[u8],
) -> e2e::Pub {
    obs.publish(topic, qos, false, data).await;
    let p = dev.expect_publish().await;
    assert_eq!(p.data, data);
    dev.ack(&p).await;
    p
}

async fn subscribe_by_name(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("sn-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("sn/temp"), QoS::AtLeastOnce).await;
    assert_ne!(ack.topic_id, 0, "a topic name gets a topic id");
    assert_eq!(ack.qos, QoS::AtLeastOnce);
    let p = broker_to_device(&mut obs, &mut dev, "sn/temp", 1, b"21.5").await;
    assert_eq!(
        (p.topic, p.qos, p.retain, p.dup),
        (TopicRef::Normal(ack.topic_id), QoS::AtLeastOnce, false, false)
    );
    assert_ne!(p.msg_id, 0);
    // QoS is the lower of the publish and the subscription.
    let p = broker_to_device(&mut obs, &mut dev, "sn/temp", 0, b"q0").await;
    assert_eq!(p.qos, h.delivery_qos(0, QoS::AtLeastOnce));
    let p = broker_to_device(&mut obs, &mut dev, "sn/temp", 2, b"q2").await;
    assert_eq!(p.qos, h.delivery_qos(2, QoS::AtLeastOnce));
    // A topic registered by the device and subscribed to keeps one id.
    let id = dev.register("sn/other").await;
    let ack = dev.subscribe(TopicFilter::Name("sn/other"), QoS::ExactlyOnce).await;
    assert_eq!((ack.topic_id, ack.qos), (id, QoS::ExactlyOnce));
    let p = broker_to_device(&mut obs, &mut dev, "sn/other", 2, b"exactly").await;
    assert_eq!((p.topic, p.qos), (TopicRef::Normal(id), QoS::ExactlyOnce));
    dev.expect_silence().await;
    h.wait_stats("four deliveries", |s| s.metrics.publishes_out == 4).await;
}

async fn subscribe_wildcard_registers_first(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("wc-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("wc/+/temp"), QoS::AtLeastOnce).await;
    assert_eq!(ack.topic_id, 0, "a wildcard filter gets topic id 0");
    obs.publish("wc/kitchen/temp", 1, false, b"20").await;
    let reg = dev.expect_register().await;
    assert_eq!(reg.topic_name, "wc/kitchen/temp");
    assert_ne!(reg.topic_id, 0);
    // Nothing is published on that topic before the device accepts the id: only the
    // REGISTER again (after Tretry), unchanged.
    let until = tokio::time::Instant::now() + e2e::QUIET;
    while let Some(rx) = dev.recv_within(until - tokio::time::Instant::now()).await {
        assert_eq!(
            rx,
            Rx::Register(reg.clone()),
            "only REGISTER retransmissions before REGACK"
        );
    }
    dev.regack(&reg).await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(reg.topic_id), &b"20"[..])
    );
    dev.ack(&p).await;
    // The same topic again: no second REGISTER.
    let p = broker_to_device(&mut obs, &mut dev, "wc/kitchen/temp", 1, b"21").await;
    assert_eq!(p.topic, TopicRef::Normal(reg.topic_id));
    // Another matching topic: its own REGISTER, its own id.
    obs.publish("wc/hall/temp", 0, false, b"19").await;
    let reg2 = dev.expect_register().await;
    assert_eq!(reg2.topic_name, "wc/hall/temp");
    assert_ne!(reg2.topic_id, reg.topic_id);
    dev.regack(&reg2).await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.qos),
        (TopicRef::Normal(reg2.topic_id), h.delivery_qos(0, QoS::AtLeastOnce))
    );
    dev.ack(&p).await;
    // A device that refuses the REGISTER does not get the message.
    obs.publish("wc/cellar/temp", 1, false, b"12").await;
    let reg3 = dev.expect_register().await;
    dev.send(&Packet::RegAck(RegAck {
        topic_id: reg3.topic_id,
        msg_id: reg3.msg_id,
        code: ReturnCode::NotSupported,
    }))
    .await;
    dev.expect_silence().await;
    // Non-matching topics do not arrive.
    obs.publish("wc/kitchen/humidity", 1, false, b"40").await;
    dev.expect_silence().await;
}

async fn subscribe_predefined(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("pd-dev").await;
    dev.connect(60, true).await;
    let ack = dev
        .subscribe(TopicFilter::Predefined(PREDEFINED_ID), QoS::AtLeastOnce)
        .await;
    assert_eq!(ack.topic_id, PREDEFINED_ID);
    let p = broker_to_device(&mut obs, &mut dev, PREDEFINED_TOPIC, 1, b"pre").await;
    assert_eq!(p.topic, TopicRef::Predefined(PREDEFINED_ID));
    // An unknown predefined id is refused.
    let msg_id = dev.msg_id();
    dev.send(&Packet::Subscribe(e2e::Subscribe {
        dup: false,
        qos: QoS::AtMostOnce,
        msg_id,
        topic: TopicFilter::Predefined(4242),
    }))
    .await;
    match dev.recv().await {
        Rx::SubAck(a) => assert_eq!((a.msg_id, a.code), (msg_id, ReturnCode::InvalidTopicId)),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    dev.expect_silence().await;
}

async fn subscribe_short(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("st-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Short(*b"st"), QoS::ExactlyOnce).await;
    assert_eq!(ack.qos, QoS::ExactlyOnce);
    let p = broker_to_device(&mut obs, &mut dev, "st", 2, b"short").await;
    assert_eq!((p.topic, p.qos), (TopicRef::Short(*b"st"), QoS::ExactlyOnce));
    // The device publishes on a short topic too.
    let mut back = h.observe("s2").await;
    dev.publish_qos2(TopicRef::Short(*b"s2"), b"back").await;
    back.expect_msg_eq("s2", b"back").await;
    dev.expect_silence().await;
}

async fn unsubscribe_stops_delivery(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("un-dev").await;
    dev.connect(60, true).await;
    dev.subscribe(TopicFilter::Name("un/t"), QoS::AtLeastOnce).await;
    broker_to_device(&mut obs, &mut dev, "un/t", 1, b"before").await;
    let msg_id = dev.msg_id();
    dev.send(&Packet::Unsubscribe(e2e::Unsubscribe {
        msg_id,
        topic: TopicFilter::Name("un/t"),
    }))
    .await;
    dev.expect(Rx::UnsubAck(msg_id)).await;
    obs.publish("un/t", 1, false, b"after").await;
    dev.expect_silence().await;
}

async fn delivery_qos1_retransmitted_with_dup(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("rt-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("rt/t"), QoS::AtLeastOnce).await;
    // The gateway cannot have sent anything before this instant.
    let started = std::time::Instant::now();
    obs.publish("rt/t", 1, false, b"first").await;
    obs.publish("rt/t", 1, false, b"second").await;
    let first = dev.expect_publish().await;
    assert!(!first.dup);
    // Ignored: after Tretry the same message comes again, with DUP, same message id.
    let again = dev.expect_publish().await;
    assert!(started.elapsed() >= RETRY, "retransmitted after Tretry, not before");
    assert_eq!(
        again,
        e2e::Pub {
            dup: true,
            ..first.clone()
        }
    );
    assert_eq!(again.topic, TopicRef::Normal(ack.topic_id));
    // Only one message in flight: "second" waits for the PUBACK of "first" (more
    // retransmissions of "first" may cross the PUBACK on a busy machine).
    dev.ack(&again).await;
    let mut crossed = 0;
    let second = loop {
        let p = dev.expect_publish().await;
        if p == again {
            crossed += 1;
            continue;
        }
        break p;
    };
    assert_eq!((second.data.as_slice(), second.dup), (&b"second"[..], false));
    assert_ne!(second.msg_id, first.msg_id);
    dev.ack(&second).await;
    dev.expect_silence_for(RETRY * 2).await;
    let s = h
        .wait_stats("a retransmission", |s| s.metrics.retransmissions >= 1)
        .await;
    assert_eq!(s.metrics.retransmissions, 1 + crossed);
}

async fn delivery_qos2_pubrel_retransmitted(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    let mut dev = h.device("q2-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("q2/t"), QoS::ExactlyOnce).await;
    obs.publish("q2/t", 2, false, b"once").await;
    obs.publish("q2/t", 2, false, b"next").await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.qos, p.topic, p.data.as_slice()),
        (QoS::ExactlyOnce, TopicRef::Normal(ack.topic_id), &b"once"[..])
    );
    dev.send(&Packet::PubRec(p.msg_id)).await;
    dev.expect(Rx::PubRel(p.msg_id)).await;
    // PUBREL ignored: it comes again after Tretry.
    dev.expect(Rx::PubRel(p.msg_id)).await;
    // The device repeats PUBREC (as if PUBREL was lost): PUBREL once more.
    dev.send(&Packet::PubRec(p.msg_id)).await;
    dev.expect(Rx::PubRel(p.msg_id)).await;
    dev.send(&Packet::PubComp(p.msg_id)).await;
    // Then, and only then, the next message (after any PUBREL retransmission that
    // crossed the PUBCOMP).
    let next = loop {
        match dev.recv().await {
            Rx::PubRel(id) if id == p.msg_id => continue,
            Rx::Publish(next) => break next,
            other => panic!("expected the next PUBLISH, got {other:?}"),
        }
    };
    assert_eq!((next.data.as_slice(), next.dup), (&b"next"[..], false));
    assert_ne!(next.msg_id, p.msg_id);
    dev.ack(&next).await;
    dev.expect_silence_for(RETRY * 2).await;
}

async fn delivery_retries_exhausted_client_lost(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("rx/will").await;
    let mut dev = h.device("rx-dev").await;
    dev.connect_with_will(60, false, &WillSpec::new("rx/will", b"rx-dev unreachable"))
        .await;
    dev.subscribe(TopicFilter::Name("rx/t"), QoS::AtLeastOnce).await;
    let mut publisher = h.observer().await;
    publisher.publish("rx/t", 1, false, b"unacked").await;
    // The first transmission and Nretry retransmissions, then the device is lost.
    let first = dev.expect_publish().await;
    assert!(!first.dup);
    for _ in 0..MAX_RETRIES {
        let p = dev.expect_publish().await;
        assert_eq!(
            p,
            e2e::Pub {
                dup: true,
                ..first.clone()
            }
        );
    }
    obs.expect_msg_eq("rx/will", b"rx-dev unreachable").await;
    dev.expect_silence().await;
    h.wait_stats("the client lost", |s| s.metrics.lost == 1 && s.sessions == 0)
        .await;
    // The broker never got the acknowledgement: it delivers the message again to the
    // persistent session when the device comes back.
    dev.connect(60, false).await;
    let p = dev.receive().await;
    assert_eq!(p.data, b"unacked");
    assert_eq!(p.topic, first.topic, "clean session false kept the topic id");
    dev.expect_silence().await;
}

async fn retained_message_keeps_retain_flag(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observer().await;
    obs.publish("rm/state", 1, true, b"on").await;
    let mut dev = h.device("rm-dev").await;
    dev.connect(60, true).await;
    let ack = dev.subscribe(TopicFilter::Name("rm/state"), QoS::AtLeastOnce).await;
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice(), p.retain),
        (TopicRef::Normal(ack.topic_id), &b"on"[..], true)
    );
    dev.ack(&p).await;
    // A live message is not flagged retained.
    let p = broker_to_device(&mut obs, &mut dev, "rm/state", 1, b"off").await;
    assert!(!p.retain);
    // Through a wildcard subscription (REGISTER first) the flag is kept as well.
    let mut dev2 = h.device("rm-dev2").await;
    dev2.connect(60, true).await;
    dev2.subscribe(TopicFilter::Name("rm/#"), QoS::AtLeastOnce).await;
    let p = dev2.receive().await;
    assert_eq!((p.data.as_slice(), p.retain), (&b"on"[..], true));
    dev2.expect_silence().await;
}

async fn takeover_from_another_address(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("to/#").await;
    let mut a = h.device_at(Ipv4Addr::new(127, 0, 0, 2), "to-dev").await;
    a.connect_with_will(60, true, &WillSpec::new("to/will", b"taken over"))
        .await;
    a.subscribe(TopicFilter::Name("to/cmd"), QoS::AtLeastOnce).await;
    let mut b = h.device_at(Ipv4Addr::new(127, 0, 0, 3), "to-dev").await;
    b.connect(60, true).await;
    // The old address has no session any more; no will for a takeover.
    a.send(&Packet::PingReq(None)).await;
    a.expect(Rx::Disconnect(None)).await;
    b.publish_qos1(TopicRef::Short(*b"to"), b"from b").await;
    obs.expect_msg_eq("to", b"from b").await;
    obs.expect_none().await;
    // The new session subscribes afresh and receives at its own address only.
    let ack = b.subscribe(TopicFilter::Name("to/cmd"), QoS::AtLeastOnce).await;
    let mut publisher = h.observer().await;
    let p = broker_to_device(&mut publisher, &mut b, "to/cmd", 1, b"cmd").await;
    assert_eq!(p.topic, TopicRef::Normal(ack.topic_id));
    a.expect_silence().await;
    let s = h.wait_stats("one takeover", |s| s.metrics.takeovers == 1).await;
    assert_eq!((s.sessions, s.metrics.lost), (1, 0));
}

async fn clean_session_false_keeps_topic_ids(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("cs/#").await;
    let mut dev = h.device("cs-dev").await;
    dev.connect(60, false).await;
    let pub_id = dev.register("cs/up").await;
    let sub = dev.subscribe(TopicFilter::Name("cs/down"), QoS::AtLeastOnce).await;
    dev.disconnect().await;

    // Back with clean session false: the ids and the subscription are still there.
    dev.connect(60, false).await;
    dev.publish_qos1(TopicRef::Normal(pub_id), b"kept").await;
    obs.expect_msg_eq("cs/up", b"kept").await;
    let mut publisher = h.observer().await;
    publisher.publish("cs/down", 1, false, b"still subscribed").await;
    // Delivered with the kept id: no REGISTER first.
    let p = dev.expect_publish().await;
    assert_eq!(
        (p.topic, p.data.as_slice()),
        (TopicRef::Normal(sub.topic_id), &b"still subscribed"[..])
    );
    dev.ack(&p).await;
    // Skip the echo of our own publish on cs/down? (none: we published on cs/up.)
    dev.expect_silence().await;
    dev.disconnect().await;

    // Clean session true forgets them.
    dev.connect(60, true).await;
    let msg_id = dev
        .publish(TopicRef::Normal(pub_id), QoS::AtLeastOnce, false, b"gone")
        .await;
    dev.expect(Rx::PubAck(PubAck {
        topic_id: pub_id,
        msg_id,
        code: ReturnCode::InvalidTopicId,
    }))
    .await;
    publisher.publish("cs/down", 1, false, b"not subscribed").await;
    dev.expect_silence().await;
    // The observer saw "cs/down" messages; nothing of "gone".
    let m = obs.expect_msg_eq("cs/down", b"still subscribed").await;
    h.assert_published_qos(&m, 1);
    obs.expect_msg_eq("cs/down", b"not subscribed").await;
    obs.expect_none().await;
}

/// xorshift64*: deterministic garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Whether the gateway counts `data` as malformed (it does not decode, or is an
/// encapsulation whose content does not). Requests the codec calls unsupported are
/// answered instead, so they are not malformed.
fn malformed(data: &[u8]) -> bool {
    let undecodable = |r: Result<Packet<'_>, sn_codec::Error>| match r {
        Err(sn_codec::Error::Unsupported { .. }) => false,
        Err(_) | Ok(Packet::Encapsulated(_)) => true,
        Ok(_) => false,
    };
    match Packet::decode(data) {
        Ok(Packet::Encapsulated(e)) => undecodable(Packet::decode(e.inner)),
        r => undecodable(r),
    }
}

async fn hostile_datagrams_are_dropped_and_counted(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("ho/#").await;
    let mut good = h.device_at(Ipv4Addr::new(127, 0, 0, 5), "ho-good").await;
    good.connect(60, true).await;
    let id = good.register("ho/up").await;
    let down = good.subscribe(TopicFilter::Name("ho/down"), QoS::AtLeastOnce).await;
    let before = h.wait_stats("the good client", |s| s.active == 1).await.metrics;

    let mut evil = h.device_at(Ipv4Addr::new(127, 0, 0, 6), "ho-evil").await;
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut sent_malformed = 0u64;
    let mut garbage: Vec<Vec<u8>> = Vec::new();
    // Random garbage of every size, keeping only what really is malformed.
    while garbage.len() < 300 {
        let len = (rng.next() % 300) as usize;
        let g = rng.bytes(len);
        if malformed(&g) {
            garbage.push(g);
        }
    }
    // Truncated valid messages.
    let samples = [
        encode(&Packet::Connect(e2e::Connect {
            will: true,
            clean_session: true,
            duration: 10,
            client_id: "ho-good",
        })),
        encode(&Packet::Publish(e2e::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Normal(id),
            msg_id: 7,
            data: b"payload",
        })),
        encode(&Packet::Register(e2e::Register {
            topic_id: 0,
            msg_id: 3,
            topic_name: "ho/x",
        })),
        encode(&Packet::Disconnect(Some(60))),
    ];
    for s in &samples {
        for cut in 0..s.len() {
            let t = s.get(..cut).expect("prefix").to_vec();
            if malformed(&t) {
                garbage.push(t);
            }
        }
        // Wrong length octet: too long, too short, zero, the three-octet marker.
        for wrong in [s.len() as u8 + 1, s.len() as u8 - 1, 0, 1, 0xFF] {
            let mut w = s.clone();
            w[0] = wrong;
            if malformed(&w) {
                garbage.push(w);
            }
        }
        // Trailing junk.
        let mut w = s.clone();
        w.extend_from_slice(b"junk");
        if malformed(&w) {
            garbage.push(w);
        }
    }
    // An encapsulation around garbage, an encapsulation in an encapsulation, an empty
    // datagram, a huge one.
    garbage.push(vec![0x05, 0xFE, 0x00, 0x01, 0x02, 0xAA, 0xBB]);
    let inner = encode(&Packet::PingReq(None));
    let mut once = vec![0x05, 0xFE, 0x00, 0x01, 0x02];
    once.extend_from_slice(&inner);
    let mut twice = vec![0x05, 0xFE, 0x00, 0x03, 0x04];
    twice.extend_from_slice(&once);
    garbage.push(twice);
    garbage.push(Vec::new());
    garbage.push(loop {
        let g = rng.bytes(60_000);
        if malformed(&g) {
            break g;
        }
    });
    // In batches, each counted before the next is sent, so that no datagram is lost in
    // a full socket buffer on a busy machine.
    for batch in garbage.chunks(25) {
        for g in batch {
            assert!(malformed(g), "test datagram must be malformed: {g:02x?}");
            evil.send_raw(g).await;
            sent_malformed += 1;
        }
        let want = before.malformed + sent_malformed;
        h.wait_stats("the batch counted", |s| s.metrics.malformed >= want).await;
    }
    // Some garbage from the good client's own address too.
    for _ in 0..20 {
        let g = loop {
            let len = 1 + (rng.next() % 40) as usize;
            let g = rng.bytes(len);
            if malformed(&g) {
                break g;
            }
        };
        good.send_raw(&g).await;
        sent_malformed += 1;
    }

    // Session messages from an address with no session: dropped, answered with
    // DISCONNECT where an answer is due.
    let unknown = [
        (
            encode(&Packet::Publish(e2e::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: TopicRef::Normal(id),
                msg_id: 9,
                data: b"not yours",
            })),
            true,
        ),
        (
            encode(&Packet::Register(e2e::Register {
                topic_id: 0,
                msg_id: 1,
                topic_name: "ho/evil",
            })),
            true,
        ),
        (
            encode(&Packet::Subscribe(e2e::Subscribe {
                dup: false,
                qos: QoS::AtMostOnce,
                msg_id: 2,
                topic: TopicFilter::Name("#"),
            })),
            true,
        ),
        (encode(&Packet::PingReq(None)), true),
        (encode(&Packet::PubRel(4)), true),
        (
            encode(&Packet::PubAck(PubAck {
                topic_id: down.topic_id,
                msg_id: 1,
                code: ReturnCode::Accepted,
            })),
            false,
        ),
        // Answered: the device may be repeating a DISCONNECT whose answer was lost.
        (encode(&Packet::Disconnect(None)), true),
        (encode(&Packet::WillMsg(b"x")), false),
    ];
    for (p, answered) in &unknown {
        evil.send_raw(p).await;
        if *answered {
            evil.expect(Rx::Disconnect(None)).await;
        }
    }
    evil.expect_silence().await;

    let unknown_count = unknown.len() as u64;
    let s = h
        .wait_stats("every hostile datagram counted", |s| {
            s.metrics.malformed >= before.malformed + sent_malformed
                && s.metrics.unknown_peer >= before.unknown_peer + unknown_count
        })
        .await;
    assert_eq!(s.metrics.malformed, before.malformed + sent_malformed);
    assert_eq!(s.metrics.unknown_peer, before.unknown_peer + unknown_count);
    assert_eq!((s.sessions, s.active), (1, 1), "only the good client has a session");
    // Nothing reached the broker from the hostile traffic.
    obs.expect_none().await;

    // The good client works in both directions.
    good.ping().await;
    good.publish_qos1(TopicRef::Normal(id), b"still here").await;
    obs.expect_msg_eq("ho/up", b"still here").await;
    let mut publisher = h.observer().await;
    let p = broker_to_device(&mut publisher, &mut good, "ho/down", 1, b"down").await;
    assert_eq!(p.topic, TopicRef::Normal(down.topic_id));
    obs.expect_msg_eq("ho/down", b"down").await;
}

/// Issue 9, item 1: a topic the broker would refuse must never go out on a connection
/// other devices use. QoS -1 publishes of every sender share one broker connection, and
/// mosquitto closes a connection that carries a control character in a topic: one
/// hostile datagram per legitimate one used to cut legitimate QoS -1 delivery to a
/// fifth. Every legitimate message must arrive; the hostile ones are refused with 0x03
/// where they can be answered, and counted.
async fn hostile_topics_do_not_cut_qos_minus_one_delivery(kind: BrokerKind) {
    const N: usize = 50;
    let Some(h) = Harness::start(kind).await else { return };
    let mut obs = h.observe("#").await;
    let legit = h.device_at(Ipv4Addr::new(127, 0, 0, 21), "ht-legit").await;
    let hostile = h.device_at(Ipv4Addr::new(127, 0, 0, 22), "ht-hostile").await;
    // A connected hostile device too, whose REGISTER and PUBLISH of `a/\x01/b` would have
    // gone out on its own broker connection.
    let mut connected = h.device_at(Ipv4Addr::new(127, 0, 0, 23), "ht-connected").await;
    connected.connect(60, true).await;
    let before = h.wait_stats("the connected device", |s| s.active == 1).await.metrics;

    let mut refused = 0u64;
    for i in 0..N {
        let payload = format!("legit {i}");
        let topic = if i % 2 == 0 {
            TopicRef::Predefined(PREDEFINED_ID)
        } else {
            TopicRef::Short(*b"ht")
        };
        legit
            .send_publish(false, topic, QoS::MinusOne, false, 0, payload.as_bytes())
            .await;
        hostile
            .send_publish(false, TopicRef::Short([0x01, 0x02]), QoS::MinusOne, false, 0, b"evil")
            .await;
        refused += 1;
        if i % 10 == 0 {
            let msg_id = connected.msg_id();
            connected
                .send(&Packet::Register(e2e::Register {
                    topic_id: 0,
                    msg_id,
                    topic_name: "a/\x01/b",
                }))
                .await;
            connected
                .expect(Rx::RegAck(RegAck {
                    topic_id: 0,
                    msg_id,
                    code: ReturnCode::NotSupported,
                }))
                .await;
            refused += 1;
            // What it would publish on: no id was assigned, and a short name with control
            // characters is refused too.
            let msg_id = connected
                .publish(TopicRef::Normal(1), QoS::AtLeastOnce, false, b"evil")
                .await;
            connected
                .expect(Rx::PubAck(PubAck {
                    topic_id: 1,
                    msg_id,
                    code: ReturnCode::InvalidTopicId,
                }))
                .await;
            let msg_id = connected
                .publish(TopicRef::Short([0x01, 0x02]), QoS::AtLeastOnce, false, b"evil")
                .await;
            connected
                .expect(Rx::PubAck(PubAck {
                    topic_id: 0x0102,
                    msg_id,
                    code: ReturnCode::NotSupported,
                }))
                .await;
            refused += 1;
        }
    }

    let mut got: Vec<String> = Vec::with_capacity(N);
    while got.len() < N {
        let Some(m) = obs.recv_within(e2e::WAIT).await else {
            panic!("{} of {N} legitimate QoS -1 messages arrived: {got:?}", got.len())
        };
        assert!(
            m.topic == PREDEFINED_TOPIC || m.topic == "ht",
            "only legitimate topics reach the broker, got {m:?}"
        );
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    got.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("legit {i}")).collect();
    want.sort();
    assert_eq!(got, want);
    obs.expect_none().await;

    let s = h
        .wait_stats("the hostile traffic counted", |s| {
            s.metrics.topic_refused >= before.topic_refused + refused
        })
        .await;
    assert_eq!(s.metrics.topic_refused, before.topic_refused + refused);
    assert_eq!(s.metrics.qos_minus_one, before.qos_minus_one + N as u64);
    assert_eq!(s.metrics.qos_minus_one_dropped, before.qos_minus_one_dropped + N as u64);
    // The connected hostile device's own session is unharmed too.
    assert_eq!((s.sessions, s.active), (1, 1));
    connected.ping().await;
    connected
        .publish_qos1(TopicRef::Predefined(PREDEFINED_ID), b"after")
        .await;
    obs.expect_msg_eq(PREDEFINED_TOPIC, b"after").await;
}

async fn max_clients_congestion(kind: BrokerKind) {
    let Some(h) = Harness::start_with(kind, |c| c.max_clients = 2).await else {
        return;
    };
    let mut obs = h.observe("mc/#").await;
    let mut a = h.device("mc-a").await;
    let mut b = h.device("mc-b").await;
    let mut c = h.device("mc-c").await;
    a.connect(60, true).await;
    b.connect(60, true).await;
    assert_eq!(c.try_connect(60, true).await, Rx::ConnAck(ReturnCode::Congestion));
    // The refused client has no session.
    c.send(&Packet::PingReq(None)).await;
    c.expect(Rx::Disconnect(None)).await;
    let s = h.wait_stats("one refusal", |s| s.metrics.connects_refused == 1).await;
    assert_eq!(s.sessions, 2);
    // The two admitted clients work.
    a.publish_qos1(TopicRef::Short(*b"mc"), b"a").await;
    obs.expect_msg_eq("mc", b"a").await;
    b.publish_qos1(TopicRef::Short(*b"mc"), b"b").await;
    obs.expect_msg_eq("mc", b"b").await;
    // A reconnect of an admitted client is not refused (it replaces its own session).
    a.connect(60, true).await;
    // Once one leaves, there is room again.
    b.disconnect().await;
    c.connect(60, true).await;
    c.publish_qos1(TopicRef::Short(*b"mc"), b"c").await;
    obs.expect_msg_eq("mc", b"c").await;
}
