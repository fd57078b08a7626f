//! Configuration: the TOML file, the command line, and how they combine (flags override
//! the file, the file overrides the defaults). Every key is documented in
//! `docs/configuration.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::broker::mqtt::BrokerConfig;
use crate::engine::EngineConfig;
use crate::topics::Predefined;

/// The command line of `mqtt-sn-gateway`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "mqtt-sn-gateway",
    version,
    about = "MQTT-SN v1.2 gateway: serves sensors speaking MQTT-SN over UDP and makes each an MQTT 3.1.1 client of a broker",
    after_help = "Examples:\n  mqtt-sn-gateway --udp 127.0.0.1:10000 --broker mqtt://127.0.0.1:1883\n  mqtt-sn-gateway --embedded-broker\n  mqtt-sn-gateway --config gateway.toml --predefined 77=sensors/temp\n\nLogging: RUST_LOG=debug (or e.g. RUST_LOG=gateway=debug,info). Configuration keys: docs/configuration.md"
)]
pub struct Cli {
    /// TOML configuration file; flags given here override its values.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to serve MQTT-SN on (repeatable). Default 0.0.0.0:10000 when no file sets one.
    #[arg(long = "udp", value_name = "ADDR")]
    pub udp: Vec<SocketAddr>,
    /// Broker URL, mqtt://host:port.
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// User name for the broker.
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    /// Password for the broker (or set MQTT_SN_BROKER_PASSWORD).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "MQTT_SN_BROKER_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Prefix added to each device's client id on the broker.
    #[arg(long, value_name = "PREFIX")]
    pub client_id_prefix: Option<String>,
    /// Run an in-process broker (rumqttd) on loopback and serve through it.
    #[arg(long)]
    pub embedded_broker: bool,
    /// Address of the embedded broker (default 127.0.0.1:1883).
    #[arg(long, value_name = "ADDR")]
    pub embedded_broker_listen: Option<SocketAddr>,
    /// Predefined topic, ID=TOPIC (repeatable), e.g. 77=sensors/temp.
    #[arg(long, value_name = "ID=TOPIC", value_parser = parse_predefined)]
    pub predefined: Vec<(u16, String)>,
    /// Gateway id announced in GWINFO/ADVERTISE.
    #[arg(long, value_name = "ID")]
    pub gateway_id: Option<u8>,
    /// Tretry: seconds before a message to a device is retransmitted.
    #[arg(long, value_name = "SECS")]
    pub retry_interval: Option<f64>,
    /// Nretry: retransmissions before a device is declared lost.
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Maximum number of client sessions.
    #[arg(long, value_name = "N")]
    pub max_clients: Option<usize>,
    /// Seconds between statistics lines in the log (0: never).
    #[arg(long, value_name = "SECS")]
    pub stats_interval: Option<u64>,
}

fn parse_predefined(s: &str) -> Result<(u16, String), String> {
    let (id, topic) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=TOPIC, e.g. 77=sensors/temp"))?;
    let id = id
        .trim()
        .parse::<u16>()
        .map_err(|_| format!("{s:?}: topic id must be a number from 1 to 65534"))?;
    Ok((id, topic.to_string()))
}

/// The configuration file. Every section and key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `[gateway]`.
    pub gateway: GatewaySection,
    /// `[udp]`.
    pub udp: UdpSection,
    /// `[broker]`.
    pub broker: BrokerSection,
    /// `[timers]`.
    pub timers: TimersSection,
    /// `[sleep]`.
    pub sleep: SleepSection,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// `[predefined]`: topic id = topic name.
    pub predefined: BTreeMap<String, String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySection {
    /// Gateway id.
    pub id: Option<u8>,
    /// Seconds between statistics log lines.
    pub stats_interval_secs: Option<u64>,
    /// Accept QoS -1 publishes.
    pub qos_minus_one: Option<bool>,
}

/// `[udp]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpSection {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
}

/// `[broker]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// mqtt://host:port.
    pub url: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Client id prefix.
    pub client_id_prefix: Option<String>,
    /// Run the embedded broker.
    pub embedded: Option<bool>,
    /// Embedded broker address.
    pub embedded_listen: Option<SocketAddr>,
    /// Requests queued per connection.
    pub request_capacity: Option<usize>,
    /// QoS 1/2 publishes in flight per connection.
    pub inflight: Option<u16>,
    /// TCP connect + CONNACK timeout in seconds.
    pub connect_timeout_secs: Option<u64>,
}

/// `[timers]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimersSection {
    /// Tretry in seconds.
    pub retry_interval_secs: Option<f64>,
    /// Nretry.
    pub max_retries: Option<u32>,
    /// Keep-alive tolerance factor.
    pub keep_alive_factor: Option<f64>,
    /// Will handshake and broker connect timeout in seconds.
    pub connect_timeout_secs: Option<f64>,
}

/// `[sleep]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SleepSection {
    /// Sleep tolerance factor.
    pub tolerance_factor: Option<f64>,
    /// Longest sleep accepted, seconds.
    pub max_duration_secs: Option<u64>,
    /// Held messages per client.
    pub max_held_messages: Option<usize>,
    /// Held payload octets per client.
    pub max_held_bytes: Option<usize>,
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Client sessions.
    pub max_clients: Option<usize>,
    /// Normal topic ids per client.
    pub max_topics_per_client: Option<usize>,
    /// Clean-session-false clients whose topic ids are kept after they go.
    pub max_persisted_sessions: Option<usize>,
}

/// Everything the gateway runs with, resolved from defaults, file and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Protocol engine settings.
    pub engine: EngineConfig,
    /// UDP listen addresses.
    pub udp: Vec<SocketAddr>,
    /// Broker connection settings.
    pub broker: BrokerConfig,
    /// Run the embedded broker on this address.
    pub embedded_broker: Option<SocketAddr>,
    /// Statistics log period.
    pub stats_interval: Option<Duration>,
}

impl FileConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

fn positive(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{name} must be a positive number, not {v}"))
    }
}

impl Settings {
    /// Combines defaults, the file (if any) and the flags.
    pub fn resolve(cli: &Cli) -> Result<Settings, String> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::combine(file, cli)
    }

    /// Combines a parsed file and the flags.
    pub fn combine(file: FileConfig, cli: &Cli) -> Result<Settings, String> {
        let d = EngineConfig::default();
        let mut predefined: Vec<(u16, String)> = Vec::new();
        for (id, topic) in &file.predefined {
            let id = id
                .parse::<u16>()
                .map_err(|_| format!("[predefined] key {id:?} is not a topic id (1..65534)"))?;
            predefined.push((id, topic.clone()));
        }
        for (id, topic) in &cli.predefined {
            // A flag replaces the file's definition of the same id.
            predefined.retain(|(i, _)| i != id);
            predefined.push((*id, topic.clone()));
        }
        let predefined = Predefined::new(predefined)?;

        let retry = positive(
            "retry interval",
            cli.retry_interval
                .or(file.timers.retry_interval_secs)
                .unwrap_or(d.retry_interval.as_secs_f64()),
        )?;
        let keep_alive_factor = positive(
            "keep_alive_factor",
            file.timers.keep_alive_factor.unwrap_or(d.keep_alive_factor),
        )?;
        let sleep_factor = positive(
            "tolerance_factor",
            file.sleep.tolerance_factor.unwrap_or(d.sleep_factor),
        )?;
        let connect_timeout = positive(
            "connect_timeout_secs",
            file.timers
                .connect_timeout_secs
                .unwrap_or(d.connect_timeout.as_secs_f64()),
        )?;
        let engine = EngineConfig {
            gateway_id: cli.gateway_id.or(file.gateway.id).unwrap_or(d.gateway_id),
            retry_interval: Duration::from_secs_f64(retry),
            max_retries: cli.max_retries.or(file.timers.max_retries).unwrap_or(d.max_retries),
            keep_alive_factor,
            sleep_factor,
            max_sleep: file
                .sleep
                .max_duration_secs
                .map(Duration::from_secs)
                .unwrap_or(d.max_sleep),
            connect_timeout: Duration::from_secs_f64(connect_timeout),
            max_clients: cli.max_clients.or(file.limits.max_clients).unwrap_or(d.max_clients),
            max_topics_per_client: file.limits.max_topics_per_client.unwrap_or(d.max_topics_per_client),
            max_queued_messages: file.sleep.max_held_messages.unwrap_or(d.max_queued_messages).max(1),
            max_queued_bytes: file.sleep.max_held_bytes.unwrap_or(d.max_queued_bytes).max(1),
            max_persisted_sessions: file.limits.max_persisted_sessions.unwrap_or(d.max_persisted_sessions),
            predefined: Arc::new(predefined),
            qos_minus_one: file.gateway.qos_minus_one.unwrap_or(d.qos_minus_one),
        };

        let embedded = cli.embedded_broker || file.broker.embedded.unwrap_or(false);
        let embedded_addr = cli
            .embedded_broker_listen
            .or(file.broker.embedded_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1883)));
        let db = BrokerConfig::default();
        let (host, port) = match cli.broker.as_ref().or(file.broker.url.as_ref()) {
            Some(url) => BrokerConfig::parse_url(url)?,
            None if embedded => (embedded_addr.ip().to_string(), embedded_addr.port()),
            None => (db.host.clone(), db.port),
        };
        let broker = BrokerConfig {
            host,
            port,
            username: cli.username.clone().or(file.broker.username),
            password: cli.password.clone().or(file.broker.password),
            client_id_prefix: cli
                .client_id_prefix
                .clone()
                .or(file.broker.client_id_prefix)
                .unwrap_or_default(),
            request_capacity: file.broker.request_capacity.unwrap_or(db.request_capacity),
            inflight: file.broker.inflight.unwrap_or(db.inflight),
            connect_timeout_secs: file.broker.connect_timeout_secs.unwrap_or(db.connect_timeout_secs),
        };

        let mut udp = cli.udp.clone();
        if udp.is_empty() {
            udp = file.udp.listen;
        }
        if udp.is_empty() {
            udp.push(SocketAddr::from(([0, 0, 0, 0], 10000)));
        }
        let stats = cli.stats_interval.or(file.gateway.stats_interval_secs).unwrap_or(60);
        Ok(Settings {
            engine,
            udp,
            broker,
            embedded_broker: embedded.then_some(embedded_addr),
            stats_interval: (stats > 0).then(|| Duration::from_secs(stats)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../docs/gateway.example.toml");
        let file = FileConfig::parse(text).expect("example parses");
        let s = Settings::combine(file, &Cli::default()).expect("example resolves");
        assert_eq!(s.engine.predefined.id("sensors/temp"), Some(77));
        assert_eq!(s.udp.len(), 1);
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::parse(
            "[broker]\nurl = \"mqtt://10.0.0.1:1884\"\n[predefined]\n77 = \"a/b\"\n[timers]\nmax_retries = 2\n",
        )
        .expect("parses");
        let cli = Cli::parse_from([
            "mqtt-sn-gateway",
            "--broker",
            "mqtt://127.0.0.1:1999",
            "--predefined",
            "77=c/d",
            "--max-retries",
            "7",
            "--udp",
            "127.0.0.1:10001",
        ]);
        let s = Settings::combine(file, &cli).expect("resolves");
        assert_eq!((s.broker.host.as_str(), s.broker.port), ("127.0.0.1", 1999));
        assert_eq!(s.engine.predefined.name(77).map(|n| &**n), Some("c/d"));
        assert_eq!(s.engine.max_retries, 7);
        assert_eq!(s.udp, vec![SocketAddr::from(([127, 0, 0, 1], 10001))]);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert!(FileConfig::parse("[broker]\nurll = 1\n").is_err());
        let bad_id = FileConfig::parse("[predefined]\nx = \"a\"\n").expect("parses");
        assert!(Settings::combine(bad_id, &Cli::default())
            .unwrap_err()
            .contains("predefined"));
        let bad_factor = FileConfig::parse("[sleep]\ntolerance_factor = -1.0\n").expect("parses");
        assert!(Settings::combine(bad_factor, &Cli::default()).is_err());
        assert!(parse_predefined("77").is_err());
        assert!(parse_predefined("x=a").is_err());
    }
}
