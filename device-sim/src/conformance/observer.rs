//! The broker side of the suite: an MQTT client that subscribes to what the checks
//! publish (to see what arrived, at which QoS, with which flags) and publishes what
//! the checks expect the gateway to deliver.

use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, Packet as MqttPacket};
use sn_codec::QoS;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::verifier::BrokerUrl;

/// Why the observer could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The broker refused the connection or could not be reached.
    #[error("cannot connect to the broker {broker}: {reason}")]
    Connect {
        /// `host:port`.
        broker: String,
        /// What the MQTT client said.
        reason: String,
    },
    /// The broker did not answer the connection in time.
    #[error("the broker {broker} did not answer")]
    Silent {
        /// `host:port`.
        broker: String,
    },
    /// A request could not be queued (the observer's connection is gone).
    #[error("the observer's broker connection failed: {0}")]
    Client(#[from] rumqttc::ClientError),
    /// SUBACK did not come.
    #[error("the broker did not acknowledge the observer's subscription to {0}")]
    NoSubAck(String),
}

/// A message seen at the broker.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The QoS it was delivered with to the observer (subscribed at 2: the publisher's).
    pub qos: u8,
}

/// An MQTT subscriber and publisher on the gateway's broker.
pub(super) struct Observer {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Seen>,
    subacks: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Observer {
    pub async fn start(broker: &BrokerUrl, id: String) -> Result<Observer, ObserverError> {
        let name = format!("{}:{}", broker.host, broker.port);
        let mut o = broker.options(id);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(16);
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let (ack_tx, mut subacks) = watch::channel(0u64);
        let (conn_tx, mut connected) = watch::channel(None::<Result<(), String>>);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(MqttPacket::Publish(p))) => {
                        let _ = msg_tx.send(Seen {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                        });
                    }
                    Ok(MqttEvent::Incoming(MqttPacket::ConnAck(_))) => {
                        let _ = conn_tx.send(Some(Ok(())));
                    }
                    Ok(MqttEvent::Incoming(MqttPacket::SubAck(_))) => ack_tx.send_modify(|n| *n += 1),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = conn_tx.send(Some(Err(e.to_string())));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let r = tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| c.is_some())).await;
        let state = match r {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        match state {
            Some(Ok(())) => {
                subacks.mark_unchanged();
                Ok(Observer {
                    client,
                    messages,
                    subacks,
                    task,
                })
            }
            Some(Err(reason)) => {
                task.abort();
                Err(ObserverError::Connect { broker: name, reason })
            }
            None => {
                task.abort();
                Err(ObserverError::Silent { broker: name })
            }
        }
    }

    /// Subscribes at QoS 2 (so that a message arrives with the QoS it was published at).
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), ObserverError> {
        let before = *self.subacks.borrow();
        self.client.subscribe(filter, rumqttc::QoS::ExactlyOnce).await?;
        match tokio::time::timeout(Duration::from_secs(5), self.subacks.wait_for(|n| *n > before)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ObserverError::NoSubAck(filter.to_string())),
        }
    }

    pub async fn publish(&self, topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Result<(), ObserverError> {
        let q = match qos {
            QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
            QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
            _ => rumqttc::QoS::AtMostOnce,
        };
        self.client.publish(topic, q, retain, payload.to_vec()).await?;
        Ok(())
    }

    /// The next message on `topic` within `timeout` (messages on other topics are dropped).
    pub async fn expect(&mut self, topic: &str, timeout: Duration) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(m)) if m.topic == topic => return Some(m),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }

    /// The next message on `topic` with `payload` within `timeout`.
    pub async fn expect_payload(&mut self, topic: &str, payload: &[u8], timeout: Duration) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.expect(topic, left).await {
                Some(m) if m.payload == payload => return Some(m),
                Some(_) => {}
                None => return None,
            }
        }
    }

    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}
