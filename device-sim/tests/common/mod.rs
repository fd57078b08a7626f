//! What the simulator's end-to-end tests share: a gateway in-process in front of a broker.

use std::net::{Ipv4Addr, SocketAddr};

use gateway::config::{Config, Settings};

/// The gateway's default settings, served on a free loopback UDP port in front of
/// `broker`, without statistics lines, with a short Tretry (radio tests lose packets).
pub fn gateway_settings(broker: SocketAddr, max_retries: u32) -> Settings {
    // Through the configuration's defaults, so that new settings get their defaults.
    let mut config = Config::default();
    config.udp.listen = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
    config.broker.url = Some(format!("mqtt://{broker}"));
    config.gateway.stats_interval_secs = 0;
    config.timers.retry_interval_secs = 0.3;
    config.timers.max_retries = max_retries;
    config.validate().expect("valid gateway settings")
}
