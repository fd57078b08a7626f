//! The DTLS server against dimpl's own client, in memory with a fake clock.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};

use super::*;

struct Keys(HashMap<String, Vec<u8>>);

impl PskSource for Keys {
    fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        self.0.get(identity).cloned()
    }
}

struct Fixed(Vec<u8>);

impl PskResolver for Fixed {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

const KEY: &[u8] = b"0123456789abcdef";

fn server(limits: DtlsLimits) -> DtlsServer {
    let keys = Keys(HashMap::from([
        ("dev-1".to_string(), KEY.to_vec()),
        ("dev-2".to_string(), b"other key".to_vec()),
    ]));
    DtlsServer::new(limits, Arc::new(keys)).unwrap()
}

fn client_config(identity: &str, key: &[u8]) -> Arc<Config> {
    let config = Config::builder()
        .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Fixed(key.to_vec())))
        .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
        .dtls13_cipher_suites(&[])
        .build()
        .unwrap();
    Arc::new(config)
}

struct Client {
    dtls: Dtls,
    addr: SocketAddr,
    connected: bool,
    received: Vec<Vec<u8>>,
    closed: bool,
}

impl Client {
    fn new(identity: &str, key: &[u8], addr: &str, now: Instant) -> Self {
        Client::with_config(client_config(identity, key), addr, now)
    }

    fn with_config(config: Arc<Config>, addr: &str, now: Instant) -> Self {
        let mut dtls = Dtls::new_12_psk(config, now);
        dtls.set_active(true);
        dtls.handle_timeout(now).unwrap();
        Client {
            dtls,
            addr: addr.parse().unwrap(),
            connected: false,
            received: Vec::new(),
            closed: false,
        }
    }

    /// What the client wants to send now.
    fn outgoing(&mut self) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        loop {
            match self.dtls.poll_output(&mut buf) {
                Output::Packet(p) => out.push(p.to_vec()),
                Output::Timeout(_) => break,
                Output::Connected => self.connected = true,
                Output::ApplicationData(d) => self.received.push(d.to_vec()),
                Output::CloseNotify => self.closed = true,
                Output::BufferTooSmall { needed } => buf.resize(needed, 0),
                _ => {}
            }
        }
        out
    }
}

/// Moves datagrams both ways until neither side has anything to say; returns what the
/// server delivered.
fn pump(server: &mut DtlsServer, client: &mut Client, now: Instant) -> Vec<(Arc<str>, Vec<u8>)> {
    let mut delivered = Vec::new();
    for _ in 0..20 {
        let sent = client.outgoing();
        for d in &sent {
            server.handle_datagram(now, SystemTime::now(), client.addr, d);
        }
        let mut any = !sent.is_empty();
        while let Some(o) = server.poll_output() {
            any = true;
            match o {
                DtlsOutput::Transmit { to, data } => {
                    assert_eq!(to, client.addr);
                    let _ = client.dtls.handle_packet(&data);
                }
                DtlsOutput::Receive { identity, data, .. } => delivered.push((identity, data)),
            }
        }
        if !any {
            break;
        }
    }
    let _ = client.outgoing();
    delivered
}

#[test]
fn a_psk_client_handshakes_after_a_cookie_and_exchanges_datagrams() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::new("dev-1", KEY, "127.0.0.1:40000", now);
    pump(&mut s, &mut c, now);
    assert!(c.connected);
    assert_eq!(s.identity(&c.addr).map(|i| &**i), Some("dev-1"));
    let counters = s.counters();
    assert_eq!(
        (counters.cookies_sent, counters.handshakes_ok, counters.sessions),
        (1, 1, 1)
    );

    c.dtls.send_application_data(b"\x05\x04ping").unwrap();
    let got = pump(&mut s, &mut c, now);
    assert_eq!(got, vec![(Arc::from("dev-1"), b"\x05\x04ping".to_vec())]);

    s.send(now, c.addr, "dev-1", b"pong");
    pump(&mut s, &mut c, now);
    assert_eq!(c.received, vec![b"pong".to_vec()]);

    // Not for another identity at that address.
    s.send(now, c.addr, "dev-2", b"no");
    assert!(s.poll_output().is_none());
    assert_eq!(s.counters().unsent, 1);

    s.close(c.addr);
    pump(&mut s, &mut c, now);
    assert!(c.closed, "close_notify reached the client");
    assert_eq!(s.counters().sessions, 0);
}

#[test]
fn a_wrong_key_makes_no_session() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::new("dev-1", b"not the key", "127.0.0.1:40001", now);
    let got = pump(&mut s, &mut c, now);
    assert!(got.is_empty());
    assert!(!c.connected);
    assert_eq!(s.identity(&c.addr), None);
    assert_eq!(s.counters().handshakes_ok, 0);
    assert_eq!(s.counters().handshakes_failed, 1);
    assert_eq!(s.counters().sessions, 0);
}

#[test]
fn an_unknown_identity_makes_no_session() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::new("nobody", KEY, "127.0.0.1:40002", now);
    pump(&mut s, &mut c, now);
    assert!(!c.connected);
    assert_eq!(s.counters().handshakes_failed, 1);
    assert_eq!(s.counters().sessions, 0);
}

#[test]
fn a_burst_of_client_hellos_gets_only_hello_verify_requests_and_no_state() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut answers = 0;
    let config = client_config("dev-1", KEY);
    for i in 0..500u32 {
        let addr = format!("127.{}.{}.{}:5000", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        let mut c = Client::with_config(config.clone(), &addr, now);
        for hello in c.outgoing() {
            s.handle_datagram(now, SystemTime::now(), c.addr, &hello);
        }
        while let Some(o) = s.poll_output() {
            let DtlsOutput::Transmit { data, .. } = o else {
                panic!("only records to send");
            };
            assert_eq!((data[0], data[13]), (HANDSHAKE, HELLO_VERIFY_REQUEST));
            answers += 1;
        }
    }
    assert_eq!(answers, 500);
    assert_eq!(s.counters().cookies_sent, 500);
    assert_eq!(s.counters().sessions, 0);
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_client_hello_with_a_forged_cookie_keeps_no_state() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::new("dev-1", KEY, "127.0.0.1:40003", now);
    let first = c.outgoing().remove(0);
    s.handle_datagram(now, SystemTime::now(), c.addr, &first);
    let Some(DtlsOutput::Transmit { data: hvr, .. }) = s.poll_output() else {
        panic!("a HelloVerifyRequest");
    };
    c.dtls.handle_packet(&hvr).unwrap();
    let mut second = c.outgoing().remove(0);
    // The cookie is the last 32 octets before the cipher suites; flip one of it.
    let hello = ClientHello::parse(&second).unwrap();
    let cookie_end = RECORD_HEADER + HANDSHAKE_HEADER + hello.before_cookie.len() + 1 + 32;
    second[cookie_end - 1] ^= 1;
    s.handle_datagram(now, SystemTime::now(), c.addr, &second);
    assert_eq!(s.counters().sessions, 0);
    // A genuine cookie, from another address (a cookie is bound to its address).
    let mut c2 = Client::new("dev-1", KEY, "127.0.0.1:40004", now);
    let first = c2.outgoing().remove(0);
    s.handle_datagram(now, SystemTime::now(), c2.addr, &first);
    let mut hvrs = 0;
    while let Some(o) = s.poll_output() {
        let DtlsOutput::Transmit { to, data } = o else {
            panic!("only records to send");
        };
        assert_eq!(data[13], HELLO_VERIFY_REQUEST);
        hvrs += 1;
        if to == c2.addr {
            c2.dtls.handle_packet(&data).unwrap();
        }
    }
    assert_eq!(hvrs, 2, "the forged cookie is answered with a new HelloVerifyRequest");
    let genuine = c2.outgoing().remove(0);
    let other: SocketAddr = "127.0.0.9:40004".parse().unwrap();
    s.handle_datagram(now, SystemTime::now(), other, &genuine);
    assert_eq!(s.counters().sessions, 0);
    while let Some(o) = s.poll_output() {
        let DtlsOutput::Transmit { data, .. } = o else {
            panic!("only records to send");
        };
        assert_eq!(data[13], HELLO_VERIFY_REQUEST);
    }
    // From its own address it starts a handshake.
    s.handle_datagram(now, SystemTime::now(), c2.addr, &genuine);
    assert_eq!(s.counters().handshaking, 1);
}

#[test]
fn plain_datagrams_are_dropped_and_counted() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let from: SocketAddr = "127.0.0.1:40005".parse().unwrap();
    // An MQTT-SN CONNECT.
    s.handle_datagram(now, SystemTime::now(), from, b"\x0a\x04\x04\x01\x00\x3cdev1");
    // A DTLS application record from an address without a session.
    let mut record = vec![23, 254, 253, 0, 1, 0, 0, 0, 0, 0, 1, 0, 4];
    record.extend_from_slice(b"junk");
    s.handle_datagram(now, SystemTime::now(), from, &record);
    assert!(s.poll_output().is_none());
    assert_eq!(s.counters().plaintext_dropped, 2);
    assert_eq!(s.counters().sessions, 0);
}

#[test]
fn handshakes_beyond_max_handshakes_are_dropped() {
    let now = Instant::now();
    let mut s = server(DtlsLimits {
        max_handshakes: 1,
        ..DtlsLimits::default()
    });
    // Two clients get as far as the ClientHello with the cookie.
    let mut hellos = Vec::new();
    for addr in ["127.0.0.1:40006", "127.0.0.1:40007"] {
        let mut c = Client::new("dev-1", KEY, addr, now);
        let first = c.outgoing().remove(0);
        s.handle_datagram(now, SystemTime::now(), c.addr, &first);
        let Some(DtlsOutput::Transmit { data: hvr, .. }) = s.poll_output() else {
            panic!("a HelloVerifyRequest");
        };
        c.dtls.handle_packet(&hvr).unwrap();
        hellos.push((c.addr, c.outgoing().remove(0)));
    }
    for (addr, hello) in &hellos {
        s.handle_datagram(now, SystemTime::now(), *addr, hello);
    }
    assert_eq!(s.counters().handshaking, 1);
    assert_eq!(s.counters().handshakes_busy, 1);
}

/// The client configuration of dev-1, built once: building one runs dimpl's provider
/// self-tests, which take tens of milliseconds in a debug build.
fn dev1_config() -> Arc<Config> {
    static CONFIG: std::sync::OnceLock<Arc<Config>> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| client_config("dev-1", KEY)).clone()
}

/// A client at `addr` brought as far as its ClientHello with the cookie (its first
/// ClientHello answered by `s` at `now`); returns the client and that ClientHello.
fn cookie_hello(s: &mut DtlsServer, addr: &str, now: Instant) -> (Client, Vec<u8>) {
    let mut c = Client::with_config(dev1_config(), addr, now);
    let first = c.outgoing().remove(0);
    s.handle_datagram(now, SystemTime::now(), c.addr, &first);
    let Some(DtlsOutput::Transmit { data: hvr, .. }) = s.poll_output() else {
        panic!("a HelloVerifyRequest");
    };
    c.dtls.handle_packet(&hvr).unwrap();
    let hello = c.outgoing().remove(0);
    (c, hello)
}

#[test]
fn handshakes_beyond_handshake_rate_are_dropped_and_cookies_stay_unlimited() {
    let t0 = Instant::now();
    let mut s = server(DtlsLimits {
        handshake_rate: 3,
        ..DtlsLimits::default()
    });
    let mut waiting: Vec<(Client, Vec<u8>)> = (0..8)
        .map(|i| cookie_hello(&mut s, &format!("127.0.1.{i}:5000"), t0))
        .collect();
    // A burst of one second's worth passes at once, the rest is dropped.
    for (c, hello) in &waiting {
        s.handle_datagram(t0, SystemTime::now(), c.addr, hello);
    }
    let c = s.counters();
    assert_eq!((c.handshaking, c.handshakes_rate_limited), (3, 5));
    while s.poll_output().is_some() {}
    waiting.drain(..3);

    // With the bucket empty, ClientHellos without a cookie are still all answered.
    for i in 0..50 {
        let _ = cookie_hello(&mut s, &format!("127.0.2.{i}:5000"), t0);
    }
    assert_eq!(s.counters().cookies_sent, 8 + 50);

    // One token per third of a second: just before it, nothing; at it, one.
    let third = Duration::from_nanos(333_333_334);
    let (c, hello) = &waiting[0];
    s.handle_datagram(t0 + third - Duration::from_nanos(2), SystemTime::now(), c.addr, hello);
    assert_eq!(s.counters().handshakes_rate_limited, 6);
    s.handle_datagram(t0 + third, SystemTime::now(), c.addr, hello);
    assert_eq!(s.counters().handshaking, 4);
    let (c, hello) = &waiting[1];
    s.handle_datagram(t0 + third, SystemTime::now(), c.addr, hello);
    assert_eq!(s.counters().handshakes_rate_limited, 7);

    // A long pause refills no more than the burst.
    let later = t0 + Duration::from_secs(10);
    for (c, hello) in &waiting[1..] {
        s.handle_datagram(later, SystemTime::now(), c.addr, hello);
    }
    let c = s.counters();
    assert_eq!((c.handshaking, c.handshakes_rate_limited), (7, 8));
}

#[test]
fn the_token_bucket_refills_exactly_in_virtual_time() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(500);
    assert_eq!((0..600).filter(|_| b.take(t0)).count(), 500);
    // 2 ms at 500/s is one token, 1 s is the whole burst and never more.
    assert!(b.take(t0 + Duration::from_millis(2)));
    assert!(!b.take(t0 + Duration::from_millis(2)));
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!((0..600).filter(|_| b.take(t1)).count(), 500);
    // Time going backwards refills nothing.
    assert!(!b.take(t0));
}

#[test]
fn a_cookie_stays_good_across_one_key_rotation_but_not_two() {
    let period = Duration::from_secs(60);
    let limits = DtlsLimits {
        cookie_rotation: period,
        ..DtlsLimits::default()
    };
    let t0 = Instant::now();
    let mut s = server(limits);
    let (mut a, hello_a) = cookie_hello(&mut s, "127.0.3.1:5000", t0);
    let (_b, hello_b) = cookie_hello(&mut s, "127.0.3.2:5000", t0);

    // One rotation later (at this datagram), a cookie of the key before is still good:
    // the handshake goes on to completion.
    let t1 = t0 + period + Duration::from_secs(1);
    s.handle_datagram(t1, SystemTime::now(), a.addr, &hello_a);
    assert_eq!((s.counters().handshaking, s.counters().cookies_sent), (1, 2));
    while let Some(o) = s.poll_output() {
        if let DtlsOutput::Transmit { data, .. } = o {
            let _ = a.dtls.handle_packet(&data);
        }
    }
    pump(&mut s, &mut a, t1);
    assert!(a.connected);

    // A second rotation: the first key's cookies are refused and answered anew, and
    // nothing is kept for them.
    let t2 = t1 + period;
    s.handle_datagram(t2, SystemTime::now(), "127.0.3.2:5000".parse().unwrap(), &hello_b);
    let c = s.counters();
    assert_eq!((c.handshaking, c.sessions, c.cookies_sent), (0, 1, 3));
    let Some(DtlsOutput::Transmit { data, .. }) = s.poll_output() else {
        panic!("a new HelloVerifyRequest");
    };
    assert_eq!(data[13], HELLO_VERIFY_REQUEST);
    assert!(s.poll_output().is_none());

    // A fresh cookie after the rotations works.
    let (mut d, hello_d) = cookie_hello(&mut s, "127.0.3.4:5000", t2);
    s.handle_datagram(t2, SystemTime::now(), d.addr, &hello_d);
    while let Some(o) = s.poll_output() {
        if let DtlsOutput::Transmit { data, .. } = o {
            let _ = d.dtls.handle_packet(&data);
        }
    }
    pump(&mut s, &mut d, t2);
    assert!(d.connected);
}

#[test]
fn after_two_quiet_periods_both_cookie_keys_are_new() {
    let period = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut s = server(DtlsLimits {
        cookie_rotation: period,
        ..DtlsLimits::default()
    });
    let (_a, hello) = cookie_hello(&mut s, "127.0.3.5:5000", t0);
    // No datagram for two periods: the rotation at this one drops the old key too.
    s.handle_datagram(
        t0 + period * 2,
        SystemTime::now(),
        "127.0.3.5:5000".parse().unwrap(),
        &hello,
    );
    let c = s.counters();
    assert_eq!((c.sessions, c.cookies_sent), (0, 2));
    // Just short of one period, the same cookie would have been good.
    let mut s = server(DtlsLimits {
        cookie_rotation: period,
        ..DtlsLimits::default()
    });
    let (_a, hello) = cookie_hello(&mut s, "127.0.3.5:5000", t0);
    s.handle_datagram(
        t0 + period - Duration::from_nanos(1),
        SystemTime::now(),
        "127.0.3.5:5000".parse().unwrap(),
        &hello,
    );
    assert_eq!(s.counters().handshaking, 1);
}

#[test]
fn the_timers_of_many_sessions_fire_in_deadline_order() {
    let n = 1000u32;
    let idle = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut s = server(DtlsLimits {
        idle_timeout: idle,
        max_handshakes: 1024,
        ..DtlsLimits::default()
    });
    // Session i is established (last heard) at t0 + 10 ms * i, but in a shuffled order
    // of addresses, so that neither the address nor the insertion order is the
    // deadline order.
    let mut established = HashMap::new();
    for i in 0..n {
        let k = (i * 7919) % n;
        let addr = format!("127.0.{}.{}:5000", k / 200, k % 200 + 1);
        let at = t0 + Duration::from_millis(10 * u64::from(i));
        let mut c = Client::with_config(dev1_config(), &addr, at);
        pump(&mut s, &mut c, at);
        assert!(c.connected);
        established.insert(c.addr, (i, at));
    }
    assert_eq!(s.counters().sessions, u64::from(n));
    let mut closed = Vec::new();
    let mut last = t0;
    let mut turns = 0;
    while let Some(t) = s.poll_timeout() {
        assert!(t >= last, "deadlines come in order");
        last = t;
        s.handle_timeout(t);
        while let Some(o) = s.poll_output() {
            let DtlsOutput::Transmit { to, .. } = o else {
                panic!("only records to send");
            };
            let (i, at) = established[&to];
            // A retransmission of dimpl's may come before; a close_notify comes at the
            // idle deadline exactly.
            if t >= at + idle {
                assert_eq!(t, at + idle, "session {i} closed at its deadline");
                closed.push(i);
            }
        }
        turns += 1;
        assert!(turns < 10 * n, "the timers come to an end");
    }
    assert_eq!(closed, (0..n).collect::<Vec<_>>());
    let c = s.counters();
    assert_eq!((c.sessions, c.idle_closed), (0, u64::from(n)));
}

#[test]
fn idle_sessions_are_closed_with_close_notify() {
    let now = Instant::now();
    let limits = DtlsLimits {
        idle_timeout: Duration::from_secs(30),
        ..DtlsLimits::default()
    };
    let mut s = server(limits);
    let mut c = Client::new("dev-1", KEY, "127.0.0.1:40008", now);
    pump(&mut s, &mut c, now);
    assert!(c.connected);
    let later = now + Duration::from_secs(31);
    assert!(s.poll_timeout().is_some_and(|t| t <= later));
    s.handle_timeout(later);
    c.dtls.handle_timeout(later).unwrap();
    pump(&mut s, &mut c, later);
    assert!(c.closed);
    assert_eq!(s.counters().idle_closed, 1);
    assert_eq!(s.counters().sessions, 0);
}

#[test]
fn a_new_key_source_applies_to_new_handshakes() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::new("dev-1", KEY, "127.0.0.1:40009", now);
    pump(&mut s, &mut c, now);
    assert!(c.connected);
    s.set_source(Arc::new(Keys(HashMap::from([("dev-3".to_string(), KEY.to_vec())]))));
    // The established session goes on.
    c.dtls.send_application_data(b"still").unwrap();
    assert_eq!(pump(&mut s, &mut c, now).len(), 1);
    // A new handshake with the removed identity fails; the new one works.
    let mut old = Client::new("dev-1", KEY, "127.0.0.1:40010", now);
    pump(&mut s, &mut old, now);
    assert!(!old.connected);
    let mut new = Client::new("dev-3", KEY, "127.0.0.1:40011", now);
    pump(&mut s, &mut new, now);
    assert!(new.connected);
}

// ---------------------------------------------------------------------------------------
// Certificates: the throwaway P-256 CA and client certificate of the broker TLS tests
// (valid 2026-12-02 to 2126), the client certificate doubling as the server's.
// ---------------------------------------------------------------------------------------

fn testdata(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/broker/testdata")
        .join(name)
}

fn certs() -> Arc<DtlsCertificates> {
    let pem = testdata("client.pem");
    let key = testdata("client.key");
    let rule = super::super::dtls_cert::IdentityRule::CommonName;
    Arc::new(DtlsCertificates::load(&pem, &key, &testdata("ca.pem"), rule).unwrap())
}

fn cert_server() -> DtlsServer {
    server(DtlsLimits::default()).with_certificates(Some(certs())).unwrap()
}

impl Client {
    /// A client offering the ECDHE-ECDSA suite with the test client certificate.
    fn with_cert(addr: &str, now: Instant) -> Self {
        use rustls::pki_types::pem::PemObject;
        let cert = rustls::pki_types::CertificateDer::from_pem_file(testdata("client.pem")).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(testdata("client.key")).unwrap();
        let config = Config::builder()
            .dtls12_cipher_suites(&[Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256])
            .dtls13_cipher_suites(&[])
            .build()
            .unwrap();
        let certificate = DtlsCertificate {
            certificate: cert.to_vec(),
            private_key: key.secret_der().to_vec(),
        };
        let mut dtls = Dtls::new_12(Arc::new(config), certificate, now);
        dtls.set_active(true);
        dtls.handle_timeout(now).unwrap();
        Client {
            dtls,
            addr: addr.parse().unwrap(),
            connected: false,
            received: Vec::new(),
            closed: false,
        }
    }
}

/// [`pump`] with the wall-clock time `wall` given to the server.
fn pump_at(server: &mut DtlsServer, client: &mut Client, now: Instant, wall: SystemTime) {
    for _ in 0..20 {
        let sent = client.outgoing();
        for d in &sent {
            server.handle_datagram(now, wall, client.addr, d);
        }
        let mut any = !sent.is_empty();
        while let Some(o) = server.poll_output() {
            any = true;
            if let DtlsOutput::Transmit { data, .. } = o {
                let _ = client.dtls.handle_packet(&data);
            }
        }
        if !any {
            break;
        }
    }
    let _ = client.outgoing();
}

/// Seconds after the epoch as a wall-clock time.
fn wall(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2027-01-01: inside the test certificates' validity.
const VALID: u64 = 1_798_761_600;

#[test]
fn a_certificate_client_gets_its_cn_as_identity_and_exchanges_datagrams() {
    let now = Instant::now();
    let mut s = cert_server();
    let mut c = Client::with_cert("127.0.0.1:40010", now);
    pump_at(&mut s, &mut c, now, wall(VALID));
    assert!(c.connected);
    assert_eq!(s.identity(&c.addr).map(|i| &**i), Some("cert:gateway unit-test client"));
    let counters = s.counters();
    assert_eq!(
        (counters.cookies_sent, counters.handshakes_ok, counters.certs_rejected),
        (1, 1, 0)
    );
    c.dtls.send_application_data(b"\x05\x04ping").unwrap();
    let got = pump(&mut s, &mut c, now);
    assert_eq!(
        got,
        vec![(Arc::from("cert:gateway unit-test client"), b"\x05\x04ping".to_vec())]
    );
}

#[test]
fn a_certificate_outside_its_validity_at_the_given_wall_time_is_refused() {
    // 2020 (before notBefore) and 2127 (after notAfter): the time is the caller's.
    for secs in [1_577_836_800, 4_954_435_200] {
        let now = Instant::now();
        let mut s = cert_server();
        let mut c = Client::with_cert("127.0.0.1:40011", now);
        pump_at(&mut s, &mut c, now, wall(secs));
        assert!(!c.connected, "the server's Finished was not sent");
        let counters = s.counters();
        assert_eq!(
            (counters.certs_rejected, counters.handshakes_failed, counters.sessions),
            (1, 1, 0)
        );
    }
}

#[test]
fn a_psk_client_still_handshakes_on_a_listener_with_certificates() {
    let now = Instant::now();
    let mut s = cert_server();
    let mut c = Client::new("dev-1", KEY, "127.0.0.1:40012", now);
    pump_at(&mut s, &mut c, now, wall(VALID));
    assert!(c.connected);
    assert_eq!(s.identity(&c.addr).map(|i| &**i), Some("dev-1"));
}

#[test]
fn a_certificate_client_on_a_psk_only_listener_makes_no_session() {
    let now = Instant::now();
    let mut s = server(DtlsLimits::default());
    let mut c = Client::with_cert("127.0.0.1:40013", now);
    pump_at(&mut s, &mut c, now, wall(VALID));
    assert!(!c.connected);
    assert_eq!((s.counters().handshakes_failed, s.counters().sessions), (1, 0));
}

#[test]
fn the_key_must_be_the_certificates() {
    let rule = super::super::dtls_cert::IdentityRule::CommonName;
    let err = DtlsCertificates::load(
        &testdata("client.pem"),
        &testdata("other.key"),
        &testdata("ca.pem"),
        rule,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("dtls.key: "), "{err}");
}

#[test]
fn certificates_read_again_apply_to_new_handshakes_and_leave_sessions_alone() {
    let now = Instant::now();
    let mut s = cert_server();
    let mut before = Client::with_cert("127.0.0.1:40030", now);
    pump_at(&mut s, &mut before, now, wall(VALID));
    assert!(before.connected);
    assert!(!s.set_certificates(certs()), "the same files: no change");
    // Rotated to a device CA that did not sign the test client's certificate (the
    // client certificate itself, which is no CA).
    let rule = super::super::dtls_cert::IdentityRule::CommonName;
    let other_ca = DtlsCertificates::load(
        &testdata("client.pem"),
        &testdata("client.key"),
        &testdata("client.pem"),
        rule,
    )
    .unwrap();
    assert!(s.set_certificates(Arc::new(other_ca)));
    let mut after = Client::with_cert("127.0.0.1:40031", now);
    pump_at(&mut s, &mut after, now, wall(VALID));
    assert!(!after.connected, "verified against the new CA");
    assert!(s.counters().certs_rejected >= 1);
    assert!(
        s.identity(&before.addr).is_some(),
        "the established session keeps going"
    );
    // And back: the next handshake is accepted again.
    assert!(s.set_certificates(certs()));
    let mut again = Client::with_cert("127.0.0.1:40032", now);
    pump_at(&mut s, &mut again, now, wall(VALID));
    assert!(again.connected);
    // A listener without certificates is not given any by a reload.
    let mut psk_only = server(DtlsLimits::default());
    assert!(!psk_only.set_certificates(certs()));
}
