//! The client engine over a mocked `embedded-hal-nb` serial port: the exact octets on the
//! wire, in the exact order the adapter reads and writes them.
//!
//! MQTT-SN messages are written by hand from the layouts of the MQTT-SN v1.2
//! specification (section 5.4). The COBS frames of the connect and QoS 1 scenarios are
//! written out in full (CRC-16/CCITT-FALSE and COBS computed by hand, i.e. independently
//! of the crate); the others are built from hand-written messages with `encode_frame`,
//! whose own tests pin the framing.
#![cfg(feature = "uart")]
#![allow(clippy::unwrap_used)]

use embedded_hal_mock::eh1::serial::{Mock, Transaction};
use sn_codec::client::uart::embedded_hal_nb::nb;
use sn_codec::client::uart::embedded_hal_nb::serial::ErrorKind;
use sn_codec::client::uart::{Incoming, UartClient, UartError};
use sn_codec::client::{Client, Config, Event, State};
use sn_codec::framing::{encode_frame, FramingKind};
use sn_codec::{QoS, TopicFilter, TopicRef};

type Dev = UartClient<'static, Mock<u8>, 4, 64, 64, 64>;
type Engine = Client<'static, 4, 64, 64>;

fn bytes(hex: &str) -> Vec<u8> {
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The COBS frame of a message given in hex.
fn cobs(message: &str) -> Vec<u8> {
    framed(FramingKind::Cobs, message)
}

fn framed(kind: FramingKind, message: &str) -> Vec<u8> {
    let m = bytes(message);
    let mut out = [0u8; 300];
    let n = encode_frame(kind, &m, &mut out).unwrap();
    out[..n].to_vec()
}

/// The port has nothing more to read.
fn idle() -> Transaction<u8> {
    Transaction::read_error(nb::Error::WouldBlock)
}

/// What the callback was given, owned.
#[derive(Debug, PartialEq)]
enum Got {
    Msg {
        topic: TopicRef,
        /// The name the engine resolves the topic to, in the callback.
        name: Option<String>,
        payload: Vec<u8>,
        qos: QoS,
        msg_id: u16,
    },
    Ev(Event),
}

fn record(client: &mut Engine, incoming: Incoming<'_>) -> Got {
    match incoming {
        Incoming::Message(m) => Got::Msg {
            topic: m.topic,
            name: client.topic_name(&m.topic).map(str::to_owned),
            payload: m.payload.to_vec(),
            qos: m.qos,
            msg_id: m.msg_id,
        },
        Incoming::Event(e) => Got::Ev(e),
    }
}

/// A test bench: the adapter and a handle on its mock port.
struct Bench {
    dev: Dev,
    port: Mock<u8>,
}

impl Bench {
    fn new(kind: FramingKind) -> Self {
        let port = Mock::new(&[]);
        let config = Config {
            t_retry: 1000,
            n_retry: 3,
            ..Config::new("dev1")
        };
        let mut bench = Bench {
            dev: UartClient::new(port.clone(), kind, config),
            port,
        };
        bench.port.done();
        bench
    }

    /// One `poll(now)` that must perform exactly `expect` on the port, in order.
    fn poll(&mut self, now: u64, expect: &[Transaction<u8>]) -> Vec<Got> {
        self.poll_with(now, expect, |_, _| {})
    }

    /// Like [`Bench::poll`], calling `react` from the callback after recording.
    fn poll_with(
        &mut self,
        now: u64,
        expect: &[Transaction<u8>],
        mut react: impl FnMut(&mut Engine, &Got),
    ) -> Vec<Got> {
        self.port.update_expectations(expect);
        let mut got = Vec::new();
        self.dev
            .poll(now, |client, incoming| {
                let g = record(client, incoming);
                react(client, &g);
                got.push(g);
            })
            .unwrap();
        self.port.done();
        got
    }

    /// Connects at t=0: CONNECT out, CONNACK in.
    fn connected(kind: FramingKind) -> Self {
        let mut b = Bench::new(kind);
        b.dev.client_mut().connect(0).unwrap();
        let connect = framed(kind, "0a 04 04 01 00 3c 64 65 76 31");
        assert!(b.poll(0, &[idle(), Transaction::write_many(connect)]).is_empty());
        let connack = framed(kind, "03 05 00");
        assert_eq!(
            b.poll(0, &[Transaction::read_many(connack), idle()]),
            [Got::Ev(Event::Connected)]
        );
        b
    }
}

#[test]
fn connect_exact_frames() {
    // CONNECT: length 0A, type 04, flags 04 (clean session), protocol 01, keep-alive
    // 003C (60 s), client id "dev1". CRC-16 BEEB. COBS: the single zero (keep-alive high
    // octet) splits it into blocks of 4 and 7 octets.
    let connect = bytes("00 05 0a 04 04 01 08 3c 64 65 76 31 be eb 00");
    assert_eq!(connect, cobs("0a 04 04 01 00 3c 64 65 76 31"));
    // CONNACK accepted: 03 05 00, CRC 6A39.
    let connack = bytes("00 03 03 05 03 6a 39 00");
    assert_eq!(connack, cobs("03 05 00"));

    let mut b = Bench::new(FramingKind::Cobs);
    b.dev.client_mut().connect(0).unwrap();
    // Nothing to read yet; the CONNECT goes out, octet by octet.
    assert!(b.poll(0, &[idle(), Transaction::write_many(&connect)]).is_empty());
    assert_eq!(b.dev.client().state(), State::Connecting);
    // The CONNACK arrives in two bursts, across two polls.
    assert!(b.poll(30, &[Transaction::read_many(&connack[..4]), idle()]).is_empty());
    assert_eq!(
        b.poll(31, &[Transaction::read_many(&connack[4..]), idle()]),
        [Got::Ev(Event::Connected)]
    );
    assert_eq!(b.dev.client().state(), State::Active);
    assert_eq!(b.dev.stats().frames_sent, 1);
    assert_eq!(b.dev.frame_stats().frames, 1);
    assert!(!b.dev.has_pending_output());
    // The next deadline is the keep-alive: 60 s after the last exchange.
    assert_eq!(b.dev.poll_timeout(), Some(60_000));
}

#[test]
fn publish_qos1_lost_puback_is_retried_with_dup() {
    // PUBLISH QoS 1 to short topic "tp", msg id 1, "21.5": flags 22 (QoS 1, short topic).
    let publish = bytes("00 06 0b 0c 22 74 70 08 01 32 31 2e 35 69 c4 00");
    assert_eq!(publish, cobs("0b 0c 22 74 70 00 01 32 31 2e 35"));
    // The retransmission: flags A2 (DUP set), so a different CRC.
    let retry = bytes("00 06 0b 0c a2 74 70 08 01 32 31 2e 35 d6 76 00");
    assert_eq!(retry, cobs("0b 0c a2 74 70 00 01 32 31 2e 35"));
    // PUBACK: length 07, type 0D, topic 7470, msg id 0001, accepted.
    let puback = bytes("00 05 07 0d 74 70 02 01 03 43 0d 00");
    assert_eq!(puback, cobs("07 0d 74 70 00 01 00"));

    let mut b = Bench::connected(FramingKind::Cobs);
    let id = b
        .dev
        .client_mut()
        .publish(100, TopicRef::Short(*b"tp"), b"21.5", QoS::AtLeastOnce, false)
        .unwrap();
    assert_eq!(id, 1);
    assert!(b.poll(100, &[idle(), Transaction::write_many(&publish)]).is_empty());

    // The PUBACK is damaged on the line (one bit of its CRC flipped): dropped, no event.
    let mut damaged = puback.clone();
    damaged[9] ^= 0x01;
    assert!(b.poll(150, &[Transaction::read_many(&damaged), idle()]).is_empty());
    assert_eq!(b.dev.frame_stats().dropped_crc, 1);
    assert!(b.dev.client().is_busy());

    // Tretry (1 s) after the PUBLISH, not before, it is sent again with DUP set.
    assert_eq!(b.dev.poll_timeout(), Some(1100));
    assert!(b.poll(1099, &[idle()]).is_empty());
    assert!(b.poll(1100, &[idle(), Transaction::write_many(&retry)]).is_empty());

    // This time the PUBACK arrives.
    assert_eq!(
        b.poll(1150, &[Transaction::read_many(&puback), idle()]),
        [Got::Ev(Event::Published { msg_id: 1 })]
    );
    assert!(!b.dev.client().is_busy());
    // Nothing more is retransmitted.
    assert!(b.poll(2100, &[idle()]).is_empty());
    assert!(b.poll(5000, &[idle()]).is_empty());
    assert_eq!(b.dev.stats().frames_sent, 3);
}

#[test]
fn subscribe_and_receive() {
    let mut b = Bench::connected(FramingKind::Cobs);
    let id = b
        .dev
        .client_mut()
        .subscribe(10, TopicFilter::Name("sensors/+"), QoS::AtLeastOnce)
        .unwrap();
    assert_eq!(id, 1);
    // SUBSCRIBE: length 0E, type 12, flags 20 (QoS 1, topic name), msg id 0001,
    // "sensors/+".
    let subscribe = cobs("0e 12 20 00 01 73 65 6e 73 6f 72 73 2f 2b");
    assert!(b.poll(10, &[idle(), Transaction::write_many(subscribe)]).is_empty());

    // SUBACK: length 08, type 13, flags 20 (granted QoS 1), topic id 0000 (wildcard),
    // msg id 0001, accepted.
    let suback = cobs("08 13 20 00 00 00 01 00");
    assert_eq!(
        b.poll(20, &[Transaction::read_many(suback), idle()]),
        [Got::Ev(Event::Subscribed {
            msg_id: 1,
            topic_id: 0,
            qos: QoS::AtLeastOnce
        })]
    );

    // In one burst: the gateway registers "sensors/t" as topic 5 (REGISTER: length 0F,
    // type 0A, topic id 0005, msg id 0007, name), then publishes QoS 1 on it (flags 20,
    // topic 0005, msg id 0008, "22.0"), then QoS 0 on short topic "cm" (flags 02).
    let mut burst = cobs("0f 0a 00 05 00 07 73 65 6e 73 6f 72 73 2f 74");
    burst.extend(cobs("0b 0c 20 00 05 00 08 32 32 2e 30"));
    burst.extend(cobs("09 0c 02 63 6d 00 00 6f 6e"));
    // Answers, in order: REGACK (length 07, type 0B, topic 0005, msg id 0007, accepted)
    // and PUBACK (length 07, type 0D, topic 0005, msg id 0008, accepted).
    let mut answers = cobs("07 0b 00 05 00 07 00");
    answers.extend(cobs("07 0d 00 05 00 08 00"));
    let got = b.poll(
        30,
        &[Transaction::read_many(burst), idle(), Transaction::write_many(answers)],
    );
    assert_eq!(
        got,
        [
            Got::Ev(Event::GatewayRegistered { topic_id: 5 }),
            Got::Msg {
                topic: TopicRef::Normal(5),
                name: Some("sensors/t".into()),
                payload: b"22.0".to_vec(),
                qos: QoS::AtLeastOnce,
                msg_id: 8,
            },
            Got::Msg {
                topic: TopicRef::Short(*b"cm"),
                name: Some("cm".into()),
                payload: b"on".to_vec(),
                qos: QoS::AtMostOnce,
                msg_id: 0,
            },
        ]
    );
    assert_eq!(b.dev.frame_stats().frames, 5);
    assert_eq!(b.dev.stats().frames_sent, 4);
}

#[test]
fn sleep_and_wake() {
    let mut b = Bench::connected(FramingKind::Cobs);
    b.dev.client_mut().sleep(0, 60).unwrap();
    // DISCONNECT with a duration: length 04, type 18, 003C (60 s).
    assert!(b
        .poll(0, &[idle(), Transaction::write_many(cobs("04 18 00 3c"))])
        .is_empty());
    // Before powering the UART down: everything written, then the port flushed.
    b.port.update_expectations(&[Transaction::flush()]);
    b.dev.flush().unwrap();
    b.port.done();
    // The gateway's DISCONNECT: 02 18.
    assert_eq!(
        b.poll(50, &[Transaction::read_many(cobs("02 18")), idle()]),
        [Got::Ev(Event::Asleep)]
    );
    assert_eq!(b.dev.client().state(), State::Asleep);

    // The wake-up is due min(Tretry, 60 s / 2) = 1 s before the 60 s are over.
    assert_eq!(b.dev.poll_timeout(), Some(50 + 60_000 - 1000));
    assert!(b.poll(59_049, &[idle()]).is_empty());
    // The callback wakes the client at once; its PINGREQ (length 06, type 16, client id
    // "dev1") goes out in the same poll.
    let ping = cobs("06 16 64 65 76 31");
    let got = b.poll_with(59_050, &[idle(), Transaction::write_many(ping)], |client, g| {
        if *g == Got::Ev(Event::WakeUpDue) {
            client.wake(59_050).unwrap();
        }
    });
    assert_eq!(got, [Got::Ev(Event::WakeUpDue)]);
    assert_eq!(b.dev.client().state(), State::Awake);

    // The gateway delivers what it buffered (PUBLISH QoS 0 on short topic "cm", "on"),
    // then PINGRESP (02 17): the client is asleep again.
    let mut burst = cobs("09 0c 02 63 6d 00 00 6f 6e");
    burst.extend(cobs("02 17"));
    assert_eq!(
        b.poll(59_100, &[Transaction::read_many(burst), idle()]),
        [
            Got::Msg {
                topic: TopicRef::Short(*b"cm"),
                name: Some("cm".into()),
                payload: b"on".to_vec(),
                qos: QoS::AtMostOnce,
                msg_id: 0,
            },
            Got::Ev(Event::Asleep),
        ]
    );
    assert_eq!(b.dev.client().state(), State::Asleep);
    assert_eq!(b.dev.poll_timeout(), Some(59_100 + 60_000 - 1000));

    // Waking for good: CONNECT without the clean session flag (flags 00), CONNACK.
    b.dev.client_mut().connect(60_000).unwrap();
    assert!(b
        .poll(
            60_000,
            &[idle(), Transaction::write_many(cobs("0a 04 00 01 00 3c 64 65 76 31"))]
        )
        .is_empty());
    assert_eq!(
        b.poll(60_010, &[Transaction::read_many(cobs("03 05 00")), idle()]),
        [Got::Ev(Event::Connected)]
    );
}

#[test]
fn raw_framing_sends_and_receives_bare_messages() {
    let mut b = Bench::connected(FramingKind::Raw);
    b.dev
        .client_mut()
        .publish(5, TopicRef::Short(*b"tp"), b"1", QoS::AtMostOnce, false)
        .unwrap();
    b.dev
        .client_mut()
        .publish(5, TopicRef::Short(*b"tp"), b"2", QoS::AtMostOnce, false)
        .unwrap();
    // Two PUBLISH QoS 0 (flags 02), back to back, nothing added.
    assert!(b
        .poll(
            5,
            &[
                idle(),
                Transaction::write_many(bytes("08 0c 02 74 70 00 00 31 08 0c 02 74 70 00 00 32")),
            ]
        )
        .is_empty());
    // A PUBLISH from the gateway, preceded by line noise (00 is never a length, 03 FF
    // announces an unknown type).
    assert_eq!(
        b.poll(
            10,
            &[
                Transaction::read_many(bytes("00 03 ff 08 0c 02 63 6d 00 00 78")),
                idle()
            ]
        ),
        [Got::Msg {
            topic: TopicRef::Short(*b"cm"),
            name: Some("cm".into()),
            payload: b"x".to_vec(),
            qos: QoS::AtMostOnce,
            msg_id: 0,
        }]
    );
    assert_eq!(b.dev.frame_stats().noise_bytes, 3);
}

#[test]
fn raw_framing_forgets_a_partial_frame_after_an_idle_gap() {
    let mut b = Bench::connected(FramingKind::Raw);
    // The first 4 octets of a PUBLISH, then the sender dies.
    assert!(b
        .poll(100, &[Transaction::read_many(bytes("08 0c 02 63")), idle()])
        .is_empty());
    assert_eq!(b.dev.poll_timeout(), Some(150));
    assert!(b.poll(149, &[idle()]).is_empty());
    // 50 ms later, a complete PUBLISH: the partial one is thrown away first, so the new
    // one is not swallowed as its tail.
    assert_eq!(
        b.poll(150, &[Transaction::read_many(bytes("08 0c 02 63 6d 00 00 79")), idle()]),
        [Got::Msg {
            topic: TopicRef::Short(*b"cm"),
            name: Some("cm".into()),
            payload: b"y".to_vec(),
            qos: QoS::AtMostOnce,
            msg_id: 0,
        }]
    );
    assert_eq!(b.dev.frame_stats().dropped_malformed, 1);
}

#[test]
fn a_busy_transmitter_resumes_the_frame_at_the_next_poll() {
    let mut b = Bench::new(FramingKind::Cobs);
    b.dev.client_mut().connect(0).unwrap();
    let connect = cobs("0a 04 04 01 00 3c 64 65 76 31");
    // The port takes 5 octets, then its FIFO is full.
    assert!(b
        .poll(
            0,
            &[
                idle(),
                Transaction::write_many(&connect[..5]),
                Transaction::write_error(connect[5], nb::Error::WouldBlock),
            ]
        )
        .is_empty());
    assert!(b.dev.has_pending_output());
    assert_eq!(b.dev.stats().frames_sent, 0);
    // flush() says WouldBlock while the port is still busy...
    b.port
        .update_expectations(&[Transaction::write_error(connect[5], nb::Error::WouldBlock)]);
    assert_eq!(b.dev.flush(), Err(nb::Error::WouldBlock));
    b.port.done();
    // ... and the next poll goes on from the octet that did not go out.
    assert!(b.poll(1, &[idle(), Transaction::write_many(&connect[5..])]).is_empty());
    assert!(!b.dev.has_pending_output());
    assert_eq!(b.dev.stats().frames_sent, 1);
}

#[test]
fn serial_errors_cost_only_the_damaged_frame() {
    let mut b = Bench::connected(FramingKind::Cobs);
    let puback_frame = cobs("07 0d 74 70 00 01 00");
    b.dev
        .client_mut()
        .publish(0, TopicRef::Short(*b"tp"), b"21.5", QoS::AtLeastOnce, false)
        .unwrap();
    let publish = cobs("0b 0c 22 74 70 00 01 32 31 2e 35");

    // An overrun in the middle of a frame: reading stops, the frame is lost, writing
    // still happens, and the error is reported.
    b.port.update_expectations(&[
        Transaction::read_many(&puback_frame[..4]),
        Transaction::read_error(nb::Error::Other(ErrorKind::Overrun)),
        Transaction::write_many(&publish),
    ]);
    let mut got = Vec::new();
    let r = b.dev.poll(10, |c, i| got.push(record(c, i)));
    b.port.done();
    assert_eq!(r, Err(UartError::Read(ErrorKind::Overrun)));
    assert!(got.is_empty());
    assert_eq!(b.dev.stats().read_errors, 1);

    // The rest of the damaged frame is dropped; the next good one gets through.
    let mut input = puback_frame[4..].to_vec();
    input.extend(&puback_frame);
    assert_eq!(
        b.poll(20, &[Transaction::read_many(input), idle()]),
        [Got::Ev(Event::Published { msg_id: 1 })]
    );

    // A write error abandons the frame being written; the receiver drops the partial
    // frame at the next frame's leading 00.
    b.dev.client_mut().ping(30).unwrap();
    let ping = cobs("02 16");
    b.port.update_expectations(&[
        idle(),
        Transaction::write_many(&ping[..2]),
        Transaction::write_error(ping[2], nb::Error::Other(ErrorKind::Other)),
    ]);
    let r = b.dev.poll(30, |_, _| {});
    b.port.done();
    assert_eq!(r, Err(UartError::Write(ErrorKind::Other)));
    assert_eq!(b.dev.stats().write_errors, 1);
    assert!(!b.dev.has_pending_output());
    // The engine retransmits the PINGREQ after Tretry.
    assert!(b.poll(1030, &[idle(), Transaction::write_many(&ping)]).is_empty());
}

#[test]
fn malformed_messages_in_good_frames_are_counted() {
    let mut b = Bench::connected(FramingKind::Cobs);
    // A CONNACK without its return code: good frame, bad MQTT-SN.
    assert!(b.poll(10, &[Transaction::read_many(cobs("02 05")), idle()]).is_empty());
    assert_eq!(b.dev.stats().malformed, 1);
    assert_eq!(b.dev.frame_stats().frames, 2);
}

#[test]
fn unanswered_retransmissions_lose_the_gateway() {
    let mut b = Bench::connected(FramingKind::Cobs);
    // The gateway is lost: 3 retransmissions of a PINGREQ go unanswered.
    b.dev.client_mut().ping(0).unwrap();
    let ping = cobs("02 16");
    assert!(b.poll(0, &[idle(), Transaction::write_many(&ping)]).is_empty());
    for t in [1000, 2000, 3000] {
        assert!(b.poll(t, &[idle(), Transaction::write_many(&ping)]).is_empty());
    }
    assert_eq!(b.poll(4000, &[idle()]), [Got::Ev(Event::GatewayLost)]);
    assert_eq!(b.dev.client().state(), State::Disconnected);
}

#[test]
fn release_returns_the_port_and_the_engine() {
    let b = Bench::connected(FramingKind::Cobs);
    assert_eq!(b.dev.framing(), FramingKind::Cobs);
    let (_port, client) = b.dev.release();
    assert_eq!(client.state(), State::Active);
}

/// Prints the sizes quoted in docs/firmware-client.md:
/// `cargo test -p sn-codec --features uart --test uart sizes -- --nocapture`.
#[test]
fn sizes() {
    use core::mem::size_of;
    use sn_codec::client::uart::embedded_hal_nb::serial::{ErrorType, Read, Write};

    /// A port with no state, like a HAL's UART handle.
    struct Port;
    impl ErrorType for Port {
        type Error = ErrorKind;
    }
    impl Read<u8> for Port {
        fn read(&mut self) -> nb::Result<u8, ErrorKind> {
            Err(nb::Error::WouldBlock)
        }
    }
    impl Write<u8> for Port {
        fn write(&mut self, _: u8) -> nb::Result<(), ErrorKind> {
            Ok(())
        }
        fn flush(&mut self) -> nb::Result<(), ErrorKind> {
            Ok(())
        }
    }
    let small = size_of::<UartClient<'static, Port, 4, 64, 64, 64>>();
    let default = size_of::<UartClient<'static, Port>>();
    let large = size_of::<UartClient<'static, Port, 16, 256, 256, 256>>();
    let engine = size_of::<Client<'static>>();
    println!("UartClient<Port, 4, 64, 64, 64>: {small}");
    println!("UartClient<Port> (8, 128, 128, 128): {default}");
    println!("UartClient<Port, 16, 256, 256, 256>: {large}");
    println!("Client<'static> alone: {engine}");
    // The adapter adds its two buffers (RX, TX) and under 160 octets of state (decoder
    // state and counters, the frame being written, its own counters) to the engine.
    println!(
        "adapter state beyond the engine and buffers: {}",
        default - engine - 256
    );
    assert!(default - engine - 256 < 160);
}
