//! Tests of the serial framings (`sn_codec::framing`).

use proptest::prelude::*;
use sn_codec::framing::{crc16, encode_frame, max_encoded_len, FrameDecoder, FrameStats, FramingKind};
use sn_codec::Error;

// ---- helpers -------------------------------------------------------------------------

/// The known MQTT-SN message types (spec 5.2.2, table 3).
const KNOWN_TYPES: &[u8] = &[
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x12, 0x13, 0x14,
    0x15, 0x16, 0x17, 0x18, 0x1A, 0x1B, 0x1C, 0x1D, 0xFE,
];

/// The known types of messages whose Length covers the whole message: all but the
/// forwarder encapsulation 0xFE, whose Length covers its header only (spec 5.5).
const PLAIN_TYPES: &[u8] = &[
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x12, 0x13, 0x14,
    0x15, 0x16, 0x17, 0x18, 0x1A, 0x1B, 0x1C, 0x1D,
];

const PINGREQ: [u8; 2] = [0x02, 0x16];
/// PUBLISH_HI from wireless node 0xABCD, through a forwarder (spec 5.5).
const ENCAPSULATED_HI: [u8; 14] = [
    0x05, 0xFE, 0x00, 0xAB, 0xCD, 0x09, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00, b'h', b'i',
];
/// PUBLISH, QoS 0, normal topic id 0x0001, msg id 0, payload "hi".
const PUBLISH_HI: [u8; 9] = [0x09, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00, b'h', b'i'];
/// PUBLISH, QoS 1, normal topic id 0x0001, msg id 0x1234, payload "21.5".
const PUBLISH_Q1: [u8; 11] = [0x0B, 0x0C, 0x20, 0x00, 0x01, 0x12, 0x34, b'2', b'1', b'.', b'5'];

fn frame(kind: FramingKind, message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; max_encoded_len(kind, message.len())];
    let n = encode_frame(kind, message, &mut out).expect("max_encoded_len is enough");
    out.truncate(n);
    out
}

fn frames(kind: FramingKind, messages: &[Vec<u8>]) -> Vec<u8> {
    messages.iter().flat_map(|m| frame(kind, m)).collect()
}

/// Feeds `bytes` in chunks of the given sizes (cycled; 0 is treated as 1).
fn decode_chunked<const N: usize>(dec: &mut FrameDecoder<N>, bytes: &[u8], chunks: &[usize]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        dec.feed(chunk, |f| got.push(f.to_vec()));
        rest = tail;
    }
    got
}

fn decode<const N: usize>(kind: FramingKind, bytes: &[u8]) -> (Vec<Vec<u8>>, FrameStats) {
    let mut dec = FrameDecoder::<N>::new(kind);
    let got = decode_chunked(&mut dec, bytes, &[1]);
    (got, dec.stats())
}

/// A valid-looking MQTT-SN message of `total` octets (1- or 3-octet length header).
fn message(total: usize, msg_type: u8, fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut m = if total >= 256 {
        let len = u16::try_from(total).expect("test lengths fit");
        let [hi, lo] = len.to_be_bytes();
        vec![0x01, hi, lo, msg_type]
    } else {
        let len = u8::try_from(total).expect("test lengths fit");
        vec![len, msg_type]
    };
    let header = m.len();
    m.extend((header..total).map(fill));
    m
}

/// A small deterministic PRNG (xorshift64*), so that the corruption tests are exact and
/// reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// A mix of realistic messages, short and long, with and without zeros and long runs of
/// non-zero octets (the 254-octet COBS block boundary).
fn sample_messages() -> Vec<Vec<u8>> {
    let mut v = vec![PINGREQ.to_vec(), PUBLISH_HI.to_vec(), PUBLISH_Q1.to_vec()];
    for (i, &t) in PLAIN_TYPES.iter().enumerate() {
        v.push(message(2 + i * 7, t, |k| (k * 31 + i) as u8));
    }
    v.push(ENCAPSULATED_HI.to_vec());
    // A forwarder behind a forwarder, carrying a long message.
    let mut nested = vec![0x03, 0xFE, 0x01, 0x04, 0xFE, 0x00, 0x2A];
    nested.extend(message(300, 0x0C, |k| k as u8));
    v.push(nested);
    for total in [250, 251, 252, 253, 254, 255, 256, 257, 300, 508, 509, 510, 511, 700] {
        v.push(message(total, 0x0C, |_| 0xAA));
        v.push(message(total, 0x0C, |k| if k % 100 == 0 { 0 } else { 0x55 }));
    }
    v
}

/// `body` (type octet and fields) behind a length header announcing its size. A type
/// octet 0xFE is replaced by 0x0C (PUBLISH): a forwarder encapsulation's Length
/// announces its header only, not the whole message.
fn mqttsn(body: &[u8]) -> Vec<u8> {
    let mut m = if body.len() < 255 {
        vec![u8::try_from(body.len() + 1).expect("checked")]
    } else {
        let len = u16::try_from(body.len() + 3).expect("test lengths fit");
        let [hi, lo] = len.to_be_bytes();
        vec![0x01, hi, lo]
    };
    let header = m.len();
    m.extend_from_slice(body);
    if m.get(header) == Some(&0xFE) {
        m[header] = 0x0C;
    }
    m
}

fn mqttsn_strategy(max_body: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=max_body).prop_map(|b| mqttsn(&b))
}

fn raw_message_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(PLAIN_TYPES),
        prop_oneof![4 => 2usize..=255, 1 => 256usize..=600],
        prop::collection::vec(any::<u8>(), 600),
    )
        .prop_map(|(t, total, payload)| message(total, t, |k| payload[k]))
}

// ---- CRC -----------------------------------------------------------------------------

/// Bit-by-bit reference, straight from the parameters (as in docs/serial-framing.md).
fn crc16_reference(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[test]
fn crc16_check_value() {
    assert_eq!(crc16(b"123456789"), 0x29B1);
    assert_eq!(crc16(b""), 0xFFFF);
    assert_eq!(crc16(&PINGREQ), 0x099A);
    assert_eq!(crc16(&PUBLISH_HI), 0x1E44);
    const IN_CONST: u16 = crc16(b"123456789");
    assert_eq!(IN_CONST, 0x29B1);
}

proptest! {
    #[test]
    fn crc16_matches_bitwise_reference(data in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(crc16(&data), crc16_reference(&data));
        // Appending the CRC big-endian gives a zero remainder.
        let mut with_crc = data.clone();
        with_crc.extend_from_slice(&crc16(&data).to_be_bytes());
        prop_assert_eq!(crc16_reference(&with_crc), 0);
    }
}

// ---- FramingKind ---------------------------------------------------------------------

#[test]
fn framing_kind_parses_and_displays() {
    for kind in [FramingKind::Raw, FramingKind::Cobs] {
        assert_eq!(kind.to_string().parse::<FramingKind>(), Ok(kind));
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert_eq!("raw".parse(), Ok(FramingKind::Raw));
    assert_eq!("COBS".parse(), Ok(FramingKind::Cobs));
    assert!("slip".parse::<FramingKind>().is_err());
    assert!("".parse::<FramingKind>().is_err());
    assert!(" cobs".parse::<FramingKind>().is_err());
    let err = "x".parse::<FramingKind>().expect_err("not a framing");
    assert!(err.to_string().contains("cobs"));
    assert_eq!(FramingKind::default(), FramingKind::Cobs);
}

// ---- encoder -------------------------------------------------------------------------

#[test]
fn cobs_known_vectors() {
    // The worked examples of docs/serial-framing.md.
    assert_eq!(
        frame(FramingKind::Cobs, &PINGREQ),
        [0x00, 0x05, 0x02, 0x16, 0x09, 0x9A, 0x00]
    );
    assert_eq!(
        frame(FramingKind::Cobs, &PUBLISH_HI),
        [0x00, 0x03, 0x09, 0x0C, 0x01, 0x02, 0x01, 0x01, 0x05, 0x68, 0x69, 0x1E, 0x44, 0x00]
    );
    assert_eq!(
        frame(FramingKind::Cobs, &PUBLISH_Q1),
        [0x00, 0x04, 0x0B, 0x0C, 0x20, 0x0A, 0x01, 0x12, 0x34, 0x32, 0x31, 0x2E, 0x35, 0x92, 0xBF, 0x00]
    );
    assert_eq!(frame(FramingKind::Raw, &PUBLISH_HI), PUBLISH_HI);
}

#[test]
fn cobs_long_nonzero_run() {
    // 252 non-zero message octets + 2 non-zero CRC octets = one full 254-octet block,
    // closed by 0xFF and followed by an empty final block (code 0x01).
    let mut m = message(252, 0x0C, |_| 0x11);
    // Find a variant whose CRC has no zero octet so the block really is 254 long.
    let mut k = 0u8;
    while crc16(&m).to_be_bytes().contains(&0) {
        k += 1;
        m[251] = k;
    }
    let f = frame(FramingKind::Cobs, &m);
    assert_eq!(f.len(), 1 + 1 + 254 + 1 + 1);
    assert_eq!(f.len(), max_encoded_len(FramingKind::Cobs, m.len()));
    assert_eq!(f[1], 0xFF);
    assert_eq!(f[256], 0x01);
    assert!(!f[1..f.len() - 1].contains(&0));
    let (got, stats) = decode::<512>(FramingKind::Cobs, &f);
    assert_eq!(got, vec![m.clone()]);
    assert_eq!(stats.dropped(), 0);

    // Decoders must also accept the shorter form without the trailing 0x01 block.
    let mut short = f.clone();
    short.remove(256);
    let (got, stats) = decode::<512>(FramingKind::Cobs, &short);
    assert_eq!(got, vec![m]);
    assert_eq!(stats.dropped(), 0);
}

#[test]
fn max_encoded_len_values() {
    assert_eq!(max_encoded_len(FramingKind::Raw, 0), 0);
    assert_eq!(max_encoded_len(FramingKind::Raw, 300), 300);
    assert_eq!(max_encoded_len(FramingKind::Cobs, 2), 7);
    assert_eq!(max_encoded_len(FramingKind::Cobs, 251), 256);
    assert_eq!(max_encoded_len(FramingKind::Cobs, 252), 258);
    // Never overflows.
    assert_eq!(max_encoded_len(FramingKind::Cobs, usize::MAX), usize::MAX);
    const BUF: usize = max_encoded_len(FramingKind::Cobs, 64);
    assert_eq!(BUF, 69);
}

#[test]
fn encode_reports_buffer_too_small() {
    for kind in [FramingKind::Raw, FramingKind::Cobs] {
        for m in sample_messages() {
            let needed = frame(kind, &m).len();
            for size in 0..needed {
                let mut out = vec![0u8; size];
                assert_eq!(
                    encode_frame(kind, &m, &mut out),
                    Err(Error::BufferTooSmall),
                    "{kind} len {} into {size}",
                    m.len()
                );
            }
            let mut out = vec![0u8; needed];
            assert_eq!(encode_frame(kind, &m, &mut out), Ok(needed));
        }
    }
}

proptest! {
    #[test]
    fn cobs_encoding_has_no_inner_zero_and_fits(m in prop::collection::vec(any::<u8>(), 0..700)) {
        let f = frame(FramingKind::Cobs, &m);
        prop_assert!(f.len() <= max_encoded_len(FramingKind::Cobs, m.len()));
        prop_assert_eq!(f[0], 0);
        prop_assert_eq!(f[f.len() - 1], 0);
        prop_assert!(!f[1..f.len() - 1].contains(&0));
    }
}

// ---- round trips ---------------------------------------------------------------------

#[test]
fn round_trip_back_to_back_both_framings() {
    let messages = sample_messages();
    for kind in [FramingKind::Raw, FramingKind::Cobs] {
        let stream = frames(kind, &messages);
        for chunks in [&[1usize][..], &[7], &[3, 100, 1, 17], &[stream.len()]] {
            let mut dec = FrameDecoder::<1024>::new(kind);
            let got = decode_chunked(&mut dec, &stream, chunks);
            assert_eq!(got, messages, "{kind} chunks {chunks:?}");
            let stats = dec.stats();
            assert_eq!(stats.frames as usize, messages.len());
            assert_eq!(stats.dropped(), 0);
            assert_eq!(stats.noise_bytes, 0);
            assert!(!dec.has_partial());
        }
    }
}

#[test]
fn push_returns_the_frame_on_its_last_octet() {
    for kind in [FramingKind::Raw, FramingKind::Cobs] {
        let f = frame(kind, &PUBLISH_Q1);
        let mut dec = FrameDecoder::<64>::new(kind);
        for (i, &b) in f.iter().enumerate() {
            let out = dec.push(b).map(<[u8]>::to_vec);
            if i == f.len() - 1 {
                assert_eq!(out.as_deref(), Some(&PUBLISH_Q1[..]));
            } else {
                assert_eq!(out, None, "{kind} octet {i}");
                assert!(dec.has_partial() || (kind == FramingKind::Cobs && i == 0));
            }
        }
        assert!(!dec.has_partial());
        assert_eq!(dec.kind(), kind);
        assert_eq!(dec.capacity(), 64);
    }
}

proptest! {
    #[test]
    fn cobs_arbitrary_messages_survive_any_chunking(
        messages in prop::collection::vec(mqttsn_strategy(597), 1..8),
        chunks in prop::collection::vec(1usize..64, 1..16),
    ) {
        let stream = frames(FramingKind::Cobs, &messages);
        let mut dec = FrameDecoder::<600>::new(FramingKind::Cobs);
        let got = decode_chunked(&mut dec, &stream, &chunks);
        prop_assert_eq!(&got, &messages);
        prop_assert_eq!(dec.stats().dropped(), 0);
        prop_assert_eq!(dec.stats().noise_bytes, 0);
    }

    #[test]
    fn raw_arbitrary_messages_survive_any_chunking(
        messages in prop::collection::vec(raw_message_strategy(), 1..8),
        chunks in prop::collection::vec(1usize..64, 1..16),
    ) {
        let stream = frames(FramingKind::Raw, &messages);
        let mut dec = FrameDecoder::<600>::new(FramingKind::Raw);
        let got = decode_chunked(&mut dec, &stream, &chunks);
        prop_assert_eq!(&got, &messages);
        prop_assert_eq!(dec.stats().dropped(), 0);
        prop_assert_eq!(dec.stats().noise_bytes, 0);
    }
}

// ---- COBS: noise and corruption ------------------------------------------------------

#[test]
fn cobs_empty_frames_are_ignored() {
    let mut stream = vec![0u8; 10];
    stream.extend(frame(FramingKind::Cobs, &PINGREQ));
    stream.extend([0u8; 5]);
    stream.extend(frame(FramingKind::Cobs, &PINGREQ));
    let (got, stats) = decode::<64>(FramingKind::Cobs, &stream);
    assert_eq!(got, vec![PINGREQ.to_vec(), PINGREQ.to_vec()]);
    assert_eq!(stats.frames, 2);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(stats.noise_bytes, 0);
}

proptest! {
    /// Noise between frames (which may contain 0x00) never costs a clean frame: the
    /// leading 0x00 of each frame ends whatever garbage came before it.
    #[test]
    fn cobs_noise_between_frames_loses_no_frame(
        messages in prop::collection::vec(mqttsn_strategy(98), 1..10),
        noise in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 10),
        chunks in prop::collection::vec(1usize..32, 1..8),
    ) {
        let mut stream = Vec::new();
        for (m, n) in messages.iter().zip(noise.iter().cycle()) {
            stream.extend_from_slice(n);
            stream.extend(frame(FramingKind::Cobs, m));
        }
        stream.extend_from_slice(&noise[9]);
        let mut dec = FrameDecoder::<100>::new(FramingKind::Cobs);
        let got = decode_chunked(&mut dec, &stream, &chunks);
        // Every clean frame comes out, in order. (Random noise passes the CRC with
        // probability about 2^-16 per burst, so extra frames are allowed here; the exact
        // test is below.)
        let mut it = got.iter();
        for m in &messages {
            prop_assert!(it.any(|g| g == m), "lost {:02x?}", m);
        }
        let stats = dec.stats();
        prop_assert_eq!(stats.frames as usize, got.len());
    }
}

/// Damages a COBS frame (leading and trailing delimiter included) in one of several
/// ways, always touching at least one octet of the encoded body.
fn corrupt(rng: &mut Rng, f: &[u8]) -> Vec<u8> {
    let body = 1..f.len() - 1;
    let mut f = f.to_vec();
    match rng.below(5) {
        0 => {
            // Flip one bit.
            let i = body.start + rng.below(body.len());
            f[i] ^= 1 << rng.below(8);
        }
        1 => {
            // Insert 1..4 random octets.
            let i = body.start + rng.below(body.len() + 1);
            for _ in 0..1 + rng.below(4) {
                f.insert(i, rng.byte());
            }
        }
        2 => {
            // Lose one octet.
            f.remove(body.start + rng.below(body.len()));
        }
        3 => {
            // Overwrite a burst with random octets (at least one really changed).
            let i = body.start + rng.below(body.len());
            let n = (1 + rng.below(8)).min(body.end - i);
            for b in &mut f[i..i + n] {
                *b = rng.byte();
            }
            f[i] = f[i].wrapping_add(1 + rng.byte() % 255);
        }
        _ => {
            // Truncated: the sender stopped (reset, cable pulled) mid-frame, after at
            // least one octet of the body.
            f.truncate(body.start + 1 + rng.below(body.len() - 1));
        }
    }
    f
}

#[test]
fn cobs_loses_exactly_the_corrupted_frames() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut expected = Vec::new();
    let mut corrupted = 0u32;
    let mut stream = Vec::new();
    for round in 0..3000 {
        let len = 1 + rng.below(120);
        let m = mqttsn(&rng.bytes(len));
        let f = frame(FramingKind::Cobs, &m);
        if rng.below(3) == 0 {
            stream.extend(corrupt(&mut rng, &f));
            corrupted += 1;
        } else {
            stream.extend(&f);
            expected.push(m);
        }
        if round % 7 == 0 {
            // Noise between frames, too.
            let n = rng.below(20);
            stream.extend(rng.bytes(n));
        }
    }
    let mut dec = FrameDecoder::<128>::new(FramingKind::Cobs);
    let got = decode_chunked(&mut dec, &stream, &[5, 1, 64, 3]);
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    let stats = dec.stats();
    assert_eq!(stats.frames as usize, expected.len());
    assert!(stats.dropped() >= corrupted, "{stats:?} vs {corrupted}");
    assert!(stats.dropped_crc > 0 && stats.dropped_malformed > 0);
    assert!(stats.noise_bytes > 0);
}

#[test]
fn cobs_every_single_bit_flip_is_detected() {
    let mut rng = Rng(42);
    let mut messages = sample_messages();
    // Every 256th message has a CRC ending in 0x00, the case that needs the length check.
    messages.extend((0..2000).map(|_| {
        let len = 1 + rng.below(20);
        mqttsn(&rng.bytes(len))
    }));
    let mut harmless = 0;
    for m in messages.iter().filter(|m| m.len() <= 300) {
        let f = frame(FramingKind::Cobs, m);
        let next = frame(FramingKind::Cobs, &PINGREQ);
        for i in 1..f.len() - 1 {
            for bit in 0..8 {
                let mut bad = f.clone();
                bad[i] ^= 1 << bit;
                bad.extend(&next);
                let mut dec = FrameDecoder::<1024>::new(FramingKind::Cobs);
                let got = decode_chunked(&mut dec, &bad, &[1]);
                let stats = dec.stats();
                if got.len() == 2 && got[0] == *m {
                    // The one harmless case: the 0x01 code closing the frame after a
                    // full 0xFF block became 0x00, which is the other valid encoding
                    // of the same message.
                    assert_eq!(f[i], 0x01);
                    assert_eq!(f[i - 255], 0xFF);
                    assert_eq!(i, f.len() - 2);
                    harmless += 1;
                } else {
                    assert!(
                        stats.dropped() >= 1,
                        "{i} {bit} {m:02x?} {bad:02x?} {got:02x?} {stats:?}"
                    );
                }
                assert_eq!(
                    got.last(),
                    Some(&PINGREQ.to_vec()),
                    "flip of bit {bit} of octet {i} of {m:02x?} not detected"
                );
                assert!(got.len() == 1 || got[0] == *m, "wrong message delivered");
                assert_eq!(stats.dropped_overflow, 0);
            }
        }
    }
    // At most once per message: bit 0 of that final 0x01.
    assert!(harmless <= messages.len());
}

#[test]
fn cobs_data_bit_flip_is_counted_as_crc_error() {
    // Flipping a bit of a data octet (not a code octet, not to zero) leaves the COBS
    // structure intact: exactly one CRC error.
    let mut f = frame(FramingKind::Cobs, &PUBLISH_Q1);
    f[10] ^= 0x04; // '1' -> '5'
    let (got, stats) = decode::<64>(FramingKind::Cobs, &f);
    assert!(got.is_empty());
    assert_eq!(stats.dropped_crc, 1);
    assert_eq!(stats.dropped_malformed, 0);
    assert_eq!(stats.frames, 0);
    assert_eq!(stats.noise_bytes as usize, f.len() - 2);
}

/// The CRC (xorout 0) stays valid when trailing zero octets are removed from
/// message || CRC, and a frame whose decoded form ends in 0x00 ends with the COBS code
/// 0x01; losing that code (or its flip to 0x00) removes exactly that zero. Only the
/// length check catches it.
#[test]
fn cobs_lost_final_code_is_caught_by_the_length_check() {
    let mut m = PUBLISH_Q1.to_vec();
    let mut k = 0u8;
    while crc16(&m) & 0xFF != 0 {
        k += 1;
        m[10] = k;
    }
    let f = frame(FramingKind::Cobs, &m);
    assert_eq!(f[f.len() - 2..], [0x01, 0x00]);
    // The CRC on its own would accept the message one octet short.
    let short = &m[..m.len() - 1];
    let [crc_hi, _] = crc16(&m).to_be_bytes();
    assert_eq!(crc16(short).to_be_bytes(), [m[m.len() - 1], crc_hi]);

    let next = frame(FramingKind::Cobs, &PINGREQ);
    // The final code flipped to 0x00.
    let mut flipped = f.clone();
    let last_code = flipped.len() - 2;
    flipped[last_code] = 0x00;
    // The final code and the delimiter lost.
    let lost = f[..f.len() - 2].to_vec();
    for bad in [flipped, lost] {
        let mut stream = bad;
        stream.extend(&next);
        let (got, stats) = decode::<64>(FramingKind::Cobs, &stream);
        assert_eq!(got, vec![PINGREQ.to_vec()]);
        assert_eq!(stats.dropped_malformed, 1);
        assert_eq!(stats.dropped_crc, 0);
    }
}

#[test]
fn cobs_truncated_frames_are_dropped() {
    let good = frame(FramingKind::Cobs, &PUBLISH_Q1);
    for cut in 1..good.len() - 1 {
        let mut stream = good[..cut].to_vec();
        stream.extend(&good);
        let (got, stats) = decode::<64>(FramingKind::Cobs, &stream);
        assert_eq!(got, vec![PUBLISH_Q1.to_vec()], "cut at {cut}");
        // cut == 1 leaves only the leading delimiter: an empty frame, no error.
        assert_eq!(stats.dropped(), u32::from(cut > 1), "cut at {cut}");
    }
}

#[test]
fn cobs_too_short_frames_are_malformed() {
    for m in [&[][..], &[0x02][..]] {
        let f = frame(FramingKind::Cobs, m);
        let (got, stats) = decode::<64>(FramingKind::Cobs, &f);
        assert!(got.is_empty());
        assert_eq!(stats.dropped_malformed, 1);
    }
    // A lone code octet, a frame that ends inside a block.
    let (got, stats) = decode::<64>(FramingKind::Cobs, &[0x00, 0x01, 0x00, 0x05, 0x11, 0x00]);
    assert!(got.is_empty());
    assert_eq!(stats.dropped_malformed, 2);
    assert_eq!(stats.noise_bytes, 3);
}

#[test]
fn cobs_capacity_overflow_is_counted() {
    let fits = message(16, 0x0C, |k| k as u8);
    let too_long = message(17, 0x0C, |k| k as u8);
    let huge = message(2000, 0x0C, |_| 0x33);
    let stream = frames(FramingKind::Cobs, &[too_long.clone(), fits.clone(), huge, fits.clone()]);
    let (got, stats) = decode::<16>(FramingKind::Cobs, &stream);
    assert_eq!(got, vec![fits.clone(), fits.clone()]);
    assert_eq!(stats.dropped_overflow, 2);
    assert_eq!(stats.dropped_crc + stats.dropped_malformed, 0);
    // Noise without any delimiter is one overflow, not thousands.
    let mut stream = vec![0x00];
    stream.extend(vec![0x42; 5000]);
    stream.extend(frame(FramingKind::Cobs, &fits));
    let (got, stats) = decode::<16>(FramingKind::Cobs, &stream);
    assert_eq!(got, vec![fits]);
    assert_eq!(stats.dropped_overflow, 1);
    assert_eq!(stats.noise_bytes, 5000);
}

#[test]
fn cobs_reset_discards_partial_frame() {
    let f = frame(FramingKind::Cobs, &PUBLISH_Q1);
    let mut dec = FrameDecoder::<64>::new(FramingKind::Cobs);
    dec.feed(&f[..6], |_| panic!("no frame yet"));
    assert!(dec.has_partial());
    dec.reset();
    assert!(!dec.has_partial());
    assert_eq!(dec.stats().dropped_malformed, 1);
    assert_eq!(dec.stats().noise_bytes, 5);
    // The rest of the old frame is now noise; the next frame is fine.
    let mut stream = f[6..].to_vec();
    stream.extend(&f);
    let got = decode_chunked(&mut dec, &stream, &[1]);
    assert_eq!(got, vec![PUBLISH_Q1.to_vec()]);
    // Reset when idle counts nothing.
    let before = dec.stats();
    dec.reset();
    dec.reset();
    assert_eq!(dec.stats(), before);
}

// ---- raw: resynchronisation ----------------------------------------------------------

#[test]
fn raw_resyncs_after_garbage() {
    // Octets that cannot start a plausible message: length 0; a three-octet header
    // announcing 0 octets.
    let zeros = [0x00, 0x00, 0x01, 0x00, 0x00, 0x00];
    // Lengths followed by unknown types (0x03, 0x11, 0xFF, 0x20, 0x80, 0x1F, 0x19). Any
    // length octet followed by a known type looks like a header, so this garbage must be
    // followed by a message whose length octet is not a known type either (0x1F).
    let unknown = [0x03, 0x03, 0x11, 0xFF, 0x20, 0x80, 0x1F, 0x19];
    let m31 = message(31, 0x0C, |k| k as u8);
    let messages = sample_messages();
    let mut stream = zeros.to_vec();
    stream.extend(frames(FramingKind::Raw, &messages[..10]));
    stream.extend(unknown);
    stream.extend(&m31);
    stream.extend(frames(FramingKind::Raw, &messages[10..]));
    stream.extend(zeros);
    stream.extend(frames(FramingKind::Raw, &messages[..3]));

    let mut expected = messages[..10].to_vec();
    expected.push(m31);
    expected.extend_from_slice(&messages[10..]);
    expected.extend_from_slice(&messages[..3]);
    let (got, stats) = decode::<1024>(FramingKind::Raw, &stream);
    assert_eq!(got, expected);
    assert_eq!(stats.noise_bytes as usize, 2 * zeros.len() + unknown.len());
    assert_eq!(stats.dropped(), 0);
}

#[test]
fn raw_false_header_in_garbage_swallows_octets() {
    // The honest limitation: garbage ending in a plausible header (here 0x05 0x0C, "a
    // 5-octet PUBLISH") takes the next octets with it, and the decoder can stay out of
    // step (here 0x16 0x0B reads as "a 22-octet REGACK") until reset().
    let mut dec = FrameDecoder::<64>::new(FramingKind::Raw);
    let mut stream = vec![0x05, 0x0C];
    stream.extend(PINGREQ);
    stream.extend(PINGREQ);
    stream.extend(PUBLISH_Q1);
    let got = decode_chunked(&mut dec, &stream, &[1]);
    assert_eq!(got, vec![vec![0x05, 0x0C, 0x02, 0x16, 0x02]]);
    assert!(dec.has_partial());
    dec.reset();
    let got = decode_chunked(&mut dec, &PUBLISH_Q1, &[1]);
    assert_eq!(got, vec![PUBLISH_Q1.to_vec()]);
}

#[test]
fn raw_resyncs_after_reset() {
    let messages = vec![PINGREQ.to_vec(), PUBLISH_Q1.to_vec(), PUBLISH_HI.to_vec()];
    let clean = frames(FramingKind::Raw, &messages);
    // The start of a PUBLISH, then the sender went quiet.
    let partial = &PUBLISH_Q1[..4];

    // Without reset the partial frame swallows the next message(s): raw framing
    // cannot know better.
    let mut dec = FrameDecoder::<64>::new(FramingKind::Raw);
    let mut stream = partial.to_vec();
    stream.extend(&clean);
    let got = decode_chunked(&mut dec, &stream, &[1]);
    assert_ne!(got, messages);

    // With reset after the idle gap, everything after it is clean.
    let mut dec = FrameDecoder::<64>::new(FramingKind::Raw);
    dec.feed(partial, |_| panic!("no frame yet"));
    assert!(dec.has_partial());
    dec.reset();
    assert!(!dec.has_partial());
    let got = decode_chunked(&mut dec, &clean, &[1]);
    assert_eq!(got, messages);
    let stats = dec.stats();
    assert_eq!(stats.dropped_malformed, 1);
    assert_eq!(stats.noise_bytes, 4);
    assert_eq!(stats.frames, 3);
}

#[test]
fn raw_truncated_frame_then_reset_is_dropped() {
    let messages = sample_messages();
    let mut dec = FrameDecoder::<1024>::new(FramingKind::Raw);
    let mut got = Vec::new();
    for m in &messages {
        // Every message is preceded by a truncated copy of itself and an idle gap.
        dec.feed(&m[..m.len() / 2], |f| got.push(f.to_vec()));
        dec.reset();
        dec.feed(m, |f| got.push(f.to_vec()));
    }
    assert_eq!(got, messages);
    assert_eq!(dec.stats().frames as usize, messages.len());
}

#[test]
fn raw_capacity_overflow_is_counted() {
    // Payload octets 0x03 (not a message type) so that the skipped oversized messages
    // do not look like headers, and `fits` has length 0x11 (not a message type either)
    // so that the last skipped octet does not pair with it.
    let fits = message(17, 0x0C, |k| k as u8 | 0x80);
    let too_long = message(40, 0x0C, |_| 0x03);
    let three_octet = message(256, 0x0C, |_| 0x03);
    let stream = frames(
        FramingKind::Raw,
        &[fits.clone(), too_long, fits.clone(), three_octet, fits.clone()],
    );
    let (got, stats) = decode::<17>(FramingKind::Raw, &stream);
    assert_eq!(got, vec![fits.clone(), fits.clone(), fits.clone()]);
    assert_eq!(stats.dropped_overflow, 2);
    // The oversized messages were skipped octet by octet.
    assert_eq!(stats.noise_bytes, 40 + 256);
}

#[test]
fn raw_rejects_unknown_types_and_impossible_lengths() {
    // Followed by a message whose length octet 0x1F is not a known type, so the last
    // bad octet cannot pair with it.
    let next = message(31, 0x0C, |k| k as u8);
    for bad in [
        &[0x02, 0x03][..],         // reserved type 0x03
        &[0x02, 0x11],             // reserved type 0x11
        &[0x02, 0x19],             // reserved type 0x19
        &[0x02, 0xFD],             // reserved type 0xFD
        &[0x00, 0x16],             // length 0
        &[0x01, 0x00, 0x00, 0x00], // three-octet length 0
    ] {
        let mut stream = bad.to_vec();
        stream.extend(&next);
        let (got, stats) = decode::<64>(FramingKind::Raw, &stream);
        assert_eq!(got, vec![next.clone()], "{bad:02x?}");
        assert_eq!(stats.noise_bytes as usize, bad.len(), "{bad:02x?}");
    }
}

// ---- robustness ----------------------------------------------------------------------

fn check_invariants<const N: usize>(kind: FramingKind, bytes: &[u8], chunks: &[usize]) {
    let mut dec = FrameDecoder::<N>::new(kind);
    let got = decode_chunked(&mut dec, bytes, chunks);
    let stats = dec.stats();
    assert_eq!(stats.frames as usize, got.len());
    assert!(stats.noise_bytes as usize <= bytes.len());
    for f in &got {
        assert!(f.len() >= 2 && f.len() <= N, "{kind} N={N}: {f:02x?}");
        // Behind any forwarder encapsulation headers (Length covering the header only),
        // one message whose Length covers it all.
        let mut at = 0;
        while f[at] != 0x01 && f.get(at + 1) == Some(&0xFE) {
            assert!(f[at] >= 3, "{kind} N={N}: {f:02x?}");
            at += usize::from(f[at]);
        }
        let m = &f[at..];
        let (total, header) = if m[0] == 0x01 {
            (usize::from(u16::from_be_bytes([m[1], m[2]])), 3)
        } else {
            (usize::from(m[0]), 1)
        };
        assert_eq!(total, m.len(), "{kind} N={N}: {f:02x?}");
        if kind == FramingKind::Raw {
            assert!(KNOWN_TYPES.contains(&m[header]));
        }
    }
    dec.reset();
    assert!(!dec.has_partial());
    // Still works afterwards.
    let f = frame(kind, &PINGREQ);
    let mut after = Vec::new();
    dec.feed(&f, |m| after.push(m.to_vec()));
    if N >= 2 {
        assert_eq!(after, vec![PINGREQ.to_vec()], "{kind} N={N}");
    }
}

fn check_all_capacities(bytes: &[u8], chunks: &[usize]) {
    for kind in [FramingKind::Raw, FramingKind::Cobs] {
        check_invariants::<0>(kind, bytes, chunks);
        check_invariants::<1>(kind, bytes, chunks);
        check_invariants::<2>(kind, bytes, chunks);
        check_invariants::<3>(kind, bytes, chunks);
        check_invariants::<4>(kind, bytes, chunks);
        check_invariants::<5>(kind, bytes, chunks);
        check_invariants::<64>(kind, bytes, chunks);
        check_invariants::<300>(kind, bytes, chunks);
    }
}

proptest! {
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        chunks in prop::collection::vec(1usize..100, 1..8),
    ) {
        check_all_capacities(&bytes, &chunks);
    }

    /// Bytes biased towards what the decoders look at: delimiters, small lengths,
    /// the three-octet marker, known types.
    #[test]
    fn decoder_never_panics_on_plausible_bytes(
        bytes in prop::collection::vec(
            prop_oneof![
                Just(0x00u8), Just(0x01), Just(0x02), Just(0xFF), Just(0xFE),
                0x00u8..0x20, any::<u8>(),
            ],
            0..2000,
        ),
        chunks in prop::collection::vec(1usize..100, 1..8),
    ) {
        check_all_capacities(&bytes, &chunks);
    }
}

#[test]
fn tiny_capacities_drop_everything_but_keep_counting() {
    let stream = frames(FramingKind::Cobs, &[PINGREQ.to_vec(), PUBLISH_HI.to_vec()]);
    let (got, stats) = decode::<0>(FramingKind::Cobs, &stream);
    assert!(got.is_empty());
    assert_eq!(stats.dropped_overflow, 2);
    let (got, stats) = decode::<2>(FramingKind::Cobs, &stream);
    assert_eq!(got, vec![PINGREQ.to_vec()]);
    assert_eq!(stats.dropped_overflow, 1);

    let stream = frames(FramingKind::Raw, &[PINGREQ.to_vec(), PUBLISH_HI.to_vec()]);
    let (got, _) = decode::<0>(FramingKind::Raw, &stream);
    assert!(got.is_empty());
    let (got, stats) = decode::<2>(FramingKind::Raw, &stream);
    assert_eq!(got, vec![PINGREQ.to_vec()]);
    assert!(stats.dropped_overflow >= 1);
}
