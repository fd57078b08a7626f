//! Device identity and access control end to end, tried as an attacker on the radio
//! network would: devices on their own loopback addresses (127.0.0.2, 127.0.0.3, ...),
//! the gateway in registry or open mode, a real broker. Per-device broker logins run
//! against mosquitto with a `password_file` and an `acl_file`; the other cases run
//! against mosquitto and the embedded broker.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use e2e::{
    BrokerKind, Harness, Mosquitto, Packet, PubAck, QoS, RegAck, Register, ReturnCode, Rx, Subscribe, TopicFilter,
    TopicRef,
};
use gateway::auth::{AddressChange, AuthConfig, Registry};

e2e::broker_suite! {
    unknown_ids_and_wrong_addresses_are_refused,
    takeover_and_wake_from_another_address_are_refused_under_deny,
    takeover_and_wake_from_another_address_are_accepted_under_allow,
    topic_acls_in_both_directions_with_client_id,
    dollar_topics_are_refused_in_open_mode,
    mountpoint_both_ways,
    a_node_id_is_bound_to_its_forwarder,
    qos_minus_one_senders_are_matched_by_address,
}

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("e2e-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn registry(text: &str, base: &Path) -> Arc<Registry> {
    Arc::new(Registry::parse(text, "devices.toml", base, |_| None).expect("the test registry is valid"))
}

/// The gateway in registry mode with `devices`, against a broker of `kind`.
async fn start(kind: BrokerKind, devices: &str, address_change: AddressChange) -> Option<Harness> {
    let mosquitto = match kind {
        BrokerKind::Mosquitto => Some(Mosquitto::start()?),
        BrokerKind::Embedded => None,
    };
    let registry = registry(devices, Path::new("/"));
    Harness::start_custom(mosquitto, |s| {
        s.engine.auth = AuthConfig {
            registry: Some(registry),
            address_change,
            ..AuthConfig::default()
        };
    })
    .await
}

fn not_supported() -> Rx {
    Rx::ConnAck(ReturnCode::NotSupported)
}

async fn unknown_ids_and_wrong_addresses_are_refused(kind: BrokerKind) {
    let devices = "[[device]]\nclient_id = \"dev-1\"\naddresses = [\"127.0.0.2\"]\npublish = [\"#\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Deny).await else {
        return;
    };
    let mut watch = h.observe("#").await;
    // Its own id from another address, and an id no entry names: refused.
    let mut impostor = h.device_at(B, "dev-1").await;
    assert_eq!(impostor.try_connect(60, true).await, not_supported());
    let mut stranger = h.device_at(A, "stranger").await;
    assert_eq!(stranger.try_connect(60, true).await, not_supported());
    // A refused device is not a session: what it sends next is answered DISCONNECT.
    impostor
        .send_publish(
            false,
            TopicRef::Predefined(e2e::PREDEFINED_ID),
            QoS::AtLeastOnce,
            false,
            1,
            b"x",
        )
        .await;
    impostor.expect(Rx::Disconnect(None)).await;
    // The device itself, from its address: accepted, and its publish arrives.
    let mut dev = h.device_at(A, "dev-1").await;
    dev.connect(60, true).await;
    dev.publish_qos1(TopicRef::Predefined(e2e::PREDEFINED_ID), b"real")
        .await;
    watch.expect_msg_eq(e2e::PREDEFINED_TOPIC, b"real").await;
    watch.expect_none().await;
    let s = h
        .wait_stats("two refusals, one session", |s| {
            s.metrics.auth_unknown_client + s.metrics.auth_address_refused >= 2 && s.sessions == 1
        })
        .await;
    assert_eq!((s.metrics.auth_unknown_client, s.metrics.auth_address_refused), (1, 1));
}

/// A sleeping victim with three held messages, and an attacker at another address who
/// knows its client id.
async fn victim_asleep_with_three_held(h: &Harness) -> e2e::SnClient {
    let mut victim = h.device_at(A, "victim").await;
    victim.connect(60, true).await;
    victim.subscribe(TopicFilter::Name("v/#"), QoS::AtLeastOnce).await;
    victim.sleep(60).await;
    h.wait_stats("the victim asleep", |s| s.asleep == 1).await;
    let mut publisher = h.observer().await;
    for i in 0..3 {
        publisher.publish("v/t", 1, false, format!("m{i}").as_bytes()).await;
    }
    h.wait_stats("three held messages", |s| s.held_messages == 3).await;
    victim
}

async fn takeover_and_wake_from_another_address_are_refused_under_deny(kind: BrokerKind) {
    let devices = "[[device]]\nclient_id = \"victim\"\naddresses = [\"127.0.0.0/8\"]\nsubscribe = [\"v/#\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Deny).await else {
        return;
    };
    let mut victim = victim_asleep_with_three_held(&h).await;
    let mut attacker = h.device_at(B, "victim").await;
    // A wake from elsewhere: DISCONNECT, none of the held messages.
    attacker.send(&Packet::PingReq(Some("victim"))).await;
    attacker.expect(Rx::Disconnect(None)).await;
    attacker.expect_silence().await;
    // A takeover from elsewhere: CONNACK 0x03.
    assert_eq!(attacker.try_connect(60, true).await, not_supported());
    let s = h
        .wait_stats("both refusals counted", |s| s.metrics.auth_takeover_refused == 1)
        .await;
    assert_eq!((s.metrics.auth_wake_refused, s.metrics.auth_takeover_refused), (1, 1));
    assert_eq!(
        (s.asleep, s.held_messages, s.metrics.takeovers),
        (1, 3, 0),
        "the victim's session untouched"
    );
    // The victim's own wake gets all three.
    let got = victim.wake().await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.data.as_slice()).collect();
    assert_eq!(payloads, [&b"m0"[..], b"m1", b"m2"]);
}

async fn takeover_and_wake_from_another_address_are_accepted_under_allow(kind: BrokerKind) {
    let devices = "[[device]]\nclient_id = \"victim\"\naddresses = [\"127.0.0.0/8\"]\nsubscribe = [\"v/#\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Allow).await else {
        return;
    };
    let _victim = victim_asleep_with_three_held(&h).await;
    // allow: a wake from another address is a device that moved (NAT rebinding), so it
    // gets the held messages; this is the trade-off docs/security.md describes.
    let mut other = h.device_at(B, "victim").await;
    assert_eq!(other.wake().await.len(), 3);
    // And a CONNECT from a third address resumes the (sleeping) session there.
    let mut third = h.device_at(Ipv4Addr::new(127, 0, 0, 4), "victim").await;
    third.connect(60, true).await;
    let s = h.wait_stats("the session awake", |s| s.active == 1).await;
    assert_eq!(s.sessions, 1);
    assert_eq!((s.metrics.auth_wake_refused, s.metrics.auth_takeover_refused), (0, 0));
}

async fn topic_acls_in_both_directions_with_client_id(kind: BrokerKind) {
    let devices = "[[device]]\nclient_id = \"sensor-*\"\naddresses = [\"127.0.0.0/8\"]\n\
                   publish = [\"sensors/%c/#\"]\nsubscribe = [\"cmd/%c/#\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Deny).await else {
        return;
    };
    let mut watch = h.observe("sensors/#").await;
    let mut dev = h.device_at(A, "sensor-1").await;
    dev.connect(60, true).await;
    // Publishing: its own tree only.
    let msg_id = dev.msg_id();
    dev.send(&Packet::Register(Register {
        topic_id: 0,
        msg_id,
        topic_name: "sensors/sensor-2/t",
    }))
    .await;
    dev.expect(Rx::RegAck(RegAck {
        topic_id: 0,
        msg_id,
        code: ReturnCode::NotSupported,
    }))
    .await;
    // Nor by a predefined id that names a topic outside it (no REGISTER to refuse).
    let msg_id = dev
        .publish(TopicRef::Predefined(e2e::PREDEFINED_ID), QoS::AtLeastOnce, false, b"no")
        .await;
    dev.expect(Rx::PubAck(PubAck {
        topic_id: e2e::PREDEFINED_ID,
        msg_id,
        code: ReturnCode::NotSupported,
    }))
    .await;
    let own = dev.register("sensors/sensor-1/t").await;
    dev.publish_qos1(TopicRef::Normal(own), b"ok").await;
    watch.expect_msg_eq("sensors/sensor-1/t", b"ok").await;
    watch.expect_none().await;
    // Subscribing: its own command tree, not another's, not everything.
    for filter in ["cmd/sensor-2/#", "#", "cmd/+/go"] {
        let msg_id = dev.msg_id();
        dev.send(&Packet::Subscribe(Subscribe {
            dup: false,
            qos: QoS::AtLeastOnce,
            msg_id,
            topic: TopicFilter::Name(filter),
        }))
        .await;
        match dev.recv().await {
            Rx::SubAck(a) if a.msg_id == msg_id && a.code == ReturnCode::NotSupported => {}
            other => panic!("SUBSCRIBE {filter}: expected SUBACK 0x03, got {other:?}"),
        }
    }
    dev.subscribe(TopicFilter::Name("cmd/sensor-1/#"), QoS::AtLeastOnce)
        .await;
    let mut commander = h.observer().await;
    commander.publish("cmd/sensor-2/go", 1, false, b"not yours").await;
    commander.publish("cmd/sensor-1/go", 1, false, b"yours").await;
    let p = dev.receive().await;
    assert_eq!(p.data, b"yours");
    dev.expect_nothing_new().await;
    let s = h
        .wait_stats("five refusals", |s| {
            s.metrics.auth_publish_denied + s.metrics.auth_subscribe_denied >= 5
        })
        .await;
    assert_eq!((s.metrics.auth_publish_denied, s.metrics.auth_subscribe_denied), (2, 3));
}

async fn dollar_topics_are_refused_in_open_mode(kind: BrokerKind) {
    let Some(h) = Harness::start(kind).await else { return };
    // rumqttd refuses subscriptions to `$` topics; mosquitto shows what reaches it.
    let mut watch = match kind {
        BrokerKind::Mosquitto => Some((h.observe("$x").await, h.observe("$SYS/e2e/#").await)),
        BrokerKind::Embedded => None,
    };
    let mut dev = h.device("dollar").await;
    dev.connect(60, true).await;
    let msg_id = dev.msg_id();
    dev.send(&Packet::Register(Register {
        topic_id: 0,
        msg_id,
        topic_name: "$SYS/e2e/x",
    }))
    .await;
    dev.expect(Rx::RegAck(RegAck {
        topic_id: 0,
        msg_id,
        code: ReturnCode::NotSupported,
    }))
    .await;
    let short = TopicRef::Short(*b"$x");
    let msg_id = dev.publish(short, QoS::AtLeastOnce, false, b"x").await;
    dev.expect(Rx::PubAck(PubAck {
        topic_id: e2e::raw_topic_id(short),
        msg_id,
        code: ReturnCode::NotSupported,
    }))
    .await;
    // QoS -1 from anyone, to the same short topic: dropped.
    let anyone = h.device_at(B, "").await;
    anyone.send_publish(false, short, QoS::MinusOne, false, 0, b"x").await;
    h.wait_stats("three refusals", |s| s.metrics.auth_dollar_refused == 3)
        .await;
    if let Some((dollar, sys)) = &mut watch {
        dollar.expect_none().await;
        sys.expect_none().await;
    }
}

async fn mountpoint_both_ways(kind: BrokerKind) {
    let mosquitto = match kind {
        BrokerKind::Mosquitto => match Mosquitto::start() {
            Some(m) => Some(m),
            None => return,
        },
        BrokerKind::Embedded => None,
    };
    let Some(h) = Harness::start_custom(mosquitto, |s| {
        s.engine.auth.mountpoint = Some("site-a/%c/".into());
    })
    .await
    else {
        return;
    };
    let mut watch = h.observe("#").await;
    let mut dev = h.device("m1").await;
    dev.connect(60, true).await;
    let t = dev.register("t/1").await;
    dev.publish_qos1(TopicRef::Normal(t), b"up").await;
    watch.expect_msg_eq("site-a/m1/t/1", b"up").await;
    dev.subscribe(TopicFilter::Name("cmd/#"), QoS::AtLeastOnce).await;
    // The device subscribed within its mountpoint: another device's tree, and the bare
    // topic, do not reach it; its own does, with the prefix stripped.
    let mut commander = h.observer().await;
    commander.publish("site-a/m2/cmd/go", 1, false, b"m2").await;
    commander.publish("cmd/go", 1, false, b"bare").await;
    commander.publish("site-a/m1/cmd/go", 1, false, b"m1").await;
    let mut got = None;
    while got.is_none() {
        match dev.recv().await {
            Rx::Register(r) => {
                assert_eq!(r.topic_name, "cmd/go", "the name the device sees has no prefix");
                dev.regack(&r).await;
            }
            Rx::Publish(p) => {
                dev.ack(&p).await;
                got = Some(p);
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(got.map(|p| p.data), Some(b"m1".to_vec()));
    dev.expect_nothing_new().await;
}

/// mosquitto with a password file and an ACL file: `dev-a` may use only `a/#`, anonymous
/// clients (the observer) everything.
fn broker_with_logins(dir: &Path) -> Option<Mosquitto> {
    let passwords = dir.join("passwords");
    for (i, (user, pw)) in [("dev-a", "pa"), ("dev-b", "pb")].iter().enumerate() {
        let mut cmd = std::process::Command::new("/usr/bin/mosquitto_passwd");
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd.arg(&passwords).arg(user).arg(pw).status();
        match status {
            Ok(s) if s.success() => {}
            // Without mosquitto_passwd (packaged with mosquitto) there is no mosquitto
            // either, which Mosquitto::start reports below.
            _ => return Mosquitto::start().and(None),
        }
    }
    let acl = dir.join("acl");
    std::fs::write(&acl, "topic readwrite #\n\nuser dev-a\ntopic readwrite a/#\n").expect("write acl");
    Mosquitto::start_with_conf(&format!(
        "password_file {}\nacl_file {}\n",
        passwords.display(),
        acl.display()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_broker_logins_through_mosquitto_password_and_acl_files() {
    let dir = temp_dir("logins");
    let Some(mosquitto) = broker_with_logins(&dir) else {
        return;
    };
    std::fs::write(dir.join("dev-b.password"), "wrong\n").expect("write");
    let devices = registry(
        "[[device]]\nclient_id = \"dev-a\"\npublish = [\"#\"]\nusername = \"%c\"\npassword = \"pa\"\n\
         [[device]]\nclient_id = \"dev-b\"\npublish = [\"#\"]\nusername = \"%c\"\npassword_file = \"dev-b.password\"\n",
        &dir,
    );
    let Some(h) = Harness::start_custom(Some(mosquitto), |s| {
        s.engine.auth.registry = Some(devices);
    })
    .await
    else {
        return;
    };
    let mut watch = h.observe("#").await;
    let mut a = h.device("dev-a").await;
    a.connect(60, true).await;
    let allowed = a.register("a/x").await;
    a.publish_qos1(TopicRef::Normal(allowed), b"in a/").await;
    watch.expect_msg_eq("a/x", b"in a/").await;
    // Outside a/#: mosquitto's ACL for dev-a drops it (an anonymous login would pass).
    let other = a.register("b/x").await;
    a.publish_qos1(TopicRef::Normal(other), b"in b/").await;
    a.publish_qos1(TopicRef::Normal(allowed), b"fence").await;
    watch.expect_msg_eq("a/x", b"fence").await;
    watch.expect_none().await;
    // Wrong credentials: the broker refuses, the device gets CONNACK 0x03.
    let mut b = h.device("dev-b").await;
    assert_eq!(b.try_connect(60, true).await, not_supported());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CONNECT encapsulated as if from wireless node `node` behind a forwarder at `from`;
/// the (encapsulated) answer's inner message.
async fn connect_as_node(from: &mut e2e::SnClient, node: &[u8], client_id: &str) -> Rx {
    let inner = Packet::Connect(e2e::Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id,
    });
    let mut buf = vec![0; inner.encoded_len() + node.len() + 3];
    let n = sn_codec::encode_encapsulated(0, node, &inner, &mut buf).expect("encodes");
    from.send_raw(&buf[..n]).await;
    let answer = from.recv_raw().await;
    match Packet::decode(&answer) {
        Ok(Packet::Encapsulated(e)) => {
            assert_eq!(e.node_id, node, "answered to the node");
            Rx::from_packet(&Packet::decode(e.inner).expect("the inner message decodes"))
        }
        other => panic!("expected an encapsulated answer, got {other:?}"),
    }
}

async fn a_node_id_is_bound_to_its_forwarder(kind: BrokerKind) {
    let devices = "[[device]]\nclient_id = \"node-1\"\naddresses = [\"node:0a1b@127.0.0.2\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Deny).await else {
        return;
    };
    // Claimed through another "forwarder" (the attacker's own address): refused.
    let mut attacker = h.device_at(B, "").await;
    assert_eq!(
        connect_as_node(&mut attacker, &[0x0a, 0x1b], "node-1").await,
        not_supported()
    );
    // Sent directly from the forwarder's address, not as the node: refused.
    let mut forwarder = h.device_at(A, "node-1").await;
    assert_eq!(forwarder.try_connect(60, true).await, not_supported());
    // Through its forwarder: accepted.
    assert_eq!(
        connect_as_node(&mut forwarder, &[0x0a, 0x1b], "node-1").await,
        Rx::ConnAck(ReturnCode::Accepted)
    );
    let s = h
        .wait_stats("two refusals, one session", |s| {
            s.metrics.auth_address_refused >= 2 && s.sessions == 1
        })
        .await;
    assert_eq!(s.metrics.auth_address_refused, 2);
}

async fn qos_minus_one_senders_are_matched_by_address(kind: BrokerKind) {
    // QoS -1 carries no client id: the sender is the entry whose addresses admit it.
    let devices = "[[device]]\nclient_id = \"beacon\"\naddresses = [\"127.0.0.2\"]\npublish = [\"e2e/#\"]\n";
    let Some(h) = start(kind, devices, AddressChange::Deny).await else {
        return;
    };
    let mut watch = h.observe("#").await;
    let beacon = h.device_at(A, "").await;
    let stranger = h.device_at(B, "").await;
    let predefined = TopicRef::Predefined(e2e::PREDEFINED_ID);
    stranger
        .send_publish(false, predefined, QoS::MinusOne, false, 0, b"stranger")
        .await;
    // Outside the entry's patterns (a short topic "zz").
    beacon
        .send_publish(false, TopicRef::Short(*b"zz"), QoS::MinusOne, false, 0, b"outside")
        .await;
    beacon
        .send_publish(false, predefined, QoS::MinusOne, false, 0, b"beacon")
        .await;
    watch.expect_msg_eq(e2e::PREDEFINED_TOPIC, b"beacon").await;
    watch.expect_none().await;
    let s = h
        .wait_stats("two QoS -1 drops", |s| s.metrics.qos_minus_one_dropped >= 2)
        .await;
    assert_eq!((s.metrics.auth_address_refused, s.metrics.auth_publish_denied), (1, 1));
}
