//! A lossless in-process stand-in for a gateway on an in-memory network: it answers every
//! request at once (CONNACK, REGACK, PUBACK, PUBREC/PUBCOMP, SUBACK, PINGRESP, DISCONNECT)
//! and forwards nothing. It measures the simulator alone: how many devices one process
//! holds and how many messages per second it drives (`mqtt-sn-sim run --echo`).

use sn_codec::{Packet, PubAck, QoS, RegAck, ReturnCode, SubAck, TopicFilter, TopicRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::station::MemoryPort;

/// Topic id the echo gateway assigns to every REGISTER.
const REGISTERED_ID: u16 = 1;
/// Topic id the echo gateway assigns to every SUBSCRIBE of a plain name.
const SUBSCRIBED_ID: u16 = 2;

/// The answer to one message from a device, if any.
pub fn answer(datagram: &[u8], out: &mut [u8]) -> Option<usize> {
    let reply = match Packet::decode(datagram).ok()? {
        Packet::Connect(c) if c.will => Packet::WillTopicReq,
        Packet::Connect(_) | Packet::WillMsg(_) => Packet::ConnAck(ReturnCode::Accepted),
        Packet::WillTopic(_) => Packet::WillMsgReq,
        Packet::Register(r) => Packet::RegAck(RegAck {
            topic_id: REGISTERED_ID,
            msg_id: r.msg_id,
            code: ReturnCode::Accepted,
        }),
        Packet::Publish(p) => {
            let topic_id = match p.topic {
                TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
                TopicRef::Short(s) => u16::from_be_bytes(s),
            };
            match p.qos {
                QoS::AtLeastOnce => Packet::PubAck(PubAck {
                    topic_id,
                    msg_id: p.msg_id,
                    code: ReturnCode::Accepted,
                }),
                QoS::ExactlyOnce => Packet::PubRec(p.msg_id),
                QoS::AtMostOnce | QoS::MinusOne => return None,
            }
        }
        Packet::PubRel(id) => Packet::PubComp(id),
        Packet::Subscribe(s) => Packet::SubAck(SubAck {
            qos: if s.qos == QoS::MinusOne { QoS::AtMostOnce } else { s.qos },
            topic_id: match s.topic {
                TopicFilter::Name(n) if !n.contains(['+', '#']) => SUBSCRIBED_ID,
                TopicFilter::Name(_) => 0,
                TopicFilter::Predefined(id) => id,
                TopicFilter::Short(s) => u16::from_be_bytes(s),
            },
            msg_id: s.msg_id,
            code: ReturnCode::Accepted,
        }),
        Packet::Unsubscribe(u) => Packet::UnsubAck(u.msg_id),
        Packet::PingReq(_) => Packet::PingResp,
        Packet::Disconnect(_) => Packet::Disconnect(None),
        _ => return None,
    };
    reply.encode(out).ok()
}

/// Starts the echo gateway for `devices` devices; returns their ports (device `i` has id
/// `i`) and the task.
pub fn spawn(devices: usize) -> (Vec<MemoryPort>, JoinHandle<u64>) {
    let (to_gateway, mut inbox) = mpsc::unbounded_channel::<(u32, Vec<u8>)>();
    let mut outboxes = Vec::with_capacity(devices);
    let mut ports = Vec::with_capacity(devices);
    for i in 0..devices {
        let (tx, rx) = mpsc::unbounded_channel();
        outboxes.push(tx);
        ports.push(MemoryPort {
            id: u32::try_from(i).unwrap_or(u32::MAX),
            to_gateway: to_gateway.clone(),
            from_gateway: rx,
        });
    }
    drop(to_gateway);
    let task = tokio::spawn(async move {
        let mut handled = 0u64;
        let mut out = [0u8; 64];
        while let Some((id, data)) = inbox.recv().await {
            handled += 1;
            if let (Some(n), Some(tx)) = (answer(&data, &mut out), outboxes.get(id as usize)) {
                let _ = tx.send(out.get(..n).unwrap_or(&[]).to_vec());
            }
        }
        handled
    });
    (ports, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sn_codec::Connect;

    #[test]
    fn answers_like_a_gateway() {
        let mut buf = [0u8; 64];
        let mut out = [0u8; 64];
        let n = Packet::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "x",
        })
        .encode(&mut buf)
        .expect("encodes");
        let m = answer(&buf[..n], &mut out).expect("answered");
        assert_eq!(Packet::decode(&out[..m]), Ok(Packet::ConnAck(ReturnCode::Accepted)));
        let n = Packet::Disconnect(Some(30)).encode(&mut buf).expect("encodes");
        let m = answer(&buf[..n], &mut out).expect("answered");
        assert_eq!(Packet::decode(&out[..m]), Ok(Packet::Disconnect(None)));
    }
}
