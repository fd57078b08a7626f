//! COBS (Consistent Overhead Byte Stuffing) encoder.
//!
//! The decoder is a streaming state machine inside [`super::FrameDecoder`].

use crate::Error;

/// Writes `value` at `out[i]`, or fails if `out` is too short.
#[inline]
fn put(out: &mut [u8], i: usize, value: u8) -> Result<(), Error> {
    match out.get_mut(i) {
        Some(slot) => {
            *slot = value;
            Ok(())
        }
        None => Err(Error::BufferTooSmall),
    }
}

/// COBS-encodes `input` into the start of `out` (no delimiter) and returns the number
/// of octets written, at most `n + n / 254 + 1` for `n` input octets.
///
/// This is the encoder of Cheshire and Baker's paper: a run of 254 non-zero octets is
/// closed by a `0xFF` code, and the input always ends with a (possibly empty, code
/// `0x01`) block, so the encoding of 254 non-zero octets is `FF d1..d254 01`.
pub(super) fn encode(input: impl Iterator<Item = u8>, out: &mut [u8]) -> Result<usize, Error> {
    // Position of the code octet of the block being filled, next write position and
    // the code (1 + data octets so far) of that block.
    let mut code_pos = 0usize;
    let mut w = 1usize;
    let mut code = 1u8;
    for b in input {
        if b == 0 {
            put(out, code_pos, code)?;
            code_pos = w;
            w += 1;
            code = 1;
        } else {
            put(out, w, b)?;
            w += 1;
            code += 1;
            if code == 0xFF {
                put(out, code_pos, code)?;
                code_pos = w;
                w += 1;
                code = 1;
            }
        }
    }
    put(out, code_pos, code)?;
    Ok(w)
}
