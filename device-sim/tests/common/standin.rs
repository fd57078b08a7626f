//! Broken stand-in gateways for the conformance tests: the real gateway behind a UDP
//! proxy that breaks one rule (drops, rewrites or answers one kind of datagram).
//!
//! Each client address gets its own upstream socket, so the gateway still tells clients
//! apart by address (the takeover check needs that).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to gateway.
    Up,
    /// Gateway to client.
    Down,
}

/// What the proxy does with a datagram.
#[derive(Debug)]
pub enum Verdict {
    /// Pass it on unchanged.
    Forward,
    /// Lose it.
    Drop,
    /// Pass these bytes on instead.
    Rewrite(Vec<u8>),
    /// Do not pass it on; send these bytes back to where it came from.
    Answer(Vec<u8>),
}

/// The broken rule: sees every datagram with its direction and client address.
pub type Rule = Box<dyn FnMut(Dir, SocketAddr, &[u8]) -> Verdict + Send>;

/// A proxy in front of a gateway.
pub struct Proxy {
    /// Where clients send to.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy to `gateway` applying `rule`.
    pub async fn start(gateway: SocketAddr, rule: Rule) -> Proxy {
        let front = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the proxy"));
        let addr = front.local_addr().expect("proxy address");
        let rule = Arc::new(Mutex::new(rule));
        let task = tokio::spawn(async move {
            let mut ups: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let data = buf[..n].to_vec();
                if let std::collections::hash_map::Entry::Vacant(slot) = ups.entry(client) {
                    let up = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind upstream"));
                    up.connect(gateway).await.expect("connect upstream");
                    let (up2, front2, rule2) = (up.clone(), front.clone(), rule.clone());
                    let reader = tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = up2.recv(&mut buf).await {
                            let verdict = (rule2.lock().expect("rule"))(Dir::Down, client, &buf[..n]);
                            match verdict {
                                Verdict::Forward => drop(front2.send_to(&buf[..n], client).await),
                                Verdict::Rewrite(b) => drop(front2.send_to(&b, client).await),
                                Verdict::Answer(b) => drop(up2.send(&b).await),
                                Verdict::Drop => {}
                            }
                        }
                    });
                    slot.insert((up, reader));
                }
                let (up, _) = &ups[&client];
                let verdict = (rule.lock().expect("rule"))(Dir::Up, client, &data);
                match verdict {
                    Verdict::Forward => drop(up.send(&data).await),
                    Verdict::Rewrite(b) => drop(up.send(&b).await),
                    Verdict::Answer(b) => drop(front.send_to(&b, client).await),
                    Verdict::Drop => {}
                }
            }
            for (_, (_, reader)) in ups {
                reader.abort();
            }
        });
        Proxy { addr, task }
    }
}

/// The message type of a datagram (either length form), if it has one.
pub fn msg_type(d: &[u8]) -> Option<u8> {
    match d.first()? {
        0x01 => d.get(3).copied(),
        _ => d.get(1).copied(),
    }
}

/// Where the message type sits (1 or 3).
pub fn type_at(d: &[u8]) -> usize {
    if d.first() == Some(&0x01) {
        3
    } else {
        1
    }
}
