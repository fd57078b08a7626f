//! The broker-side verifier: an MQTT 3.1.1 subscriber (rumqttc) that records which device
//! messages reached the broker, how often, and how long after they were sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::payload::Stamp;
use crate::station::now_us;

/// The broker's address, from `mqtt://host:port` (port 1883 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some((scheme, _)) => return Err(format!("{url:?}: unsupported scheme {scheme:?} (use mqtt://host:port)")),
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || (h.starts_with('[') && h.ends_with(']')) => {
                (h, p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?)
            }
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
        })
    }
}

/// What arrived for one device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// How many times it arrived.
    pub count: u32,
    /// Latency of the first arrival, µs.
    pub latency_us: u64,
}

/// Everything the verifier saw.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// By (device, sequence number).
    pub messages: HashMap<(u32, u32), Arrival>,
    /// Messages on the subscribed topics that were not this run's.
    pub foreign: u64,
    /// Will messages (topics `<prefix>/<run>-will/...`) by device.
    pub wills: HashMap<u32, u32>,
    /// Times the verifier had to reconnect to the broker (messages in the gaps are missed).
    pub reconnects: u32,
}

/// A running verifier.
pub struct Verifier {
    arrivals: Arc<Mutex<Arrivals>>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

/// The verifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The broker did not accept the subscriptions in time.
    #[error("the broker at {0} did not accept the verifier's subscription within {1:?}: {2}")]
    NoBroker(String, Duration, String),
}

impl Verifier {
    /// Connects to the broker, subscribes to `filters` at QoS 2 and waits for the SUBACK.
    pub async fn start(broker: &BrokerUrl, run: u32, filters: &[String]) -> Result<Verifier, VerifierError> {
        let mut o = MqttOptions::new(
            format!("mqtt-sn-sim-verifier-{run:08x}"),
            broker.host.clone(),
            broker.port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            // Brokers cap QoS 1/2 messages in flight per client (mosquitto: 20 by default,
            // and it silently drops QoS 2 publishes beyond that from a 3.1.1 client).
            .set_inflight(16)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let (ready_tx, mut ready_rx) = watch::channel(Err::<(), String>("not connected yet".into()));
        let want = filters.len();
        let sink = arrivals.clone();
        let resubscribe = client.clone();
        let owned_filters = filters.to_vec();
        let task = tokio::spawn(async move {
            let mut subacks = 0;
            let mut connections = 0u32;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = now_us();
                        let mut a = sink.lock().unwrap_or_else(|e| e.into_inner());
                        match Stamp::decode(&p.payload) {
                            Some(s) if s.run == run && p.topic.contains("-will/") => {
                                *a.wills.entry(s.device).or_insert(0) += 1;
                            }
                            Some(s) if s.run == run => {
                                let e = a.messages.entry((s.device, s.seq)).or_insert(Arrival {
                                    count: 0,
                                    latency_us: now.saturating_sub(s.sent_us),
                                });
                                e.count += 1;
                            }
                            _ => a.foreign += 1,
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connections += 1;
                        if connections > 1 {
                            // A clean session lost the subscriptions: renew them. Messages
                            // published meanwhile are missed (and reported as lost).
                            sink.lock().unwrap_or_else(|e| e.into_inner()).reconnects += 1;
                            for f in &owned_filters {
                                let _ = resubscribe.try_subscribe(f.clone(), QoS::ExactlyOnce);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks >= want {
                            let _ = ready_tx.send(Ok(()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "verifier's broker connection");
                        let _ = ready_tx.send(Err(e.to_string()));
                        // rumqttc reconnects on the next poll; with a clean session the
                        // subscriptions are re-sent only by us, so count again.
                        subacks = 0;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        for f in filters {
            // Queued until the connection is up.
            let _ = client.subscribe(f.clone(), QoS::ExactlyOnce).await;
        }
        let limit = Duration::from_secs(10);
        let ok = tokio::time::timeout(limit, async {
            loop {
                if ready_rx.borrow_and_update().is_ok() {
                    return Ok(());
                }
                if ready_rx.changed().await.is_err() {
                    return Err("verifier stopped".to_string());
                }
            }
        })
        .await;
        let error = match ok {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(ready_rx.borrow().clone().err().unwrap_or_else(|| "timed out".into())),
        };
        if let Some(e) = error {
            task.abort();
            return Err(VerifierError::NoBroker(
                format!("{}:{}", broker.host, broker.port),
                limit,
                e,
            ));
        }
        Ok(Verifier { arrivals, client, task })
    }

    /// A handle to publish on the verifier's broker connection (downlink messages).
    pub fn publisher(&self) -> AsyncClient {
        self.client.clone()
    }

    /// Number of distinct messages seen so far.
    pub fn distinct(&self) -> usize {
        self.arrivals.lock().unwrap_or_else(|e| e.into_inner()).messages.len()
    }

    /// Stops and returns what arrived.
    pub async fn finish(self) -> Arrivals {
        // Dropping the connection is enough for a clean-session subscriber (and a
        // DISCONNECT would make the event loop report the closed connection as an error).
        self.task.abort();
        drop(self.client);
        let mut a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1883".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1883));
        let u: BrokerUrl = "localhost".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("localhost", 1883));
        let u: BrokerUrl = "tcp://broker:1999/".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("broker", 1999));
        assert!("mqtts://x:1".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:port".parse::<BrokerUrl>().is_err());
    }
}
