//! A raw MQTT-SN device for the checks: one UDP socket, packets encoded by the codec (or
//! bytes written by hand where the check is about the bytes), answers read one by one.
//!
//! The suite does not use the simulator's client engine here on purpose: the engine
//! retransmits, acknowledges and reorders on its own, and a conformance check must send
//! exactly what it means to send and see exactly what the gateway answered.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sn_codec::{Connect, Packet, Publish, QoS, RegAck, Register, ReturnCode, Subscribe, TopicFilter, TopicRef};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::CheckError;

/// Largest datagram read from the gateway.
const RECV_MAX: usize = 65_536;

/// The wildcard address of `gateway`'s family, port 0.
pub(super) fn local_for(gateway: SocketAddr) -> SocketAddr {
    match gateway {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A message the gateway delivered, copied out of the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Delivered {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: TopicRef,
    pub msg_id: u16,
    pub data: Vec<u8>,
}

impl Delivered {
    fn from(p: &Publish<'_>) -> Delivered {
        Delivered {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: p.topic,
            msg_id: p.msg_id,
            data: p.data.to_vec(),
        }
    }
}

/// One raw client: a socket towards the gateway and the answers it got.
pub(super) struct Wire {
    sock: UdpSocket,
    gateway: SocketAddr,
    /// How long each expected answer may take.
    pub timeout: Duration,
    next_msg_id: u16,
    buf: Vec<u8>,
}

impl Wire {
    /// A fresh socket towards `gateway`.
    pub async fn open(gateway: SocketAddr, timeout: Duration) -> Result<Wire, CheckError> {
        let sock = UdpSocket::bind(local_for(gateway)).await.map_err(CheckError::Io)?;
        Ok(Wire {
            sock,
            gateway,
            timeout,
            // Message ids that are not 1: an echo of the wrong field shows.
            next_msg_id: 0x1230,
            buf: vec![0; RECV_MAX],
        })
    }

    /// A message id not used before on this wire.
    pub fn msg_id(&mut self) -> u16 {
        self.next_msg_id = self.next_msg_id.wrapping_add(1).max(1);
        self.next_msg_id
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), CheckError> {
        self.sock.send_to(bytes, self.gateway).await.map_err(CheckError::Io)?;
        Ok(())
    }

    /// Encodes and sends a packet.
    pub async fn send(&self, p: &Packet<'_>) -> Result<(), CheckError> {
        let mut out = vec![0u8; p.encoded_len()];
        let n = p.encode(&mut out).map_err(CheckError::Encode)?;
        self.send_raw(out.get(..n).unwrap_or(&[])).await
    }

    /// The next datagram from the gateway within `within` (`None`: none came). Datagrams
    /// from other addresses are ignored.
    pub async fn next_raw(&mut self, within: Duration) -> Result<Option<Vec<u8>>, CheckError> {
        let end = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, self.sock.recv_from(&mut self.buf)).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(CheckError::Io(e)),
                Ok(Ok((n, from))) if from == self.gateway => {
                    return Ok(Some(self.buf.get(..n).unwrap_or(&[]).to_vec()));
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads answers until `pick` accepts one, for at most `within`. Datagrams that do
    /// not decode are an error: a gateway must not send them. Answers `pick` declines
    /// are passed over; a PUBLISH among them is acknowledged as the specification wants
    /// (so that the gateway is not held up), others are dropped.
    pub async fn expect_within<T>(
        &mut self,
        what: &'static str,
        within: Duration,
        mut pick: impl FnMut(&Packet<'_>) -> Option<T>,
    ) -> Result<T, CheckError> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Some(d) = self.next_raw(left).await? else {
                return Err(CheckError::NoAnswer { what, waited: within });
            };
            let p = Packet::decode(&d).map_err(|e| CheckError::Undecodable {
                what,
                error: format!("{e:?}"),
                bytes: hex(&d),
            })?;
            if let Some(t) = pick(&p) {
                return Ok(t);
            }
            if let Packet::Publish(m) = p {
                let m = Delivered::from(&m);
                self.ack(&m).await?;
            }
        }
    }

    /// [`Wire::expect_within`] with the wire's timeout.
    pub async fn expect<T>(
        &mut self,
        what: &'static str,
        pick: impl FnMut(&Packet<'_>) -> Option<T>,
    ) -> Result<T, CheckError> {
        self.expect_within(what, self.timeout, pick).await
    }

    /// Acknowledges a delivered message (PUBACK for QoS 1, PUBREC for QoS 2; the PUBREL
    /// that follows is answered by [`Wire::expect`] callers that wait for it).
    pub async fn ack(&self, m: &Delivered) -> Result<(), CheckError> {
        let topic_id = topic_bits(m.topic);
        match m.qos {
            QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(sn_codec::PubAck {
                    topic_id,
                    msg_id: m.msg_id,
                    code: ReturnCode::Accepted,
                }))
                .await
            }
            QoS::ExactlyOnce => self.send(&Packet::PubRec(m.msg_id)).await,
            _ => Ok(()),
        }
    }

    /// CONNECT without a will, answered by an accepted CONNACK.
    pub async fn connect(&mut self, client_id: &str, keep_alive: u16) -> Result<(), CheckError> {
        self.send(&Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: keep_alive,
            client_id,
        }))
        .await?;
        self.connack().await
    }

    /// Waits for CONNACK and requires it accepted.
    pub async fn connack(&mut self) -> Result<(), CheckError> {
        let code = self
            .expect("CONNECT", |p| match p {
                Packet::ConnAck(c) => Some(*c),
                _ => None,
            })
            .await?;
        accepted("CONNECT", code)
    }

    /// REGISTER `name`; the topic id from an accepted REGACK that echoes the message id.
    pub async fn register(&mut self, name: &str) -> Result<u16, CheckError> {
        let msg_id = self.msg_id();
        self.send(&Packet::Register(Register {
            topic_id: 0,
            msg_id,
            topic_name: name,
        }))
        .await?;
        let ack: RegAck = self
            .expect("REGISTER", |p| match p {
                Packet::RegAck(a) => Some(*a),
                _ => None,
            })
            .await?;
        if ack.msg_id != msg_id {
            return Err(CheckError::Wrong(format!(
                "REGACK carries message id {:#06x}, the REGISTER had {msg_id:#06x}",
                ack.msg_id
            )));
        }
        accepted("REGISTER", ack.code)?;
        if ack.topic_id == 0 || ack.topic_id == 0xFFFF {
            return Err(CheckError::Wrong(format!(
                "REGACK accepted with the reserved topic id {:#06x}",
                ack.topic_id
            )));
        }
        Ok(ack.topic_id)
    }

    /// PUBLISH at QoS 1 and wait for a PUBACK that echoes topic id and message id.
    pub async fn publish_qos1(&mut self, topic: TopicRef, data: &[u8], retain: bool) -> Result<(), CheckError> {
        let msg_id = self.msg_id();
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic,
            msg_id,
            data,
        });
        self.send(&p).await?;
        self.puback(topic, msg_id).await
    }

    /// Waits for the PUBACK of (`topic`, `msg_id`): echoes compared, code accepted.
    pub async fn puback(&mut self, topic: TopicRef, msg_id: u16) -> Result<(), CheckError> {
        let ack = self
            .expect("PUBLISH", |p| match p {
                Packet::PubAck(a) => Some(*a),
                _ => None,
            })
            .await?;
        if ack.msg_id != msg_id {
            return Err(CheckError::Wrong(format!(
                "PUBACK carries message id {:#06x}, the PUBLISH had {msg_id:#06x}",
                ack.msg_id
            )));
        }
        accepted("PUBLISH", ack.code)?;
        let want = topic_bits(topic);
        if ack.topic_id != want {
            return Err(CheckError::Wrong(format!(
                "PUBACK carries topic id {:#06x}, the PUBLISH had {want:#06x}",
                ack.topic_id
            )));
        }
        Ok(())
    }

    /// SUBSCRIBE by name at `qos`; the granted QoS and topic id of an accepted SUBACK
    /// that echoes the message id.
    pub async fn subscribe(&mut self, filter: TopicFilter<'_>, qos: QoS) -> Result<(QoS, u16), CheckError> {
        let msg_id = self.msg_id();
        self.send(&Packet::Subscribe(Subscribe {
            dup: false,
            qos,
            msg_id,
            topic: filter,
        }))
        .await?;
        let ack = self
            .expect("SUBSCRIBE", |p| match p {
                Packet::SubAck(a) => Some(*a),
                _ => None,
            })
            .await?;
        if ack.msg_id != msg_id {
            return Err(CheckError::Wrong(format!(
                "SUBACK carries message id {:#06x}, the SUBSCRIBE had {msg_id:#06x}",
                ack.msg_id
            )));
        }
        accepted("SUBSCRIBE", ack.code)?;
        Ok((ack.qos, ack.topic_id))
    }

    /// PINGREQ (no client id) answered by PINGRESP.
    pub async fn ping(&mut self) -> Result<(), CheckError> {
        self.send(&Packet::PingReq(None)).await?;
        self.expect("PINGREQ", |p| matches!(p, Packet::PingResp).then_some(()))
            .await
    }

    /// DISCONNECT answered by DISCONNECT.
    pub async fn disconnect(&mut self) -> Result<(), CheckError> {
        self.send(&Packet::Disconnect(None)).await?;
        self.expect("DISCONNECT", |p| matches!(p, Packet::Disconnect(_)).then_some(()))
            .await
    }

    /// A DISCONNECT that nobody waits for: the end of a check that already decided.
    pub async fn leave(&mut self) {
        let _ = self.send(&Packet::Disconnect(None)).await;
    }

    /// The next PUBLISH from the gateway within `within`, with the registrations it
    /// made on the way (REGISTERs are acknowledged and remembered in `names`).
    pub async fn delivery(
        &mut self,
        within: Duration,
        names: &mut Vec<(u16, String)>,
    ) -> Result<Option<Delivered>, CheckError> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Some(d) = self.next_raw(left).await? else {
                return Ok(None);
            };
            match Packet::decode(&d) {
                Ok(Packet::Publish(p)) => return Ok(Some(Delivered::from(&p))),
                Ok(Packet::Register(r)) => {
                    names.push((r.topic_id, r.topic_name.to_string()));
                    self.send(&Packet::RegAck(RegAck {
                        topic_id: r.topic_id,
                        msg_id: r.msg_id,
                        code: ReturnCode::Accepted,
                    }))
                    .await?;
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(CheckError::Undecodable {
                        what: "a delivery",
                        error: format!("{e:?}"),
                        bytes: hex(&d),
                    })
                }
            }
        }
    }

    /// Completes a QoS 2 delivery after PUBREC: waits for PUBREL, answers PUBCOMP.
    pub async fn complete_qos2(&mut self, msg_id: u16) -> Result<(), CheckError> {
        let rel = self
            .expect("PUBREC", |p| match p {
                Packet::PubRel(m) => Some(*m),
                _ => None,
            })
            .await?;
        if rel != msg_id {
            return Err(CheckError::Wrong(format!(
                "PUBREL carries message id {rel:#06x}, the PUBLISH had {msg_id:#06x}"
            )));
        }
        self.send(&Packet::PubComp(msg_id)).await
    }
}

/// The two TopicId octets of a topic as a PUBACK echoes them.
pub(super) fn topic_bits(t: TopicRef) -> u16 {
    match t {
        TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
        TopicRef::Short([a, b]) => u16::from_be_bytes([a, b]),
    }
}

/// `Ok` for an accepted return code; 0x03 is the gateway saying "not supported".
pub(super) fn accepted(what: &'static str, code: ReturnCode) -> Result<(), CheckError> {
    match code {
        ReturnCode::Accepted => Ok(()),
        ReturnCode::NotSupported => Err(CheckError::NotSupported { what }),
        code => Err(CheckError::Rejected { what, code }),
    }
}

/// Octets as hex, for a detail line.
pub(super) fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().take(16).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{x:02x}"));
    }
    if b.len() > 16 {
        s.push_str(&format!(" … ({} octets)", b.len()));
    }
    s
}
