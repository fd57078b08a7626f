//! UDP listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::warn;

use crate::engine::LinkAddr;

/// A datagram received from a device.
pub type Inbound = (LinkAddr, Vec<u8>);

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
    pub async fn bind(index: u16, addr: SocketAddr) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(addr).await?;
        Ok(UdpListener {
            index,
            socket: Arc::new(socket),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Reads datagrams into `tx` until the receiver closes.
    pub fn spawn_reader(&self, tx: mpsc::Sender<Inbound>) -> tokio::task::JoinHandle<()> {
        let socket = self.socket.clone();
        let index = self.index;
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) => {
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
