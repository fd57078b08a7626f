//! Codec micro-benchmarks: decode and encode of a small PUBLISH, a CONNECT and a REGISTER.
//!
//! Run with `cargo bench -p sn-codec -j2`.
#![allow(clippy::unwrap_used)]

use divan::{black_box, Bencher};
use sn_codec::{Connect, Packet, Publish, QoS, Register, TopicRef};

fn main() {
    divan::main();
}

/// PUBLISH, QoS 1, normal topic id, 10-octet payload: 17 octets on the wire.
fn publish() -> Packet<'static> {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicRef::Normal(0x0010),
        msg_id: 0x1234,
        data: b"0123456789",
    })
}

/// CONNECT with clean session and a 12-octet client id: 18 octets.
fn connect() -> Packet<'static> {
    Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id: "sensor-00042",
    })
}

/// REGISTER of a 20-octet topic name: 26 octets.
fn register() -> Packet<'static> {
    Packet::Register(Register {
        topic_id: 0,
        msg_id: 7,
        topic_name: "building/3/room/12/t",
    })
}

fn encoded(p: Packet<'static>) -> Vec<u8> {
    let mut buf = vec![0u8; p.encoded_len()];
    p.encode(&mut buf).unwrap();
    buf
}

fn bench_decode(bencher: Bencher, p: Packet<'static>) {
    let bytes = encoded(p);
    bencher.bench_local(|| Packet::decode(black_box(&bytes[..])).unwrap());
}

fn bench_encode(bencher: Bencher, p: Packet<'static>) {
    let mut buf = [0u8; 64];
    bencher.bench_local(|| black_box(&p).encode(black_box(&mut buf[..])).unwrap());
}

#[divan::bench]
fn decode_publish(bencher: Bencher) {
    bench_decode(bencher, publish());
}

#[divan::bench]
fn encode_publish(bencher: Bencher) {
    bench_encode(bencher, publish());
}

#[divan::bench]
fn decode_connect(bencher: Bencher) {
    bench_decode(bencher, connect());
}

#[divan::bench]
fn encode_connect(bencher: Bencher) {
    bench_encode(bencher, connect());
}

#[divan::bench]
fn decode_register(bencher: Bencher) {
    bench_decode(bencher, register());
}

#[divan::bench]
fn encode_register(bencher: Bencher) {
    bench_encode(bencher, register());
}
