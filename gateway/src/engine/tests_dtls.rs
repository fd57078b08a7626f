//! DTLS link addresses in the engine: a CONNECT over DTLS needs a client id the
//! registry binds to the session's PSK identity, and a session under a DTLS identity is
//! taken over or woken only under that identity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::{cfg, msg, T};
use super::*;
use crate::auth::{AuthConfig, Registry};
use sn_codec::{Connect, ReturnCode};

const DEVICES: &str = r#"
[[device]]
client_id = "sensor-7"
psk_identity = "id-7"
psk = "00112233445566778899aabbccddeeff"

[[device]]
client_id = "sensor-8"
psk_identity = "id-8"
psk = "ffeeddccbbaa99887766554433221100"

[[device]]
client_id = "plain"

[[device]]
client_id = "locked-*"
psk_identity = "id-locked"
psk = "0102030405060708"
dtls_only = true
"#;

fn t() -> T {
    let registry = Registry::parse(DEVICES, "devices.toml", std::path::Path::new("/"), |_| None).unwrap();
    T::with(EngineConfig {
        auth: AuthConfig {
            registry: Some(Arc::new(registry)),
            ..AuthConfig::default()
        },
        ..cfg()
    })
}

fn dtls(port: u16, identity: &str) -> LinkAddr {
    LinkAddr::Dtls(0, SocketAddr::from(([127, 0, 0, 1], port)), Arc::from(identity))
}

fn connect(id: &str) -> Packet<'_> {
    Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 0,
        client_id: id,
    })
}

#[test]
fn a_client_id_bound_to_the_identity_connects() {
    let mut t = t();
    let d = dtls(1, "id-7");
    t.connect(&d, "sensor-7", true, 0);
    assert_eq!(t.gw.session_state("sensor-7"), Some(SessionState::Active));
}

#[test]
fn a_client_id_not_bound_to_the_identity_gets_connack_0x03() {
    let mut t = t();
    // Another device's client id, and one without a key, under identity id-7.
    for id in ["sensor-8", "plain", "nobody"] {
        let d = dtls(1, "id-7");
        t.send(&d, connect(id));
        t.expect(&d, &[Packet::ConnAck(ReturnCode::NotSupported)]);
    }
    assert!(t.cmds().is_empty(), "no broker connection for a refused device");
    let m = t.gw.stats().metrics;
    assert_eq!((m.auth_identity_refused, m.connects_refused), (3, 3));
}

#[test]
fn another_identity_or_a_plain_address_cannot_take_over_or_wake_the_session() {
    let mut t = t();
    let own = dtls(1, "id-7");
    let key = t.connect(&own, "sensor-7", true, 0);
    t.send(&own, Packet::Disconnect(Some(60)));
    t.expect(&own, &[Packet::Disconnect(None)]);
    t.event(key, msg("sensors/temp", "held", MqttQos::AtLeastOnce, 7));
    // The same address under another identity, and a plain UDP address.
    let other = dtls(1, "id-8");
    let plain = LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 1)));
    for attacker in [&other, &plain] {
        t.send(attacker, Packet::PingReq(Some("sensor-7")));
        t.expect(attacker, &[Packet::Disconnect(None)]);
        t.send(attacker, connect("sensor-7"));
        t.expect(attacker, &[Packet::ConnAck(ReturnCode::NotSupported)]);
    }
    assert!(t.cmds().is_empty(), "the session's broker connection is untouched");
    assert_eq!(t.gw.session_state("sensor-7"), Some(SessionState::Asleep));
    let m = t.gw.stats().metrics;
    assert_eq!((m.auth_wake_refused, m.auth_takeover_refused), (2, 1));
    assert_eq!(
        m.auth_identity_refused, 1,
        "under id-8 the client id is not bound at all"
    );
    // Its own wake gets the message.
    t.send(&own, Packet::PingReq(Some("sensor-7")));
    let got = t.tx();
    assert!(matches!(Packet::decode(&got[0].1).unwrap(), Packet::Publish(p) if p.data == b"held"));
}

#[test]
fn the_same_identity_at_a_new_address_takes_its_own_session_over() {
    let mut t = t();
    let old = dtls(1, "id-7");
    t.connect(&old, "sensor-7", true, 0);
    let new = dtls(2, "id-7");
    t.send(&new, connect("sensor-7"));
    assert!(!t.cmds().is_empty(), "the takeover goes ahead");
    assert_eq!(t.gw.stats().metrics.auth_takeover_refused, 0);
}

#[test]
fn a_dtls_only_device_is_refused_over_plain_udp_and_served_over_dtls() {
    let mut t = t();
    // Its client id, without DTLS: refused, even though no session exists to protect.
    let plain = LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 5)));
    t.send(&plain, connect("locked-1"));
    t.expect(&plain, &[Packet::ConnAck(ReturnCode::NotSupported)]);
    assert!(t.cmds().is_empty(), "no broker connection for it");
    let m = t.gw.stats().metrics;
    assert_eq!((m.auth_identity_refused, m.connects_refused), (1, 1));
    // Under its identity it connects; a device without dtls_only still may use plain UDP.
    t.connect(&dtls(6, "id-locked"), "locked-1", true, 0);
    assert_eq!(t.gw.session_state("locked-1"), Some(SessionState::Active));
    t.connect(&plain, "plain", true, 0);
    assert_eq!(t.gw.session_state("plain"), Some(SessionState::Active));
    // A PINGREQ over plain UDP cannot wake it either (another identity, or none).
    t.send(&dtls(6, "id-locked"), Packet::Disconnect(Some(60)));
    t.tx();
    let other = LinkAddr::Udp(0, SocketAddr::from(([127, 0, 0, 1], 7)));
    t.send(&other, Packet::PingReq(Some("locked-1")));
    t.expect(&other, &[Packet::Disconnect(None)]);
    assert_eq!(t.gw.session_state("locked-1"), Some(SessionState::Asleep));
}

#[test]
fn dtls_only_without_a_key_or_certificate_name_is_a_registry_error() {
    let e = Registry::parse(
        "[[device]]\nclient_id = \"x\"\ndtls_only = true\n",
        "devices.toml",
        std::path::Path::new("/"),
        |_| None,
    )
    .unwrap_err();
    assert!(e[0].contains("dtls_only") && e[0].contains("neither"), "{e:?}");
}
