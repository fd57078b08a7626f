//! The embedded broker: rumqttd in-process on loopback, so the gateway runs on a machine
//! with nothing else installed. See docs/configuration.md for what it does not support.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{error, info};

/// Starts rumqttd on `addr` (port 0: a free port is picked) and waits until it accepts
/// connections. Returns the address it listens on.
pub async fn start(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let addr = if addr.port() == 0 {
        let probe = std::net::TcpListener::bind(addr).context("finding a free port")?;
        probe.local_addr()?
    } else {
        addr
    };
    let server = ServerSettings {
        name: "mqtt-sn-gateway-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1_000_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .context("spawning the embedded broker thread")?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            info!(%addr, "embedded broker (rumqttd) listening");
            return Ok(addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("embedded broker did not start listening on {addr}")
}
