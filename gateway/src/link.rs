//! Device-side addresses: where a datagram came from (a UDP listener and source, a
//! serial port, a DTLS session with its proven identity) and, for clients behind a
//! forwarder, the wireless node id. Shared by the transports, the access rules and the
//! engine, and owned by none of them.

use std::net::SocketAddr;
use std::sync::Arc;

/// Where a datagram came from on the device side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkAddr {
    /// A UDP source address, and the index of the listening socket it reached.
    Udp(u16, SocketAddr),
    /// A serial port, by its index in the configuration.
    Serial(u16),
    /// A DTLS session: the index of the DTLS listener, the peer's UDP address, and the
    /// PSK identity the peer proved in the handshake. The same address with another
    /// identity is another link address.
    Dtls(u16, SocketAddr, Arc<str>),
}

impl std::fmt::Display for LinkAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkAddr::Udp(_, a) => write!(f, "udp:{a}"),
            LinkAddr::Serial(i) => write!(f, "serial:{i}"),
            LinkAddr::Dtls(_, a, identity) => write!(f, "dtls:{a}[{identity}]"),
        }
    }
}

/// One MQTT-SN client's address: the link address, plus the wireless node id when the
/// client sits behind a forwarder (spec 5.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Link-level address.
    pub link: LinkAddr,
    /// Wireless node id of an encapsulated client.
    pub node: Option<Box<[u8]>>,
}

impl Peer {
    /// A client reached directly at `link`.
    pub fn direct(link: LinkAddr) -> Self {
        Peer { link, node: None }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.link)?;
        if let Some(node) = &self.node {
            f.write_str("/node:")?;
            for b in node.iter() {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}
