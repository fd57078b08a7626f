//! Serial framing: how MQTT-SN messages travel over a byte stream (UART, USB CDC, a pipe).
//!
//! MQTT-SN is specified for datagram networks; a serial line has no datagram boundaries,
//! so both ends must agree on a framing ([`FramingKind`]):
//!
//! - [`FramingKind::Cobs`] (the default, recommended): each message is followed by its
//!   CRC-16 ([`crc16`]), COBS-encoded so that it contains no `0x00`, and enclosed in
//!   `0x00` delimiters: `00 COBS(message || crc_hi crc_lo) 00`. Line noise, lost octets
//!   and flipped bits are detected (CRC, COBS structure, and the message's own length
//!   field); the damaged frame is dropped and counted ([`FrameStats`]) and the receiver
//!   is back in step at the next `0x00`.
//! - [`FramingKind::Raw`]: messages back to back, delimited only by their own MQTT-SN
//!   length field. What simple firmware and serial-to-UDP bridges send. The decoder
//!   resynchronises after noise by insisting on a plausible length and a known message
//!   type, but **raw framing cannot detect corruption inside a frame**: a flipped bit in
//!   a payload is passed on as is, and a lost or corrupted length octet can make the
//!   decoder swallow the following message(s) as one bogus frame until its declared
//!   length is reached. Call [`FrameDecoder::reset`] after an idle gap on the line to
//!   limit the damage, and prefer COBS wherever the peer can do it.
//!
//! The byte-by-byte description, meant for firmware authors, is in
//! `docs/serial-framing.md`.
//!
//! Sending:
//!
//! ```
//! use sn_codec::framing::{encode_frame, max_encoded_len, FramingKind};
//!
//! let pingreq = [0x02, 0x16];
//! let mut out = [0u8; max_encoded_len(FramingKind::Cobs, 2)];
//! let n = encode_frame(FramingKind::Cobs, &pingreq, &mut out)?;
//! assert_eq!(&out[..n], &[0x00, 0x05, 0x02, 0x16, 0x09, 0x9A, 0x00]);
//! # Ok::<(), sn_codec::Error>(())
//! ```
//!
//! Receiving (the frame is borrowed from the decoder's buffer):
//!
//! ```
//! use sn_codec::framing::{FrameDecoder, FramingKind};
//!
//! let mut decoder = FrameDecoder::<256>::new(FramingKind::Cobs);
//! let line = [0x00, 0x05, 0x02, 0x16, 0x09, 0x9A, 0x00];
//! let mut got = 0;
//! decoder.feed(&line, |message| {
//!     assert_eq!(message, &[0x02, 0x16]);
//!     got += 1;
//! });
//! assert_eq!(got, 1);
//! assert_eq!(decoder.stats().frames, 1);
//! ```

use core::fmt;
use core::str::FromStr;

use crate::Error;

mod cobs;
mod crc;
mod header;

pub use crc::crc16;

/// Which framing a serial link uses. Both ends must agree.
///
/// Parses from and displays as `"raw"` / `"cobs"` (parsing ignores ASCII case), for
/// configuration files and command lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FramingKind {
    /// MQTT-SN messages back to back, delimited by their own length field. No error
    /// detection; see the [module documentation](self).
    Raw,
    /// `0x00`, COBS(message || CRC-16 big-endian), `0x00`. Detects and drops damaged
    /// frames. The default.
    #[default]
    Cobs,
}

impl FramingKind {
    /// The name used in configuration: `"raw"` or `"cobs"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FramingKind::Raw => "raw",
            FramingKind::Cobs => "cobs",
        }
    }
}

impl fmt::Display for FramingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string given to [`FramingKind::from_str`] is neither `"raw"` nor `"cobs"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParseFramingKindError;

impl fmt::Display for ParseFramingKindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown serial framing (expected \"raw\" or \"cobs\")")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ParseFramingKindError {}

impl FromStr for FramingKind {
    type Err = ParseFramingKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("raw") {
            Ok(FramingKind::Raw)
        } else if s.eq_ignore_ascii_case("cobs") {
            Ok(FramingKind::Cobs)
        } else {
            Err(ParseFramingKindError)
        }
    }
}

/// Counters kept by a [`FrameDecoder`]. They wrap around at `u32::MAX`.
///
/// In COBS mode every counter is exact. In raw mode the decoder cannot tell noise from
/// damaged frames, so `dropped_crc` stays 0 and the others are best guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct FrameStats {
    /// Frames delivered.
    pub frames: u32,
    /// COBS: frames dropped because the CRC did not match. Always 0 in raw mode.
    pub dropped_crc: u32,
    /// Frames dropped because they were malformed. COBS: invalid COBS structure, shorter
    /// than 2 message octets plus the CRC, or a good CRC but a message whose MQTT-SN
    /// length field disagrees with its size. Both modes: a partial frame thrown away by
    /// [`FrameDecoder::reset`].
    pub dropped_malformed: u32,
    /// Frames dropped because the message is longer than the decoder's capacity `N`.
    /// Raw mode: headers with a known message type that announce more than `N` octets.
    pub dropped_overflow: u32,
    /// Octets thrown away: COBS: every octet of every dropped frame (delimiters
    /// excluded); raw: every octet skipped while resynchronising, plus partial frames
    /// discarded by [`FrameDecoder::reset`].
    pub noise_bytes: u32,
}

impl FrameStats {
    /// All frames dropped, whatever the reason.
    pub const fn dropped(&self) -> u32 {
        self.dropped_crc
            .wrapping_add(self.dropped_malformed)
            .wrapping_add(self.dropped_overflow)
    }
}

/// Adds a `usize` to a `u32` counter, wrapping.
#[inline]
fn add(counter: &mut u32, n: usize) {
    *counter = counter.wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
}

/// The largest number of octets [`encode_frame`] writes for a message of `message_len`
/// octets. Use it to size the output buffer, also in `const` context.
///
/// - `Raw`: `message_len`.
/// - `Cobs`: with `n = message_len + 2` (the CRC), `n + n / 254 + 1` for COBS plus 2
///   delimiters; for messages up to 251 octets that is `message_len + 5`.
pub const fn max_encoded_len(kind: FramingKind, message_len: usize) -> usize {
    match kind {
        FramingKind::Raw => message_len,
        FramingKind::Cobs => {
            let n = message_len.saturating_add(2);
            n.saturating_add(n / 254).saturating_add(3)
        }
    }
}

/// Frames `message` (one complete MQTT-SN message, length header included) into the
/// start of `out` and returns the number of octets written.
///
/// - `Raw`: copies the message unchanged.
/// - `Cobs`: writes `0x00`, COBS(message || CRC-16 high octet, low octet), `0x00`.
///
/// The message is not validated, but decoders deliver only messages whose MQTT-SN length
/// field matches their size (and, raw, whose type octet is a known type), so sending
/// anything else is pointless.
///
/// Fails with [`Error::BufferTooSmall`] if `out` cannot hold the frame; then the content
/// of `out` is unspecified. `out.len() >= max_encoded_len(kind, message.len())` always
/// suffices.
pub fn encode_frame(kind: FramingKind, message: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    match kind {
        FramingKind::Raw => {
            let dst = out.get_mut(..message.len()).ok_or(Error::BufferTooSmall)?;
            dst.copy_from_slice(message);
            Ok(message.len())
        }
        FramingKind::Cobs => {
            let crc = crc16(message).to_be_bytes();
            let (first, rest) = out.split_first_mut().ok_or(Error::BufferTooSmall)?;
            *first = 0x00;
            let n = cobs::encode(message.iter().copied().chain(crc), rest)?;
            let last = rest.get_mut(n).ok_or(Error::BufferTooSmall)?;
            *last = 0x00;
            Ok(n + 2)
        }
    }
}

/// State of the streaming COBS decoder for the frame being received.
#[derive(Debug, Clone, Copy)]
struct CobsState {
    /// Encoded octets received since the last `0x00` (the frame's size on the wire).
    seg_len: usize,
    /// Code octet of the current block.
    code: u8,
    /// Data octets still to come in the current block; 0 = the next octet is a code.
    remaining: u8,
    /// The two most recently decoded octets: the CRC, if the frame ends now.
    tail: [u8; 2],
    /// How many octets of `tail` are valid (0..=2).
    tail_len: u8,
    /// The message outgrew the buffer; ignore the rest of this frame.
    overflow: bool,
    /// CRC register over the octets moved into the buffer so far.
    crc: u16,
}

impl CobsState {
    const IDLE: CobsState = CobsState {
        seg_len: 0,
        code: 0,
        remaining: 0,
        tail: [0; 2],
        tail_len: 0,
        overflow: false,
        crc: crc::INIT,
    };
}

/// A streaming frame decoder that holds messages of up to `N` octets.
///
/// Feed it the octets read from the serial line, in any chunking, with
/// [`push`](Self::push) or [`feed`](Self::feed); complete, checked messages come out as
/// slices borrowed from its internal `[u8; N]` buffer. It never panics and never
/// allocates, whatever the input. `N` is the largest message delivered (the CRC of the
/// COBS framing does not count); larger frames are dropped and counted in
/// [`FrameStats::dropped_overflow`]. MQTT-SN messages on constrained links are short;
/// 256 is a common choice.
#[derive(Debug, Clone)]
pub struct FrameDecoder<const N: usize> {
    kind: FramingKind,
    buf: [u8; N],
    /// Octets of `buf` in use: the message decoded so far (COBS, CRC excluded) or the
    /// octets received since the last frame boundary (raw).
    len: usize,
    /// `buf[..frame_len]` was handed out as a frame; remove it before the next octet.
    /// Raw mode can have octets after it (at most one: see `raw_resync`).
    frame_len: usize,
    /// Raw: total length announced by a validated header, 0 while still looking for one.
    raw_expect: usize,
    cobs: CobsState,
    stats: FrameStats,
}

impl<const N: usize> Default for FrameDecoder<N> {
    /// A decoder for the default framing, [`FramingKind::Cobs`].
    fn default() -> Self {
        Self::new(FramingKind::default())
    }
}

impl<const N: usize> FrameDecoder<N> {
    /// An empty decoder for the given framing.
    pub const fn new(kind: FramingKind) -> Self {
        FrameDecoder {
            kind,
            buf: [0; N],
            len: 0,
            frame_len: 0,
            raw_expect: 0,
            cobs: CobsState::IDLE,
            stats: FrameStats {
                frames: 0,
                dropped_crc: 0,
                dropped_malformed: 0,
                dropped_overflow: 0,
                noise_bytes: 0,
            },
        }
    }

    /// The framing this decoder expects.
    pub const fn kind(&self) -> FramingKind {
        self.kind
    }

    /// The largest message this decoder delivers, `N`.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The counters since this decoder was created.
    pub const fn stats(&self) -> FrameStats {
        self.stats
    }

    /// Whether part of a frame has been received and is waiting for the rest, i.e.
    /// whether [`reset`](Self::reset) would throw something away.
    pub const fn has_partial(&self) -> bool {
        match self.kind {
            FramingKind::Raw => self.len > self.frame_len,
            FramingKind::Cobs => self.cobs.seg_len > 0,
        }
    }

    /// Takes one octet from the line. Returns the message it completes, if any: a
    /// slice of the decoder's buffer, valid until the next call on the decoder.
    pub fn push(&mut self, byte: u8) -> Option<&[u8]> {
        self.remove_delivered();
        let complete = match self.kind {
            FramingKind::Raw => self.push_raw(byte),
            FramingKind::Cobs => self.push_cobs(byte),
        };
        let frame_len = complete?;
        self.frame_len = frame_len;
        self.stats.frames = self.stats.frames.wrapping_add(1);
        self.buf.get(..frame_len)
    }

    /// Removes the frame handed out by the last `push`, keeping any octets after it.
    fn remove_delivered(&mut self) {
        if self.frame_len > 0 {
            let n = self.frame_len.min(self.len);
            self.buf.copy_within(n..self.len, 0);
            self.len -= n;
            self.frame_len = 0;
        }
    }

    /// Takes a chunk of octets from the line and calls `on_frame` with each message they
    /// complete, in order.
    pub fn feed(&mut self, bytes: &[u8], mut on_frame: impl FnMut(&[u8])) {
        for &b in bytes {
            if let Some(frame) = self.push(b) {
                on_frame(frame);
            }
        }
    }

    /// Throws away any partial frame, as if the line had just started.
    ///
    /// Raw mode: call it when the line has been idle for clearly longer than a sender
    /// pauses inside a frame (senders write a frame in one go; 50 ms is a safe default,
    /// above the 1 to 16 ms latency timers of USB-serial adapters). A partial frame older
    /// than that will never be completed, and would otherwise swallow the start of the
    /// next message. COBS mode does not need it (the next frame's leading `0x00` ends
    /// any partial frame), and a too-short idle timeout there only risks dropping a good
    /// frame that arrived in two bursts.
    ///
    /// A discarded partial frame is counted in [`FrameStats::dropped_malformed`] (raw:
    /// only once its header looked plausible) and its octets in
    /// [`FrameStats::noise_bytes`]. Harmless when nothing is pending. The counters are
    /// kept.
    pub fn reset(&mut self) {
        self.remove_delivered();
        match self.kind {
            FramingKind::Raw => {
                if self.len > 0 {
                    add(&mut self.stats.noise_bytes, self.len);
                    if self.raw_expect != 0 {
                        add(&mut self.stats.dropped_malformed, 1);
                    }
                }
            }
            FramingKind::Cobs => {
                if self.cobs.seg_len > 0 {
                    add(&mut self.stats.noise_bytes, self.cobs.seg_len);
                    if !self.cobs.overflow {
                        add(&mut self.stats.dropped_malformed, 1);
                    }
                }
            }
        }
        self.len = 0;
        self.raw_expect = 0;
        self.cobs = CobsState::IDLE;
    }

    // ---- raw ---------------------------------------------------------------------

    /// Raw mode: stores `byte`; returns the length of the frame now complete at the
    /// start of the buffer, if any.
    fn push_raw(&mut self, byte: u8) -> Option<usize> {
        let Some(slot) = self.buf.get_mut(self.len) else {
            // Only reachable with N <= 1: a validated frame never exceeds N and is
            // delivered as soon as it is complete, and at most one octet is left over.
            add(&mut self.stats.noise_bytes, 1);
            return None;
        };
        *slot = byte;
        self.len += 1;
        if self.raw_expect == 0 {
            self.raw_resync();
        }
        let total = self.raw_expect;
        if total != 0 && self.len >= total {
            self.raw_expect = 0;
            Some(total)
        } else {
            None
        }
    }

    /// Raw mode: looks for a plausible header at the start of the buffer, dropping one
    /// octet at a time until there is one or more octets are needed to judge.
    ///
    /// Called after every octet while no header has been accepted, so the buffer then
    /// holds at most 4 octets (the longest header plus the type), or, behind forwarder
    /// encapsulation headers (0xFE, whose frame also takes the encapsulated message's
    /// header), those headers too; after dropping the first, the accepted frame can be
    /// complete already with octets after it (e.g. `01 02 16 xx`: "01 02 16" is no
    /// header, `02 16` is a PINGREQ).
    fn raw_resync(&mut self) {
        while self.len > 0 {
            let prefix = self.buf.get(..self.len).unwrap_or_default();
            match header::check(prefix, N) {
                header::Check::Frame(total) => {
                    self.raw_expect = total;
                    return;
                }
                header::Check::NeedMore if self.len < N => return,
                // NeedMore with a full buffer only happens for N < 4; any message is
                // then too long.
                header::Check::NeedMore | header::Check::TooLong => {
                    add(&mut self.stats.dropped_overflow, 1);
                    self.raw_drop_one();
                }
                header::Check::Noise => self.raw_drop_one(),
            }
        }
    }

    /// Raw mode: discards the first buffered octet.
    fn raw_drop_one(&mut self) {
        if self.len > 0 {
            self.buf.copy_within(1..self.len, 0);
            self.len -= 1;
            add(&mut self.stats.noise_bytes, 1);
        }
    }

    // ---- COBS --------------------------------------------------------------------

    /// COBS mode: returns the length of the frame, now in `buf[..len]`, when `byte` ends
    /// a good one.
    fn push_cobs(&mut self, byte: u8) -> Option<usize> {
        if byte == 0x00 {
            return if self.end_cobs_frame() { Some(self.len) } else { None };
        }
        let first = self.cobs.seg_len == 0;
        self.cobs.seg_len = self.cobs.seg_len.saturating_add(1);
        if self.cobs.overflow {
            return None;
        }
        if self.cobs.remaining == 0 {
            // A code octet. The block before it stood for its data followed by a zero,
            // unless it was a full 254-octet block (code 0xFF).
            if !first && self.cobs.code != 0xFF {
                self.cobs_emit(0x00);
            }
            self.cobs.code = byte;
            self.cobs.remaining = byte - 1; // byte != 0
        } else {
            self.cobs_emit(byte);
            self.cobs.remaining -= 1;
        }
        None
    }

    /// COBS mode: one decoded octet. The last two are held back in `tail` (they are
    /// the CRC if the frame ends now); older ones go to the buffer and the CRC register.
    fn cobs_emit(&mut self, byte: u8) {
        let c = &mut self.cobs;
        if c.tail_len < 2 {
            if let Some(slot) = c.tail.get_mut(usize::from(c.tail_len)) {
                *slot = byte;
            }
            c.tail_len += 1;
            return;
        }
        let [oldest, newer] = c.tail;
        c.tail = [newer, byte];
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = oldest;
                self.len += 1;
                c.crc = crc::update(c.crc, oldest);
            }
            None => {
                c.overflow = true;
                add(&mut self.stats.dropped_overflow, 1);
            }
        }
    }

    /// COBS mode: a `0x00` delimiter arrived. Checks the frame received since the last
    /// one; true if it is good and delivered.
    fn end_cobs_frame(&mut self) -> bool {
        let c = self.cobs;
        self.cobs = CobsState::IDLE;
        if c.seg_len == 0 {
            // Two delimiters in a row: an empty frame, not an error.
            return false;
        }
        let good = if c.overflow {
            // Already counted when it overflowed.
            false
        } else if c.remaining != 0 || c.tail_len < 2 || self.len < 2 {
            // Ends inside a block, or too short for a message and its CRC.
            add(&mut self.stats.dropped_malformed, 1);
            false
        } else if c.crc != u16::from_be_bytes(c.tail) {
            add(&mut self.stats.dropped_crc, 1);
            false
        } else if !header::announces_own_length(self.buf.get(..self.len).unwrap_or_default()) {
            // Not only a sanity check: the CRC (xorout 0) stays valid when trailing zero
            // octets are removed from message || CRC, and COBS loses exactly one such
            // zero when the final code octet 0x01 is lost or flipped to 0x00. The
            // message then comes out one octet short, with a matching CRC; its length
            // field catches that.
            add(&mut self.stats.dropped_malformed, 1);
            false
        } else {
            true
        };
        if !good {
            add(&mut self.stats.noise_bytes, c.seg_len);
            self.len = 0;
        }
        good
    }
}
