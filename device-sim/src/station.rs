//! The thin async shell of one device: a UDP socket towards the gateway, the radio model
//! applied in both directions, and the clock.
//!
//! The device's logic (the sans-IO [`sn_codec::client::Client`] plus what the application
//! does with it) calls [`Station::send`] for each datagram the engine emits and
//! [`Station::wait`] to sleep until a datagram arrives or a deadline passes.

use std::io;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::dtls::{Credentials, DtlsClient, DtlsError, HANDSHAKE_TIMEOUT};
use crate::radio::{DelayQueue, Fate, LinkModel};

/// Longest datagram accepted from the gateway.
pub const MAX_DATAGRAM: usize = 2048;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process-wide monotonic origin of every time in the simulator.
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// The process's epoch in microseconds of the system clock (Unix time): what a parent
/// hands its worker processes so that all of them stamp payloads on one clock.
pub fn epoch_unix_us() -> u64 {
    let e = epoch();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(e.elapsed());
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

/// Sets this process's epoch to `unix_us` (a parent's [`epoch_unix_us`]), before anything
/// read the clock; false if the epoch was already fixed. A worker's stamps and its
/// parent's verifier then share one clock (to the accuracy of the system clock's reading).
pub fn set_epoch_unix_us(unix_us: u64) -> bool {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ago = now_unix.saturating_sub(Duration::from_micros(unix_us));
    let now = Instant::now();
    let at = now.checked_sub(ago).unwrap_or(now);
    EPOCH.set(at).is_ok()
}

/// Milliseconds since [`epoch`]: the `now` handed to the client engine.
pub fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Microseconds since [`epoch`]: the timestamps carried in payloads.
pub fn now_us() -> u64 {
    u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn instant_at(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch() + Duration::from_millis(ms))
}

/// Counters of what the radio did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RadioCounters {
    /// Datagrams sent towards the gateway (before the radio model).
    pub sent: u64,
    /// Datagrams received from the gateway (before the radio model).
    pub received: u64,
    /// Datagrams the radio dropped (both directions).
    pub dropped: u64,
    /// Of which, datagrams from the gateway.
    pub dropped_down: u64,
    /// Extra copies the radio made (both directions).
    pub duplicated: u64,
}

struct Radio {
    model: LinkModel,
    rng: SmallRng,
    up: DelayQueue,
    down: DelayQueue,
    /// When the link is free again, per direction (bandwidth cap).
    up_busy_until: u64,
    down_busy_until: u64,
}

/// Queues a datagram behind the ones already on the link: returns how long until its last
/// bit is sent, and marks the link busy until then.
fn airtime(model: &LinkModel, busy_until: &mut u64, now: u64, len: usize) -> u64 {
    let t = model.airtime_ms(len);
    if t == 0 {
        return 0;
    }
    let end = (*busy_until).max(now) + t;
    *busy_until = end;
    end - now
}

/// What [`Station::wait`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A datagram of this length from the gateway is in [`Station::datagram`].
    Datagram(usize),
    /// The deadline passed.
    Deadline,
}

/// A device's end of an in-memory network (no sockets): datagrams to the gateway are
/// tagged with the device's id; the gateway answers on the device's own channel.
#[derive(Debug)]
pub struct MemoryPort {
    /// The device's id on the network.
    pub id: u32,
    /// Towards the gateway.
    pub to_gateway: mpsc::UnboundedSender<(u32, Vec<u8>)>,
    /// From the gateway.
    pub from_gateway: mpsc::UnboundedReceiver<Vec<u8>>,
}

enum Link {
    Udp {
        sock: UdpSocket,
        gateway: SocketAddr,
    },
    Memory(MemoryPort),
    /// UDP with every datagram one DTLS record (the handshake done at bind).
    Dtls {
        sock: UdpSocket,
        gateway: SocketAddr,
        session: Box<DtlsClient>,
    },
}

/// Copies a decrypted datagram into `buf`.
fn deliver(data: &[u8], buf: &mut [u8]) -> Option<usize> {
    let len = data.len().min(buf.len());
    buf.get_mut(..len)?.copy_from_slice(data.get(..len)?);
    Some(len)
}

/// Feeds a record from the gateway to the session; sends what it answers (a
/// retransmitted flight, an alert) without waiting.
fn dtls_record(sock: &UdpSocket, gateway: SocketAddr, session: &mut DtlsClient, record: &[u8]) {
    if let Err(e) = session.handle_record(Instant::now(), record) {
        tracing::debug!(error = %e, "DTLS record from the gateway dropped");
    }
    while let Some(r) = session.poll_transmit() {
        let _ = sock.try_send_to(&r, gateway);
    }
}

/// Receives one datagram from the gateway into `buf`; `None` for something to ignore.
async fn recv_link(link: &mut Link, buf: &mut [u8]) -> Option<usize> {
    match link {
        Link::Udp { sock, gateway } => {
            let (len, from) = sock.recv_from(buf).await.ok()?;
            (from == *gateway).then_some(len)
        }
        Link::Dtls { sock, gateway, session } => {
            if let Some(d) = session.poll_received() {
                return deliver(&d, buf);
            }
            let (len, from) = sock.recv_from(buf).await.ok()?;
            if from != *gateway {
                return None;
            }
            let record = buf.get(..len)?.to_vec();
            dtls_record(sock, *gateway, session, &record);
            let d = session.poll_received()?;
            deliver(&d, buf)
        }
        Link::Memory(port) => match port.from_gateway.recv().await {
            Some(data) => {
                let len = data.len().min(buf.len());
                buf.get_mut(..len)?.copy_from_slice(data.get(..len)?);
                Some(len)
            }
            // The in-memory gateway is gone: nothing will ever arrive.
            None => std::future::pending().await,
        },
    }
}

/// Like [`recv_link`] without waiting: `None` when nothing is there.
fn try_recv_link(link: &mut Link, buf: &mut [u8]) -> Option<usize> {
    loop {
        match link {
            Link::Udp { sock, gateway } => {
                let (len, from) = sock.try_recv_from(buf).ok()?;
                if from == *gateway {
                    return Some(len);
                }
            }
            Link::Memory(port) => {
                let data = port.from_gateway.try_recv().ok()?;
                let len = data.len().min(buf.len());
                buf.get_mut(..len)?.copy_from_slice(data.get(..len)?);
                return Some(len);
            }
            Link::Dtls { sock, gateway, session } => {
                if let Some(d) = session.poll_received() {
                    return deliver(&d, buf);
                }
                let (len, from) = sock.try_recv_from(buf).ok()?;
                if from == *gateway {
                    let record = buf.get(..len)?.to_vec();
                    dtls_record(sock, *gateway, session, &record);
                    if let Some(d) = session.poll_received() {
                        return deliver(&d, buf);
                    }
                }
            }
        }
    }
}

/// One device's socket, radio and receive buffer.
pub struct Station {
    link: Link,
    radio: Option<Box<Radio>>,
    buf: Box<[u8]>,
    /// What the radio did so far.
    pub counters: RadioCounters,
}

impl Station {
    /// Binds a UDP socket on `local` and talks to `gateway` through `model` (the model is
    /// skipped entirely when perfect). `rng` drives the model.
    pub async fn bind(local: SocketAddr, gateway: SocketAddr, model: LinkModel, rng: SmallRng) -> io::Result<Station> {
        let sock = UdpSocket::bind(local).await?;
        Ok(Self::with_link(Link::Udp { sock, gateway }, model, rng))
    }

    /// Like [`Station::bind`], over DTLS 1.2 with `credentials` (a pre-shared key or a
    /// certificate): the handshake
    /// with the gateway runs here (retransmitted as needed, for at most `within`, itself
    /// at most [`HANDSHAKE_TIMEOUT`]), then each datagram is one DTLS record.
    pub async fn bind_dtls(
        local: SocketAddr,
        gateway: SocketAddr,
        credentials: &Credentials,
        within: Duration,
        model: LinkModel,
        rng: SmallRng,
    ) -> io::Result<Station> {
        let within = within.min(HANDSHAKE_TIMEOUT);
        let sock = UdpSocket::bind(local).await?;
        let dtls_err = |e: DtlsError| io::Error::other(e.to_string());
        let mut session = Box::new(DtlsClient::new(credentials, Instant::now()).map_err(dtls_err)?);
        let give_up = Instant::now() + within;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !session.is_connected() {
            while let Some(r) = session.poll_transmit() {
                sock.send_to(&r, gateway).await?;
            }
            let now = Instant::now();
            if now >= give_up || session.is_closed() {
                return Err(dtls_err(DtlsError::HandshakeTimeout(within)));
            }
            let wake = session.poll_timeout().unwrap_or(give_up).min(give_up);
            match tokio::time::timeout_at(wake.into(), sock.recv_from(&mut buf)).await {
                Ok(Ok((len, from))) if from == gateway => {
                    if let Some(record) = buf.get(..len) {
                        if let Err(e) = session.handle_record(Instant::now(), record) {
                            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()));
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => session.handle_timeout(Instant::now()).map_err(dtls_err)?,
            }
        }
        // The last flight (our Finished) may still be queued.
        while let Some(r) = session.poll_transmit() {
            sock.send_to(&r, gateway).await?;
        }
        Ok(Self::with_link(Link::Dtls { sock, gateway, session }, model, rng))
    }

    /// Ends a DTLS session with close_notify (nothing for plain UDP or memory, or when the
    /// gateway closed the session already).
    pub async fn close(&mut self) {
        if let Link::Dtls { sock, gateway, session } = &mut self.link {
            if session.is_closed() {
                return;
            }
            session.close();
            while let Some(r) = session.poll_transmit() {
                let _ = sock.send_to(&r, *gateway).await;
            }
        }
    }

    /// A station on an in-memory network instead of UDP.
    pub fn memory(port: MemoryPort, model: LinkModel, rng: SmallRng) -> Station {
        Self::with_link(Link::Memory(port), model, rng)
    }

    fn with_link(link: Link, model: LinkModel, rng: SmallRng) -> Station {
        let radio = (!model.is_perfect()).then(|| {
            Box::new(Radio {
                model,
                rng,
                up: DelayQueue::default(),
                down: DelayQueue::default(),
                up_busy_until: 0,
                down_busy_until: 0,
            })
        });
        Station {
            link,
            radio,
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            counters: RadioCounters::default(),
        }
    }

    /// The local address of the socket (`None` on an in-memory network).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.link {
            Link::Udp { sock, .. } | Link::Dtls { sock, .. } => sock.local_addr().ok(),
            Link::Memory(_) => None,
        }
    }

    /// The received datagram after [`Wake::Datagram`].
    pub fn datagram(&self, len: usize) -> &[u8] {
        self.buf.get(..len).unwrap_or(&[])
    }

    async fn send_now(&mut self, data: &[u8]) {
        // A failed send is a lost datagram; the engine's retransmission handles it.
        match &mut self.link {
            Link::Udp { sock, gateway } => {
                if let Err(e) = sock.send_to(data, *gateway).await {
                    tracing::debug!(error = %e, "send failed");
                }
            }
            Link::Memory(port) => {
                let _ = port.to_gateway.send((port.id, data.to_vec()));
            }
            Link::Dtls { sock, gateway, session } => {
                if let Err(e) = session.send(data) {
                    tracing::debug!(error = %e, "DTLS send failed");
                }
                while let Some(r) = session.poll_transmit() {
                    if let Err(e) = sock.send_to(&r, *gateway).await {
                        tracing::debug!(error = %e, "send failed");
                    }
                }
            }
        }
    }

    /// Sends a datagram to the gateway through the radio model.
    pub async fn send(&mut self, data: &[u8]) {
        self.counters.sent += 1;
        let Some(radio) = self.radio.as_mut() else {
            self.send_now(data).await;
            return;
        };
        let now = now_ms();
        let base = airtime(&radio.model, &mut radio.up_busy_until, now, data.len());
        let delays = match radio.model.fate(&mut radio.rng) {
            Fate::Lost => {
                self.counters.dropped += 1;
                return;
            }
            Fate::Deliver(d) => [Some(base + d), None],
            Fate::Duplicate(a, b) => {
                self.counters.duplicated += 1;
                [Some(base + a), Some(base + b)]
            }
        };
        let mut immediate = 0;
        for d in delays.into_iter().flatten() {
            if d == 0 {
                immediate += 1;
            } else {
                radio.up.push(now + d, data.to_vec());
            }
        }
        for _ in 0..immediate {
            self.send_now(data).await;
        }
    }

    /// Sends the uplink datagrams that are due.
    async fn flush_up(&mut self, now: u64) {
        while let Some(data) = self.radio.as_mut().and_then(|r| r.up.pop_due(now)) {
            self.send_now(&data).await;
        }
    }

    /// Passes a datagram just received (in `buf`) through the downlink radio: returns it
    /// if it is delivered at once, else drops or delays it.
    fn arrived(&mut self, len: usize) -> Option<Wake> {
        self.counters.received += 1;
        let Some(radio) = self.radio.as_mut() else {
            return Some(Wake::Datagram(len));
        };
        let data = self.buf.get(..len).unwrap_or(&[]);
        let now = now_ms();
        let base = airtime(&radio.model, &mut radio.down_busy_until, now, len);
        match radio.model.fate(&mut radio.rng) {
            Fate::Lost => {
                self.counters.dropped += 1;
                self.counters.dropped_down += 1;
            }
            Fate::Deliver(0) if base == 0 => return Some(Wake::Datagram(len)),
            Fate::Deliver(d) => radio.down.push(now + base + d, data.to_vec()),
            Fate::Duplicate(a, b) => {
                self.counters.duplicated += 1;
                radio.down.push(now + base + a, data.to_vec());
                radio.down.push(now + base + b, data.to_vec());
            }
        }
        None
    }

    /// Waits until a datagram from the gateway has come through the radio (returned in
    /// [`Station::datagram`]) or until `deadline` (ms, [`now_ms`] scale; `None`: no
    /// deadline). Delayed uplink datagrams are sent meanwhile.
    pub async fn wait(&mut self, deadline: Option<u64>) -> Wake {
        loop {
            let now = now_ms();
            self.flush_up(now).await;
            if let Some(data) = self.radio.as_mut().and_then(|r| r.down.pop_due(now)) {
                let len = data.len().min(self.buf.len());
                if let (Some(dst), Some(src)) = (self.buf.get_mut(..len), data.get(..len)) {
                    dst.copy_from_slice(src);
                }
                return Wake::Datagram(len);
            }
            if deadline.is_some_and(|d| d <= now) {
                // Take what is already waiting before giving up: a deadline in the past must
                // not starve the socket.
                while let Some(len) = try_recv_link(&mut self.link, &mut self.buf) {
                    if let Some(wake) = self.arrived(len) {
                        return wake;
                    }
                }
                return Wake::Deadline;
            }
            let radio_due = self
                .radio
                .as_ref()
                .and_then(|r| match (r.up.next_due(), r.down.next_due()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                });
            let next = match (deadline, radio_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(instant_at(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = recv_link(&mut self.link, &mut self.buf) => {
                    let Some(len) = r else { continue };
                    if let Some(wake) = self.arrived(len) {
                        return wake;
                    }
                }
                _ = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The radio applies to both directions: with loss p each way, a round trip survives
    /// with (1 - p)^2.
    #[tokio::test]
    async fn loss_applies_both_ways() {
        let gateway = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let gw_addr = gateway.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut echoed = 0u32;
            while let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_millis(300), gateway.recv_from(&mut buf)).await
            {
                let _ = gateway.send_to(buf.get(..n).unwrap_or(&[]), from).await;
                echoed += 1;
            }
            echoed
        });
        let model = LinkModel {
            loss: 0.5,
            ..LinkModel::PERFECT
        };
        let mut st = Station::bind(
            "127.0.0.1:0".parse().expect("addr"),
            gw_addr,
            model,
            SmallRng::seed_from_u64(5),
        )
        .await
        .expect("bind");
        let n = 2000u32;
        let mut back = 0u32;
        for i in 0..n {
            st.send(&i.to_be_bytes()).await;
            // Drain what came back so far without waiting.
            while let Wake::Datagram(_) = st.wait(Some(now_ms())).await {
                back += 1;
            }
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let end = now_ms() + 200;
        while let Wake::Datagram(_) = st.wait(Some(end)).await {
            back += 1;
        }
        let _ = echo.await.expect("echo task");
        // Radio statistics, independent of what the kernel may drop on a busy machine.
        let c = st.counters;
        assert_eq!(c.sent, u64::from(n));
        let up_dropped = c.dropped - c.dropped_down;
        let up = 1.0 - up_dropped as f64 / f64::from(n);
        assert!((up - 0.5).abs() < 0.05, "uplink survival {up}");
        assert!(c.received > 500, "datagrams came back: {}", c.received);
        let down = 1.0 - c.dropped_down as f64 / c.received as f64;
        assert!((down - 0.5).abs() < 0.08, "downlink survival {down}");
        assert_eq!(u64::from(back), c.received - c.dropped_down);
    }
}
