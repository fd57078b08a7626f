//! The client engine over a serial port (feature `uart`).
//!
//! [`UartClient`] owns a [`Client`], a [`FrameDecoder`], a message buffer and an
//! `embedded-hal-nb` 1.0 serial port (anything implementing
//! [`serial::Read<u8>`](embedded_hal_nb::serial::Read) and
//! [`serial::Write<u8>`](embedded_hal_nb::serial::Write), which most HALs' UART drivers
//! do). One call, [`UartClient::poll`], does the whole loop of the
//! [engine's documentation](super): it reads the octets waiting on the port until the port
//! says [`WouldBlock`](embedded_hal_nb::nb::Error::WouldBlock), hands every complete frame to
//! the engine, runs the engine's timers, and writes what the engine wants to send, framed
//! ([`FramingKind`]). Received messages and [`Event`]s come out through a callback, without
//! copying and without an allocator.
//!
//! Nothing blocks: a port whose transmitter is busy (`WouldBlock` on write) keeps the rest
//! of the frame for the next `poll`. The frame is encoded on the fly from the engine's
//! message, so the adapter needs no frame buffer: its memory is the engine, `RX` octets of
//! decoder buffer and `TX` octets of message buffer.
//!
//! ```
//! use embedded_hal_nb::nb;
//! use embedded_hal_nb::serial::{ErrorKind, ErrorType, Read, Write};
//! use sn_codec::client::uart::{Incoming, UartClient};
//! use sn_codec::client::{Config, Event};
//! use sn_codec::framing::FramingKind;
//! use sn_codec::{QoS, TopicRef};
//!
//! /// Stands for the HAL's UART (here: nothing to read, everything written is dropped).
//! struct Uart;
//! impl ErrorType for Uart {
//!     type Error = ErrorKind;
//! }
//! impl Read<u8> for Uart {
//!     fn read(&mut self) -> nb::Result<u8, ErrorKind> {
//!         Err(nb::Error::WouldBlock)
//!     }
//! }
//! impl Write<u8> for Uart {
//!     fn write(&mut self, _byte: u8) -> nb::Result<(), ErrorKind> {
//!         Ok(())
//!     }
//!     fn flush(&mut self) -> nb::Result<(), ErrorKind> {
//!         Ok(())
//!     }
//! }
//!
//! // Engine: 8 topics, 128 bytes of names, 128 bytes of TX; decoder: 128-byte messages.
//! let mut mqtt: UartClient<'_, Uart, 8, 128, 128, 128> =
//!     UartClient::new(Uart, FramingKind::Cobs, Config::new("sensor-42"));
//! let now = 0; // a millisecond clock
//! mqtt.client_mut().connect(now).expect("disconnected, so it can connect");
//! // In the main loop, or whenever the UART has data or `poll_timeout()` has come:
//! let result = mqtt.poll(now, |client, incoming| match incoming {
//!     Incoming::Message(msg) => {
//!         // The payload borrows the adapter's receive buffer: use it here.
//!         let _topic = client.topic_name(&msg.topic);
//!         let _ = msg.payload;
//!     }
//!     Incoming::Event(Event::Connected) => {
//!         let _ = client.publish(now, TopicRef::Short(*b"tp"), b"21.5", QoS::AtMostOnce, false);
//!     }
//!     Incoming::Event(Event::WakeUpDue) => {
//!         let _ = client.wake(now);
//!     }
//!     Incoming::Event(_) => {}
//! });
//! // A serial error is reported after the rest of the poll has run; just carry on.
//! let _ = result;
//! // Then sleep until a byte arrives or until this deadline (ms):
//! let _deadline = mqtt.poll_timeout();
//! ```
#![cfg(feature = "uart")]

use core::fmt;

/// The `embedded-hal-nb` crate this adapter is built on, re-exported so that a port
/// implementation can name the very traits [`UartClient`] needs (`serial::Read<u8>`,
/// `serial::Write<u8>`) and `nb` without a dependency of its own.
pub use embedded_hal_nb;

use embedded_hal_nb::nb;
use embedded_hal_nb::serial::{ErrorType, Read, Write};

use super::{Client, Config, Event, Message};
use crate::framing::{crc16, FrameDecoder, FrameStats, FramingKind};

/// Raw framing: a partial frame older than this many ms is thrown away (see
/// [`FrameDecoder::reset`] and `docs/serial-framing.md`, "The idle gap").
pub const DEFAULT_IDLE_RESET_MS: u32 = 50;

/// What [`UartClient::poll`] hands to its callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Incoming<'m> {
    /// A PUBLISH from the gateway. Its payload borrows the adapter's receive buffer and is
    /// valid only during the callback. Acknowledgements are sent by the engine.
    Message(Message<'m>),
    /// Something that happened in the engine (see [`Client::poll_event`]).
    Event(Event),
}

/// A serial port error seen by [`UartClient::poll`] or [`UartClient::flush`].
///
/// `E` is the port's error type. Such errors are not fatal: whatever they damaged (at most
/// the frame being received or sent) is dropped, and the engine's retransmissions recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UartError<E> {
    /// Reading failed (overrun, parity, framing or noise error): the frame being received
    /// was thrown away and reading stopped until the next `poll`.
    Read(E),
    /// Writing failed: the rest of the frame being sent was dropped (the receiver discards
    /// the partial frame).
    Write(E),
}

impl<E: fmt::Debug> fmt::Display for UartError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UartError::Read(e) => write!(f, "serial read error: {e:?}"),
            UartError::Write(e) => write!(f, "serial write error: {e:?}"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug> std::error::Error for UartError<E> {}

/// Counters kept by a [`UartClient`] (the decoder's are in [`UartClient::frame_stats`]).
/// They wrap around at `u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct UartStats {
    /// Frames written completely.
    pub frames_sent: u32,
    /// Frames received intact that the engine rejected as malformed MQTT-SN.
    pub malformed: u32,
    /// Errors returned by the port's `read`.
    pub read_errors: u32,
    /// Errors returned by the port's `write` or `flush`.
    pub write_errors: u32,
}

/// Where the frame being written stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// No frame in progress.
    Idle,
    /// Raw: the next octet is `message[pos]`.
    Raw { pos: usize },
    /// COBS: the leading `0x00`.
    Lead,
    /// COBS: the code octet of the block starting at input position `start`.
    Code { start: usize },
    /// COBS: data octet `pos` of a block ending (exclusive) at `end`; `full` for a
    /// 254-octet block (code `0xFF`, no zero after it).
    Data { pos: usize, end: usize, full: bool },
    /// COBS: the trailing `0x00`.
    Trail,
}

/// A frame being written, encoded one octet at a time from the message in the adapter's
/// buffer. COBS input is `message || CRC-16 big-endian`, as in
/// [`encode_frame`](crate::framing::encode_frame), which it reproduces octet for octet.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    step: Step,
    /// Octets of the message.
    len: usize,
    /// CRC-16 of the message, big-endian.
    crc: [u8; 2],
}

impl Outgoing {
    const IDLE: Outgoing = Outgoing {
        step: Step::Idle,
        len: 0,
        crc: [0; 2],
    };

    fn start(kind: FramingKind, message: &[u8]) -> Self {
        match kind {
            FramingKind::Raw => Outgoing {
                step: if message.is_empty() {
                    Step::Idle
                } else {
                    Step::Raw { pos: 0 }
                },
                len: message.len(),
                crc: [0; 2],
            },
            FramingKind::Cobs => Outgoing {
                step: Step::Lead,
                len: message.len(),
                crc: crc16(message).to_be_bytes(),
            },
        }
    }

    /// Octet `i` of the COBS input (message, then CRC); 0 past its end.
    fn input(&self, message: &[u8], i: usize) -> u8 {
        match i.checked_sub(self.len) {
            None => message.get(i).copied().unwrap_or(0),
            Some(j) => self.crc.get(j).copied().unwrap_or(0),
        }
    }

    /// Length of the COBS input.
    fn input_len(&self) -> usize {
        self.len + 2
    }

    /// Non-zero octets from `start`, at most 254 (one COBS block's data).
    fn run(&self, message: &[u8], start: usize) -> usize {
        let end = self.input_len().min(start.saturating_add(254));
        (start..end).take_while(|&i| self.input(message, i) != 0).count()
    }

    /// The octet to write next, if a frame is in progress.
    fn peek(&self, message: &[u8]) -> Option<u8> {
        match self.step {
            Step::Idle => None,
            Step::Raw { pos } => message.get(pos).copied(),
            Step::Lead | Step::Trail => Some(0x00),
            // A run is at most 254, so the code is at most 0xFF.
            Step::Code { start } => Some(self.run(message, start) as u8 + 1),
            Step::Data { pos, .. } => Some(self.input(message, pos)),
        }
    }

    /// Moves past the octet [`Self::peek`] returned.
    fn advance(&mut self, message: &[u8]) {
        self.step = match self.step {
            Step::Idle => Step::Idle,
            Step::Raw { pos } => {
                if pos + 1 >= self.len {
                    Step::Idle
                } else {
                    Step::Raw { pos: pos + 1 }
                }
            }
            Step::Lead => Step::Code { start: 0 },
            Step::Code { start } => {
                let k = self.run(message, start);
                if k == 0 {
                    self.after_block(start, false)
                } else {
                    Step::Data {
                        pos: start,
                        end: start + k,
                        full: k == 254,
                    }
                }
            }
            Step::Data { pos, end, full } => {
                if pos + 1 >= end {
                    self.after_block(end, full)
                } else {
                    Step::Data {
                        pos: pos + 1,
                        end,
                        full,
                    }
                }
            }
            Step::Trail => Step::Idle,
        };
    }

    /// The step after a block whose data ended at input position `end`.
    fn after_block(&self, end: usize, full: bool) -> Step {
        if full {
            // No zero after a 254-octet block; a block (maybe empty, code 0x01) follows.
            Step::Code { start: end }
        } else if end >= self.input_len() {
            Step::Trail
        } else {
            // input[end] is the zero this block's code stands for.
            Step::Code { start: end + 1 }
        }
    }
}

/// The MQTT-SN client engine driven over an `embedded-hal-nb` serial port. See the
/// [module documentation](self).
///
/// - `S`: the serial port,
/// - `TOPICS`, `NAMES`, `TX`: the [`Client`]'s parameters; `TX` also sizes the buffer
///   each outgoing message is encoded into, which must also hold the will message plus 4,
/// - `RX`: the longest message received (the [`FrameDecoder`]'s capacity); longer frames
///   are dropped and counted.
#[derive(Debug, Clone)]
pub struct UartClient<
    'a,
    S,
    const TOPICS: usize = 8,
    const NAMES: usize = 128,
    const TX: usize = 128,
    const RX: usize = 128,
> {
    serial: S,
    client: Client<'a, TOPICS, NAMES, TX>,
    decoder: FrameDecoder<RX>,
    /// The message being framed onto the port.
    out: [u8; TX],
    outgoing: Outgoing,
    stats: UartStats,
    /// When the last octet was read (ms), for the raw framing's idle reset.
    last_rx: u64,
    idle_reset_ms: u32,
}

impl<'a, S, const TOPICS: usize, const NAMES: usize, const TX: usize, const RX: usize>
    UartClient<'a, S, TOPICS, NAMES, TX, RX>
where
    S: Read<u8> + Write<u8>,
{
    /// An adapter with a new, disconnected engine made from `config`, speaking `framing`
    /// on `serial`.
    pub const fn new(serial: S, framing: FramingKind, config: Config<'a>) -> Self {
        Self::from_client(serial, framing, Client::new(config))
    }

    /// An adapter around an existing engine (e.g. one whose message id counter was
    /// restored with [`Client::set_next_msg_id`]).
    pub const fn from_client(serial: S, framing: FramingKind, client: Client<'a, TOPICS, NAMES, TX>) -> Self {
        UartClient {
            serial,
            client,
            decoder: FrameDecoder::new(framing),
            out: [0; TX],
            outgoing: Outgoing::IDLE,
            stats: UartStats {
                frames_sent: 0,
                malformed: 0,
                read_errors: 0,
                write_errors: 0,
            },
            last_rx: 0,
            idle_reset_ms: DEFAULT_IDLE_RESET_MS,
        }
    }

    /// The engine, for its state and topic table.
    pub fn client(&self) -> &Client<'a, TOPICS, NAMES, TX> {
        &self.client
    }

    /// The engine, to start operations ([`Client::connect`], [`Client::publish`], ...).
    /// What they queue is written by the next [`poll`](Self::poll) (or
    /// [`flush`](Self::flush)). Do not call its `poll_transmit`, `poll_event` or
    /// `handle_*` methods yourself: the adapter does.
    pub fn client_mut(&mut self) -> &mut Client<'a, TOPICS, NAMES, TX> {
        &mut self.client
    }

    /// The serial port.
    pub fn serial(&self) -> &S {
        &self.serial
    }

    /// The serial port, e.g. to change its baud rate. Reading or writing it directly
    /// desynchronises the framing.
    pub fn serial_mut(&mut self) -> &mut S {
        &mut self.serial
    }

    /// Takes the adapter apart. A frame being written is abandoned.
    pub fn release(self) -> (S, Client<'a, TOPICS, NAMES, TX>) {
        (self.serial, self.client)
    }

    /// The framing spoken on the port.
    pub fn framing(&self) -> FramingKind {
        self.decoder.kind()
    }

    /// The receive side's counters: frames received, and frames dropped (bad CRC, broken,
    /// too long) with the octets of noise.
    pub fn frame_stats(&self) -> FrameStats {
        self.decoder.stats()
    }

    /// The adapter's own counters.
    pub fn stats(&self) -> UartStats {
        self.stats
    }

    /// Raw framing: after how many ms without input a partial frame is thrown away
    /// (default [`DEFAULT_IDLE_RESET_MS`]; 0 disables it). Ignored with COBS, which needs
    /// no idle reset. `poll` must be called within this time of a frame's first octets
    /// arriving and again after the rest: a port with a deep receive FIFO or a slow
    /// caller needs a larger value.
    pub fn set_idle_reset_ms(&mut self, ms: u32) {
        self.idle_reset_ms = ms;
    }

    /// Whether part of a frame, or a message the engine queued, waits to be written
    /// (the port said `WouldBlock`): call [`poll`](Self::poll) or
    /// [`flush`](Self::flush) again soon. Before powering the UART down (after
    /// [`Event::Asleep`]), wait until this is false and the port is flushed.
    pub fn has_pending_output(&self) -> bool {
        self.outgoing.step != Step::Idle || self.client.has_transmit()
    }

    /// When [`poll`](Self::poll) must be called next (ms) if no octet arrives: the
    /// engine's [`Client::poll_timeout`], or the raw framing's idle reset. `None` if no
    /// timer runs. May be in the past. Does not include pending output: see
    /// [`has_pending_output`](Self::has_pending_output).
    pub fn poll_timeout(&self) -> Option<u64> {
        let engine = self.client.poll_timeout();
        let idle = self
            .idle_reset_due()
            .then(|| self.last_rx.saturating_add(u64::from(self.idle_reset_ms)));
        match (engine, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn idle_reset_due(&self) -> bool {
        self.decoder.kind() == FramingKind::Raw && self.idle_reset_ms > 0 && self.decoder.has_partial()
    }

    /// Runs everything that is due at `now` (ms, the same clock as the engine's):
    ///
    /// 1. hands out the events queued by operations called since the last poll,
    /// 2. reads octets until the port says `WouldBlock`, handing every complete frame
    ///    to the engine ([`Client::handle_datagram`]); a received PUBLISH goes to
    ///    `on_incoming` as [`Incoming::Message`], and the events each frame causes as
    ///    [`Incoming::Event`],
    /// 3. runs the engine's timers if due ([`Client::handle_timeout`]: retransmissions,
    ///    keep-alive, the wake-up signal) and hands out their events,
    /// 4. writes, framed, every message the engine has to send, until the port says
    ///    `WouldBlock` (the rest waits for the next poll).
    ///
    /// `on_incoming` also gets the engine, so that it can react at once (subscribe on
    /// [`Event::Connected`], [`Client::wake`] on [`Event::WakeUpDue`], resolve a topic id
    /// with [`Client::topic_name`]); what it queues is written in step 4 of the same poll.
    ///
    /// A serial error ends the read or write step it happened in; the other steps still
    /// run and the first error is returned. It is safe to keep polling after one.
    pub fn poll<F>(&mut self, now: u64, mut on_incoming: F) -> Result<(), UartError<S::Error>>
    where
        F: FnMut(&mut Client<'a, TOPICS, NAMES, TX>, Incoming<'_>),
    {
        Self::drain_events(&mut self.client, &mut on_incoming);
        let read = self.read(now, &mut on_incoming);
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
            Self::drain_events(&mut self.client, &mut on_incoming);
        }
        let write = match self.write() {
            Ok(()) | Err(nb::Error::WouldBlock) => Ok(()),
            Err(nb::Error::Other(e)) => Err(e),
        };
        read.and(write)
    }

    /// Writes everything pending (as step 4 of [`poll`](Self::poll)), then flushes the
    /// port. `WouldBlock` until both are done: call it again (e.g. with
    /// `nb::block!`) before powering the UART down. Reads nothing.
    pub fn flush(&mut self) -> nb::Result<(), UartError<S::Error>> {
        self.write()?;
        self.serial.flush().map_err(|e| {
            e.map(|e| {
                self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
                UartError::Write(e)
            })
        })
    }

    fn drain_events<F>(client: &mut Client<'a, TOPICS, NAMES, TX>, on_incoming: &mut F)
    where
        F: FnMut(&mut Client<'a, TOPICS, NAMES, TX>, Incoming<'_>),
    {
        while let Some(event) = client.poll_event() {
            on_incoming(client, Incoming::Event(event));
        }
    }

    /// Step 2 of `poll`.
    fn read<F>(&mut self, now: u64, on_incoming: &mut F) -> Result<(), UartError<<S as ErrorType>::Error>>
    where
        F: FnMut(&mut Client<'a, TOPICS, NAMES, TX>, Incoming<'_>),
    {
        if self.idle_reset_due() && now.saturating_sub(self.last_rx) >= u64::from(self.idle_reset_ms) {
            self.decoder.reset();
        }
        loop {
            let byte = match self.serial.read() {
                Ok(byte) => byte,
                Err(nb::Error::WouldBlock) => return Ok(()),
                Err(nb::Error::Other(e)) => {
                    // The octet is lost or damaged, and with it the frame in progress.
                    self.stats.read_errors = self.stats.read_errors.wrapping_add(1);
                    self.decoder.reset();
                    return Err(UartError::Read(e));
                }
            };
            self.last_rx = now;
            let Some(frame) = self.decoder.push(byte) else {
                continue;
            };
            match self.client.handle_datagram(now, frame) {
                Ok(Some(message)) => on_incoming(&mut self.client, Incoming::Message(message)),
                Ok(None) => {}
                Err(_) => self.stats.malformed = self.stats.malformed.wrapping_add(1),
            }
            Self::drain_events(&mut self.client, on_incoming);
        }
    }

    /// Writes octets until there is nothing left or the port blocks.
    fn write(&mut self) -> nb::Result<(), UartError<<S as ErrorType>::Error>> {
        loop {
            if self.outgoing.step == Step::Idle {
                let Some(n) = self.client.poll_transmit(&mut self.out) else {
                    return Ok(());
                };
                self.outgoing = Outgoing::start(self.decoder.kind(), self.out.get(..n).unwrap_or_default());
            }
            let message = self.out.get(..self.outgoing.len).unwrap_or_default();
            let Some(byte) = self.outgoing.peek(message) else {
                self.outgoing = Outgoing::IDLE;
                continue;
            };
            match self.serial.write(byte) {
                Ok(()) => {
                    self.outgoing.advance(message);
                    if self.outgoing.step == Step::Idle {
                        self.stats.frames_sent = self.stats.frames_sent.wrapping_add(1);
                    }
                }
                Err(nb::Error::WouldBlock) => return Err(nb::Error::WouldBlock),
                Err(nb::Error::Other(e)) => {
                    self.outgoing = Outgoing::IDLE;
                    self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
                    return Err(nb::Error::Other(UartError::Write(e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Outgoing, Step};
    use crate::framing::{encode_frame, max_encoded_len, FramingKind};

    /// Everything the streaming encoder writes for `message`.
    fn stream(kind: FramingKind, message: &[u8]) -> ([u8; 1200], usize) {
        let mut out = [0u8; 1200];
        let mut n = 0;
        let mut o = Outgoing::start(kind, message);
        while let Some(b) = o.peek(message) {
            out[n] = b;
            n += 1;
            o.advance(message);
        }
        assert_eq!(o.step, Step::Idle);
        (out, n)
    }

    fn check(kind: FramingKind, message: &[u8]) {
        let mut want = [0u8; 1200];
        assert!(max_encoded_len(kind, message.len()) <= want.len());
        let m = encode_frame(kind, message, &mut want).expect("fits");
        let (got, n) = stream(kind, message);
        assert_eq!(&got[..n], &want[..m], "{kind} frame of {} octets", message.len());
    }

    #[test]
    fn streaming_encoder_matches_encode_frame() {
        let mut buf = [0u8; 1000];
        for len in (0..600).chain([761, 762, 763, 764, 999, 1000]) {
            // All non-zero (254-octet blocks and their edges), zeros every 7th octet,
            // all zero, and zeros around the block boundaries.
            for pattern in 0..4u8 {
                for (i, b) in buf.iter_mut().enumerate().take(len) {
                    *b = match pattern {
                        0 => (i % 255) as u8 + 1,
                        1 => (i % 7) as u8 * 37,
                        2 => 0,
                        _ => u8::from(i % 254 != 253),
                    };
                }
                check(FramingKind::Cobs, &buf[..len]);
                check(FramingKind::Raw, &buf[..len]);
            }
        }
    }
}
