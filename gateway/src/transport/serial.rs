//! Serial ports: each one a task that opens the port, cuts the byte stream into
//! MQTT-SN messages with [`sn_codec::framing`], hands them to the engine as datagrams
//! from [`LinkAddr::Serial`]`(index)`, and writes the engine's messages back framed.
//!
//! A port that cannot be opened, or that goes away (USB adapter unplugged, read or
//! write error, end of file), is reopened with exponential back-off while every other
//! port and UDP keep being served. The runtime is told with [`LinkEvent`]s, so that the
//! engine can lose the sessions of a port that went away and advertise on one that
//! came up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sn_codec::framing::{encode_frame, max_encoded_len, FrameDecoder, FrameStats, FramingKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_serial::{DataBits, FlowControl, Parity, SerialStream, StopBits};
use tracing::{debug, info, warn};

use crate::link::LinkAddr;
use crate::transport::udp::Inbound;

/// Largest message accepted from a device; longer frames are dropped and counted in
/// [`SerialPortStats::dropped_overflow`]. MQTT-SN messages on serial links are short;
/// this bounds what a raw-framing length octet mangled by noise can swallow.
pub const MAX_FRAME: usize = 4096;

/// First wait before reopening a port that failed or went away.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to open a port.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A port that stayed open this long is reopened quickly after it goes away; one that
/// keeps failing right after opening backs off.
const STABLE: Duration = Duration::from_secs(2);
/// Raw framing: the line idle this long (or [`IDLE_GAP_CHARS`] character times, if
/// longer) ends a partial frame. Above the 1 to 16 ms latency timers of USB adapters.
pub const IDLE_GAP_MIN: Duration = Duration::from_millis(50);
/// Raw framing: the idle gap in character times, at slow baud rates.
pub const IDLE_GAP_CHARS: u32 = 4;
/// Messages queued towards one port; more are dropped (counted in
/// [`SerialPortStats::send_dropped`]).
const QUEUE: usize = 1024;

/// One serial port's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialPortConfig {
    /// Device path, e.g. `/dev/ttyUSB0` or a stable `/dev/serial/by-id/...` link.
    pub path: PathBuf,
    /// Baud rate.
    pub baud: u32,
    /// Data bits (5 to 8; MQTT-SN needs 8).
    pub data_bits: DataBits,
    /// Parity.
    pub parity: Parity,
    /// Stop bits.
    pub stop_bits: StopBits,
    /// How messages are delimited on the line.
    pub framing: FramingKind,
}

impl SerialPortConfig {
    /// 115200 8N1, COBS framing.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SerialPortConfig {
            path: path.into(),
            baud: 115_200,
            data_bits: DataBits::Eight,
            parity: Parity::None,
            stop_bits: StopBits::One,
            framing: FramingKind::Cobs,
        }
    }

    /// Time one character takes on the line (start bit, data, parity, stop bits).
    pub fn char_time(&self) -> Duration {
        let data = match self.data_bits {
            DataBits::Five => 5,
            DataBits::Six => 6,
            DataBits::Seven => 7,
            DataBits::Eight => 8,
        };
        let parity = u32::from(self.parity != Parity::None);
        let stop = match self.stop_bits {
            StopBits::One => 1,
            StopBits::Two => 2,
        };
        let bits = 1 + data + parity + stop;
        Duration::from_secs_f64(f64::from(bits) / f64::from(self.baud.max(1)))
    }

    /// Raw framing: how long the line must be idle before a partial frame is dropped.
    pub fn idle_gap(&self) -> Duration {
        (self.char_time() * IDLE_GAP_CHARS).max(IDLE_GAP_MIN)
    }

    /// The settings as usually written, e.g. `115200 8N1 cobs`.
    pub fn describe(&self) -> String {
        let data = match self.data_bits {
            DataBits::Five => '5',
            DataBits::Six => '6',
            DataBits::Seven => '7',
            DataBits::Eight => '8',
        };
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Odd => 'O',
            Parity::Even => 'E',
        };
        let stop = match self.stop_bits {
            StopBits::One => '1',
            StopBits::Two => '2',
        };
        format!("{} {data}{parity}{stop} {}", self.baud, self.framing)
    }
}

/// A serial port came up or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The port is open: devices on it can be reached.
    Up(LinkAddr),
    /// The port went away: its devices are unreachable until it comes back.
    Down(LinkAddr),
}

/// Counters of one serial port, since the gateway started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialPortStats {
    /// The configured path.
    pub path: PathBuf,
    /// Whether the port is open now.
    pub open: bool,
    /// Times the port was opened.
    pub opens: u64,
    /// Failed attempts to open it.
    pub open_failures: u64,
    /// Times it went away after being opened.
    pub disconnects: u64,
    /// Octets read.
    pub bytes_in: u64,
    /// Octets written.
    pub bytes_out: u64,
    /// Messages received and handed to the engine.
    pub frames_in: u64,
    /// Messages written.
    pub frames_out: u64,
    /// Frames dropped for a bad CRC (COBS framing).
    pub dropped_crc: u64,
    /// Frames dropped as malformed, or partial frames dropped after an idle gap.
    pub dropped_malformed: u64,
    /// Frames dropped for being longer than [`MAX_FRAME`].
    pub dropped_overflow: u64,
    /// Octets thrown away (line noise, dropped frames).
    pub noise_bytes: u64,
    /// Messages for the port not written: the port was closed, its queue was full, or
    /// a write timed out.
    pub send_dropped: u64,
}

impl SerialPortStats {
    /// Received frames dropped, whatever the reason.
    pub fn frames_dropped(&self) -> u64 {
        self.dropped_crc + self.dropped_malformed + self.dropped_overflow
    }
}

#[derive(Debug, Default)]
struct Counters {
    open: AtomicBool,
    opens: AtomicU64,
    open_failures: AtomicU64,
    disconnects: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    dropped_crc: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_overflow: AtomicU64,
    noise_bytes: AtomicU64,
    send_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self, path: &std::path::Path) -> SerialPortStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SerialPortStats {
            path: path.to_path_buf(),
            open: self.open.load(Ordering::Relaxed),
            opens: get(&self.opens),
            open_failures: get(&self.open_failures),
            disconnects: get(&self.disconnects),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            dropped_crc: get(&self.dropped_crc),
            dropped_malformed: get(&self.dropped_malformed),
            dropped_overflow: get(&self.dropped_overflow),
            noise_bytes: get(&self.noise_bytes),
            send_dropped: get(&self.send_dropped),
        }
    }
}

/// A cloneable view of every port's counters.
#[derive(Debug, Clone, Default)]
pub struct SerialStatsReader {
    ports: Vec<(PathBuf, Arc<Counters>)>,
}

impl SerialStatsReader {
    /// The counters of every port, in configuration order.
    pub fn read(&self) -> Vec<SerialPortStats> {
        self.ports.iter().map(|(path, c)| c.snapshot(path)).collect()
    }
}

struct Port {
    tx: mpsc::Sender<Vec<u8>>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

/// The running serial ports, indexed as in the configuration.
#[derive(Default)]
pub struct SerialPorts {
    ports: Vec<Port>,
    reader: SerialStatsReader,
}

impl std::fmt::Debug for SerialPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPorts")
            .field("ports", &self.reader.read())
            .finish()
    }
}

impl SerialPorts {
    /// Starts one task per port. Messages received go to `inbound`; ports coming up and
    /// going away are told on `events`. The tasks end when the [`SerialPorts`] is
    /// dropped or either channel closes.
    pub fn spawn(
        configs: &[SerialPortConfig],
        inbound: mpsc::Sender<Inbound>,
        events: mpsc::Sender<LinkEvent>,
    ) -> Result<Self, String> {
        let mut ports = Vec::new();
        let mut reader = SerialStatsReader::default();
        for (i, cfg) in configs.iter().enumerate() {
            let index = u16::try_from(i).map_err(|_| "too many serial ports".to_string())?;
            let (tx, rx) = mpsc::channel(QUEUE);
            let counters = Arc::new(Counters::default());
            let task = tokio::spawn(run_port(
                index,
                cfg.clone(),
                rx,
                inbound.clone(),
                events.clone(),
                counters.clone(),
            ));
            reader.ports.push((cfg.path.clone(), counters.clone()));
            ports.push(Port { tx, counters, task });
        }
        Ok(SerialPorts { ports, reader })
    }

    /// Number of configured ports.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether no port is configured.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Queues one MQTT-SN message for port `index`; it is framed and written by the
    /// port's task. Dropped (and counted) when the port is not open or its queue is
    /// full: like a radio, a serial link may lose messages, and the protocol's
    /// retransmissions cover for it.
    pub fn send(&self, index: u16, message: Vec<u8>) {
        let Some(port) = self.ports.get(usize::from(index)) else {
            return;
        };
        if !port.counters.open.load(Ordering::Relaxed) || port.tx.try_send(message).is_err() {
            bump(&port.counters.send_dropped, 1);
        }
    }

    /// Every port's counters.
    pub fn stats(&self) -> Vec<SerialPortStats> {
        self.reader.read()
    }

    /// A view of the counters that outlives this handle's borrow.
    pub fn stats_reader(&self) -> SerialStatsReader {
        self.reader.clone()
    }
}

impl Drop for SerialPorts {
    fn drop(&mut self) {
        for p in &self.ports {
            p.task.abort();
        }
    }
}

/// Why serving an open port stopped.
enum End {
    /// The gateway is stopping.
    Shutdown,
    /// The port failed or went away.
    Lost(String),
}

fn open(cfg: &SerialPortConfig) -> tokio_serial::Result<SerialStream> {
    let builder = tokio_serial::new(cfg.path.to_string_lossy(), cfg.baud)
        .data_bits(cfg.data_bits)
        .parity(cfg.parity)
        .stop_bits(cfg.stop_bits)
        .flow_control(FlowControl::None);
    SerialStream::open(&builder)
}

/// Waits `d`, throwing away what the engine sends meanwhile. False when the gateway
/// is stopping.
async fn wait_closed(outbound: &mut mpsc::Receiver<Vec<u8>>, d: Duration, counters: &Counters) -> bool {
    let until = Instant::now() + d;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            m = outbound.recv() => match m {
                Some(_) => bump(&counters.send_dropped, 1),
                None => return false,
            },
        }
    }
}

async fn run_port(
    index: u16,
    cfg: SerialPortConfig,
    mut outbound: mpsc::Receiver<Vec<u8>>,
    inbound: mpsc::Sender<Inbound>,
    events: mpsc::Sender<LinkEvent>,
    counters: Arc<Counters>,
) {
    let link = LinkAddr::Serial(index);
    let path = cfg.path.display().to_string();
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u64;
    loop {
        let stream = match open(&cfg) {
            Ok(s) => s,
            Err(e) => {
                bump(&counters.open_failures, 1);
                if failures == 0 {
                    warn!(port = index, %path, error = %e, "cannot open serial port; retrying with back-off up to {MAX_BACKOFF:?}");
                } else {
                    debug!(port = index, %path, error = %e, attempt = failures + 1, "cannot open serial port");
                }
                failures += 1;
                if !wait_closed(&mut outbound, backoff, &counters).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // Whatever was queued while the port was closed is stale.
        while outbound.try_recv().is_ok() {
            bump(&counters.send_dropped, 1);
        }
        failures = 0;
        bump(&counters.opens, 1);
        counters.open.store(true, Ordering::Relaxed);
        info!(port = index, %path, settings = %cfg.describe(), "serving MQTT-SN on serial port");
        if events.send(LinkEvent::Up(link.clone())).await.is_err() {
            return;
        }
        let opened = Instant::now();
        let end = serve(index, &cfg, stream, &mut outbound, &inbound, &counters).await;
        counters.open.store(false, Ordering::Relaxed);
        match end {
            End::Shutdown => return,
            End::Lost(reason) => {
                bump(&counters.disconnects, 1);
                warn!(port = index, %path, %reason, "serial port lost; its clients are lost; reopening");
                if events.send(LinkEvent::Down(link.clone())).await.is_err() {
                    return;
                }
            }
        }
        if opened.elapsed() >= STABLE {
            backoff = MIN_BACKOFF;
        }
        if !wait_closed(&mut outbound, backoff, &counters).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Adds what the decoder counted since `prev` to the port's counters; logs drops.
fn account(index: u16, now: FrameStats, prev: &mut FrameStats, counters: &Counters) {
    let delta = |a: u32, b: u32| u64::from(a.wrapping_sub(b));
    let crc = delta(now.dropped_crc, prev.dropped_crc);
    let malformed = delta(now.dropped_malformed, prev.dropped_malformed);
    let overflow = delta(now.dropped_overflow, prev.dropped_overflow);
    let noise = delta(now.noise_bytes, prev.noise_bytes);
    if crc + malformed + overflow + noise > 0 {
        bump(&counters.dropped_crc, crc);
        bump(&counters.dropped_malformed, malformed);
        bump(&counters.dropped_overflow, overflow);
        bump(&counters.noise_bytes, noise);
        debug!(
            port = index,
            bad_crc = crc,
            malformed,
            too_long = overflow,
            noise_bytes = noise,
            "serial frames dropped"
        );
    }
    *prev = now;
}

async fn serve(
    index: u16,
    cfg: &SerialPortConfig,
    mut stream: SerialStream,
    outbound: &mut mpsc::Receiver<Vec<u8>>,
    inbound: &mpsc::Sender<Inbound>,
    counters: &Counters,
) -> End {
    let link = LinkAddr::Serial(index);
    let mut decoder = Box::new(FrameDecoder::<MAX_FRAME>::new(cfg.framing));
    let mut prev = decoder.stats();
    let idle_gap = cfg.idle_gap();
    let char_time = cfg.char_time();
    let mut buf = vec![0u8; 4096];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    let mut last_rx = Instant::now();
    loop {
        // Raw framing only: COBS resynchronises on the next delimiter by itself, and
        // resetting it could only drop a good frame that arrived in two bursts.
        let idle_deadline = (cfg.framing == FramingKind::Raw && decoder.has_partial()).then(|| last_rx + idle_gap);
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r {
                    Ok(0) => return End::Lost("end of file".into()),
                    Ok(n) => n,
                    Err(e) => return End::Lost(e.to_string()),
                };
                last_rx = Instant::now();
                bump(&counters.bytes_in, n as u64);
                decoder.feed(buf.get(..n).unwrap_or_default(), |frame| frames.push(frame.to_vec()));
                account(index, decoder.stats(), &mut prev, counters);
                for frame in frames.drain(..) {
                    bump(&counters.frames_in, 1);
                    if inbound.send((link.clone(), frame)).await.is_err() {
                        return End::Shutdown;
                    }
                }
            }
            m = outbound.recv() => {
                let Some(message) = m else {
                    return End::Shutdown;
                };
                out.resize(max_encoded_len(cfg.framing, message.len()), 0);
                let n = match encode_frame(cfg.framing, &message, &mut out) {
                    Ok(n) => n,
                    Err(e) => {
                        bump(&counters.send_dropped, 1);
                        debug!(port = index, error = %e, "cannot frame message");
                        continue;
                    }
                };
                // A line nobody drains (flow control, a pty with no reader) must not
                // stall reading; the frame is given up instead.
                let limit = Duration::from_secs(1) + char_time * u32::try_from(2 * n).unwrap_or(u32::MAX);
                match tokio::time::timeout(limit, stream.write_all(out.get(..n).unwrap_or_default())).await {
                    Ok(Ok(())) => {
                        bump(&counters.frames_out, 1);
                        bump(&counters.bytes_out, n as u64);
                    }
                    Ok(Err(e)) => return End::Lost(e.to_string()),
                    Err(_) => {
                        bump(&counters.send_dropped, 1);
                        warn!(port = index, "serial write timed out; message dropped");
                    }
                }
            }
            _ = tokio::time::sleep_until(idle_deadline.unwrap_or(last_rx)), if idle_deadline.is_some() => {
                decoder.reset();
                account(index, decoder.stats(), &mut prev, counters);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_gap_is_50_ms_or_four_characters() {
        let fast = SerialPortConfig::new("/dev/null");
        assert_eq!(fast.idle_gap(), IDLE_GAP_MIN);
        let slow = SerialPortConfig {
            baud: 300,
            parity: Parity::Even,
            stop_bits: StopBits::Two,
            ..SerialPortConfig::new("/dev/null")
        };
        // 12 bits per character at 300 baud: 40 ms each.
        assert_eq!(slow.char_time(), Duration::from_millis(40));
        assert_eq!(slow.idle_gap(), Duration::from_millis(160));
        assert_eq!(slow.describe(), "300 8E2 cobs");
    }
}
