//! UDP listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::warn;

use crate::link::LinkAddr;

/// A UDP health probe: a datagram equal to `request` is answered with `reply` and not
/// passed to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpProbe {
    /// The probe's bytes (never a valid MQTT-SN message).
    pub request: Vec<u8>,
    /// The answer's bytes.
    pub reply: Vec<u8>,
}

/// A datagram received from a device.
pub type Inbound = (LinkAddr, Vec<u8>);

/// Receive buffer asked of the kernel for each listener.
pub const RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Largest datagram read; MQTT-SN messages are at most 65535 octets.
const MAX_DATAGRAM: usize = 65_536;

/// One bound UDP listener.
#[derive(Debug, Clone)]
pub struct UdpListener {
    /// Index of this listener, carried in [`LinkAddr::Udp`].
    pub index: u16,
    /// The socket.
    pub socket: Arc<UdpSocket>,
}

impl UdpListener {
    /// Binds `addr`.
    ///
    /// The socket's receive buffer is enlarged to [`RECV_BUFFER`] (the kernel caps it at
    /// `net.core.rmem_max`) so that a burst of datagrams from thousands of devices waits
    /// in the kernel rather than being dropped there.
    pub async fn bind(index: u16, addr: SocketAddr) -> std::io::Result<Self> {
        let domain = socket2::Domain::for_address(addr);
        let raw = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if let Err(e) = raw.set_recv_buffer_size(RECV_BUFFER) {
            warn!(error = %e, "cannot enlarge the UDP receive buffer");
        }
        raw.set_nonblocking(true)?;
        raw.bind(&addr.into())?;
        let socket = UdpSocket::from_std(raw.into())?;
        Ok(UdpListener {
            index,
            socket: Arc::new(socket),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Reads datagrams into `tx` until the receiver closes. A datagram equal to the
    /// `probe`'s request is answered with its reply here and not passed on (validation
    /// makes sure no MQTT-SN message equals the request).
    pub fn spawn_reader(&self, tx: mpsc::Sender<Inbound>, probe: Option<Arc<UdpProbe>>) -> tokio::task::JoinHandle<()> {
        let socket = self.socket.clone();
        let index = self.index;
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if let Some(p) = &probe {
                            if buf.get(..n) == Some(p.request.as_slice()) {
                                if let Err(e) = socket.send_to(&p.reply, from).await {
                                    warn!(to = %from, error = %e, "UDP probe reply failed");
                                }
                                continue;
                            }
                        }
                        let data = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                        if tx.send((LinkAddr::Udp(index, from), data)).await.is_err() {
                            return;
                        }
                    }
                    // ICMP port unreachable from an earlier send shows up here on some
                    // systems; it concerns one device, not the listener.
                    Err(e) => warn!(error = %e, "UDP receive error"),
                }
            }
        })
    }

    /// Sends one datagram; errors concern one device and are only logged.
    pub async fn send(&self, data: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.send_to(data, to).await {
            warn!(to = %to, error = %e, "UDP send failed");
        }
    }
}
