//! CRC-16/CCITT-FALSE.

/// CRC-16/CCITT-FALSE of `data`, as appended to every frame of the [`Cobs`] framing.
///
/// Parameters (in the "Catalogue of parametrised CRC algorithms" notation): width 16,
/// poly `0x1021`, init `0xFFFF`, refin `false`, refout `false`, xorout `0x0000`,
/// check `0x29B1` (the CRC of the ASCII string `"123456789"`). Also known as
/// CRC-16/IBM-3740 and CRC-16/AUTOSAR. On the wire the CRC is sent big-endian (high
/// octet first).
///
/// Table-less and `const`; costs a handful of shifts per octet.
///
/// ```
/// assert_eq!(sn_codec::framing::crc16(b"123456789"), 0x29B1);
/// ```
///
/// [`Cobs`]: super::FramingKind::Cobs
pub const fn crc16(data: &[u8]) -> u16 {
    let mut crc = INIT;
    let mut i = 0;
    while i < data.len() {
        crc = update(crc, data[i]);
        i += 1;
    }
    crc
}

/// Initial register value.
pub(super) const INIT: u16 = 0xFFFF;

/// Feeds one octet into the CRC register (MSB first, polynomial 0x1021).
///
/// Equivalent to eight rounds of the bitwise algorithm; see docs/serial-framing.md.
#[inline]
pub(super) const fn update(crc: u16, byte: u8) -> u16 {
    let mut x = ((crc >> 8) as u8) ^ byte;
    x ^= x >> 4;
    let x = x as u16;
    (crc << 8) ^ (x << 12) ^ (x << 5) ^ x
}
