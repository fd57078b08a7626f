//! The embedded broker: rumqttd in-process on loopback, so the gateway runs on a machine
//! with nothing else installed. See docs/configuration.md for what it does not support.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{error, info};

/// Starts rumqttd on `addr` (port 0: a free port is picked) and waits until it accepts
/// connections. Returns the address it listens on.
pub async fn start(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    // Bind first, ourselves: rumqttd reports a taken address only in its own log, from
    // its own thread, and the readiness probe below would then be answered by whatever
    // broker holds the address (a packaged mosquitto usually holds 127.0.0.1:1883).
    let addr = match std::net::TcpListener::bind(addr) {
        Ok(probe) => probe.local_addr()?,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "embedded broker address {addr} is already in use (another broker running? choose another with --embedded-broker-listen)"
        ),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("embedded broker cannot listen on {addr}"))),
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
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
            flag.store(true, Ordering::SeqCst);
        })
        .context("spawning the embedded broker thread")?;
    for _ in 0..100 {
        if stopped.load(Ordering::SeqCst) {
            bail!("embedded broker on {addr} stopped at start (RUST_LOG=rumqttd=info shows why)");
        }
        if probe(addr).await.is_ok() {
            info!(%addr, "embedded broker (rumqttd) listening");
            return Ok(addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("embedded broker did not start listening on {addr}")
}

/// A complete MQTT exchange (CONNECT, CONNACK, DISCONNECT), so the broker sees a
/// well-behaved client rather than a bare TCP connection it would log as an error.
async fn probe(addr: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 10 s, client id "gw-probe".
    const CONNECT: &[u8] = b"\x10\x14\x00\x04MQTT\x04\x02\x00\x0a\x00\x08gw-probe";
    const DISCONNECT: &[u8] = &[0xE0, 0x00];
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(CONNECT).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut connack))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other("unexpected CONNACK"));
    }
    s.write_all(DISCONNECT).await
}
