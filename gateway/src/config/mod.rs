//! Configuration: one typed struct ([`Config`]) holding every key with its default,
//! layered from the defaults, the TOML file (`--config`), the environment (`MQTT_SN_*`)
//! and the flags given on the command line, in that order (later ones win), then
//! validated once into the runtime [`Settings`] that each module takes its slice of.
//!
//! Every key is documented in `docs/configuration.md`; a test checks that page against
//! [`Config`], so the two cannot drift apart.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::broker::mqtt::{BrokerConfig, LinkMode};
use crate::engine::EngineConfig;
use crate::transport::serial::SerialPortConfig;

mod cli;
mod reload;
mod validate;

pub use cli::{
    AuthFlags, BrokerFlags, Cli, DiscoveryFlags, GatewayFlags, LimitsFlags, LogFlags, MetricsFlags, SerialFlag,
    StateFlags, TimersFlags, UdpFlags,
};
pub use reload::{Changes, KeyedChanges, PredefinedChanges, RELOADABLE};
pub use validate::{DtlsListener, LogSettings, MetricsSettings, Settings, StateSettings, UdpProbe};

/// Prefix of the environment variables that set configuration keys:
/// `MQTT_SN_<SECTION>__<KEY>`, e.g. `MQTT_SN_BROKER__URL`.
pub const ENV_PREFIX: &str = "MQTT_SN_";

/// The environment variable of the broker password kept from earlier versions (the same
/// key as `MQTT_SN_BROKER__PASSWORD`).
pub const LEGACY_PASSWORD_ENV: &str = "MQTT_SN_BROKER_PASSWORD";

// ---------------------------------------------------------------------------------------
// The configuration: every key once, with its default.
// ---------------------------------------------------------------------------------------

/// Every configuration key, as the file, the environment and the flags set it. Defaults
/// come from [`Default`]; [`Config::validate`] turns it into [`Settings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: identity, logging, QoS -1, shutdown.
    pub gateway: GatewayConfig,
    /// `[udp]`: listeners.
    pub udp: UdpConfig,
    /// `[broker]`: the MQTT broker.
    pub broker: BrokerSection,
    /// `[timers]`: retransmission and supervision.
    pub timers: TimersConfig,
    /// `[sleep]`: sleeping clients.
    pub sleep: SleepConfig,
    /// `[limits]`: resource bounds.
    pub limits: LimitsConfig,
    /// `[discovery]`: ADVERTISE and GWINFO.
    pub discovery: DiscoveryConfig,
    /// `[log]`: log format and level.
    pub log: LogConfig,
    /// `[predefined]`: topic id (as a string key) = topic name.
    pub predefined: BTreeMap<String, String>,
    /// `[[serial]]`: one table per serial port.
    pub serial: Vec<SerialConfig>,
    /// `[[dtls]]`: one table per DTLS listener.
    pub dtls: Vec<DtlsConfig>,
    /// `[metrics]`: the Prometheus and health endpoint, and the UDP health probe.
    pub metrics: MetricsConfig,
    /// `[auth]`: device identity and access control.
    pub auth: AuthSection,
    /// `[state]`: the crash-safe state store.
    pub state: StateConfig,
}

/// `[state]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the state store (`gateway.redb`); unset: state is kept in memory
    /// only and a restart forgets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// On a damaged store: rename it aside and start with an empty one (with a loud
    /// warning) instead of refusing to start.
    pub recover: bool,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// `"open"` (any client id from anywhere) or `"registry"` (only the devices of
    /// `devices_file`); unset: registry when `devices_file` is set, else open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The device registry (TOML, `[[device]]` entries); a relative path is taken from
    /// the working directory. Re-read on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_file: Option<PathBuf>,
    /// `"allow"` or `"deny"` a CONNECT takeover or a PINGREQ wake from an address other
    /// than the session's; unset: deny in registry mode, allow in open mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_change: Option<String>,
    /// Prefix of every topic a device publishes or subscribes to on the broker
    /// (`%c`: client id, `%u`: broker user name), stripped from what it receives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving `GET /metrics` (Prometheus text) and `GET /healthz`; unset:
    /// no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// A datagram on a UDP listener equal to these bytes is answered with
    /// `udp_probe_reply` instead of reaching the engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_probe_request: Option<String>,
    /// The answer to `udp_probe_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_probe_reply: Option<String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id (0-255) sent in GWINFO and ADVERTISE.
    pub id: u8,
    /// Seconds between statistics lines in the log; 0 turns them off.
    pub stats_interval_secs: u64,
    /// Accept QoS -1 publishes (to predefined ids and short names) from any address.
    pub qos_minus_one: bool,
    /// On SIGTERM/SIGINT, how long in-flight work may take before the gateway exits.
    pub shutdown_timeout_secs: f64,
    /// On SIGTERM/SIGINT, publish the wills of connected devices (as if they were lost).
    pub publish_wills_on_shutdown: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        GatewayConfig {
            id: e.gateway_id,
            stats_interval_secs: 60,
            qos_minus_one: e.qos_minus_one,
            shutdown_timeout_secs: 5.0,
            publish_wills_on_shutdown: false,
        }
    }
}

/// `[udp]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// Addresses to serve MQTT-SN on.
    pub listen: Vec<SocketAddr>,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 10000))],
        }
    }
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS; unset: the embedded broker
    /// when it runs, else `mqtt://127.0.0.1:1883`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// With `mqtts://`: PEM file of the CA certificates the broker's certificate must
    /// chain to; unset: the system's trusted roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With `mqtts://`: PEM certificate (chain) the gateway presents to the broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// User name sent in every device's MQTT CONNECT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password sent with the user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Prepended to each device's client id on the broker.
    pub client_id_prefix: String,
    /// Run the embedded broker (rumqttd) in-process.
    pub embedded: bool,
    /// The embedded broker's address (port 0: any free port).
    pub embedded_listen: SocketAddr,
    /// Requests queued towards the broker per device connection.
    pub request_capacity: usize,
    /// Requests per connection that wait, in order, behind a full request queue.
    pub backlog_capacity: usize,
    /// Topic and payload octets that backlog may hold per connection.
    pub backlog_bytes: usize,
    /// QoS 1/2 publishes per connection awaiting the broker's acknowledgement.
    pub inflight: u16,
    /// Seconds allowed for the TCP connect and CONNACK.
    pub connect_timeout_secs: u64,
    /// Broker connections held at once (0: the process's open-file limit less a reserve).
    pub max_connections: usize,
    /// `transparent` (one broker connection per device) or `aggregating` (shared ones).
    pub mode: LinkMode,
    /// Aggregating mode: shared broker connections, devices spread over them by client id.
    pub connections: usize,
    /// Aggregating mode: QoS 1/2 messages kept per device away with clean session false.
    pub offline_queue: usize,
    /// Local addresses the broker connections are made from, in turn (empty: the
    /// kernel's choice): each gives another ~28,000 ephemeral ports toward the broker.
    pub source_addresses: Vec<IpAddr>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        let b = BrokerConfig::default();
        BrokerSection {
            url: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            client_id_prefix: b.client_id_prefix.clone(),
            embedded: false,
            embedded_listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), b.port),
            request_capacity: b.request_capacity,
            backlog_capacity: b.backlog_capacity,
            backlog_bytes: b.backlog_bytes,
            inflight: b.inflight,
            connect_timeout_secs: b.connect_timeout_secs,
            max_connections: b.max_connections.unwrap_or(0),
            mode: b.mode,
            connections: b.connections,
            offline_queue: b.offline_queue,
            source_addresses: b.source_addresses.clone(),
        }
    }
}

/// `[timers]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimersConfig {
    /// Tretry, seconds.
    pub retry_interval_secs: f64,
    /// Nretry.
    pub max_retries: u32,
    /// A device silent for this many times its keep-alive is lost.
    pub keep_alive_factor: f64,
    /// Seconds allowed for the will handshake and the broker connect.
    pub connect_timeout_secs: f64,
}

impl Default for TimersConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        TimersConfig {
            retry_interval_secs: e.retry_interval.as_secs_f64(),
            max_retries: e.max_retries,
            keep_alive_factor: e.keep_alive_factor,
            connect_timeout_secs: e.connect_timeout.as_secs_f64(),
        }
    }
}

/// `[sleep]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SleepConfig {
    /// A sleeping device not heard from within this many times its sleep is lost.
    pub tolerance_factor: f64,
    /// Longest sleep accepted, seconds.
    pub max_duration_secs: u64,
    /// Messages held per device.
    pub max_held_messages: usize,
    /// Topic + payload octets held per device.
    pub max_held_bytes: usize,
}

impl Default for SleepConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        SleepConfig {
            tolerance_factor: e.sleep_factor,
            max_duration_secs: e.max_sleep.as_secs(),
            max_held_messages: e.max_queued_messages,
            max_held_bytes: e.max_queued_bytes,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Client sessions.
    pub max_clients: usize,
    /// Normal topic ids per device.
    pub max_topics_per_client: usize,
    /// Clean-session-false devices whose topic ids are kept after they go.
    pub max_persisted_sessions: usize,
    /// Seconds the topic ids of a clean-session-false device that went are kept
    /// (0: until it comes back).
    pub session_expiry_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        LimitsConfig {
            max_clients: e.max_clients,
            max_topics_per_client: e.max_topics_per_client,
            max_persisted_sessions: e.max_persisted_sessions,
            session_expiry_secs: e.session_expiry.map_or(0, |d| d.as_secs()),
        }
    }
}

/// `[discovery]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Seconds between ADVERTISE broadcasts; 0 = never.
    pub advertise_interval_secs: u64,
    /// UDP broadcast or multicast address for ADVERTISE and GWINFO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<SocketAddr>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        DiscoveryConfig {
            advertise_interval_secs: e.advertise_interval.map_or(0, |d| d.as_secs()),
            advertise_addr: e.udp_broadcast,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (one human-readable line per event) or `"json"` (one JSON object per line).
    pub format: String,
    /// A tracing `EnvFilter` directive, e.g. `"info"` or `"info,gateway=debug"`;
    /// `RUST_LOG`, when set, overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text.as_str().into(),
            level: "info".into(),
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (coloured when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `[[dtls]]`: one DTLS listener (PSK, keys from the device registry; certificates when
/// `cert`, `key` and `client_ca` are given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DtlsConfig {
    /// UDP address to serve MQTT-SN over DTLS on (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// DTLS handshakes in progress at once; ClientHellos beyond are dropped.
    pub max_handshakes: usize,
    /// New DTLS handshakes per second (bursts up to one second's worth); ClientHellos
    /// with a valid cookie beyond are dropped.
    pub handshake_rate: u32,
    /// Seconds after which a DTLS session not heard from is closed.
    pub idle_timeout_secs: u64,
    /// The server certificate (PEM) for the ECDHE-ECDSA suite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM, ECDSA P-256 or P-384).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The CA (PEM) device certificates must be signed by; client certificates are
    /// then required on the certificate suite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Which name of a device certificate is its identity: `cn` or `san`.
    pub identity: String,
}

impl Default for DtlsConfig {
    fn default() -> Self {
        let d = crate::transport::dtls::DtlsLimits::default();
        DtlsConfig {
            address: None,
            max_handshakes: d.max_handshakes,
            handshake_rate: d.handshake_rate,
            idle_timeout_secs: d.idle_timeout.as_secs(),
            cert: None,
            key: None,
            client_ca: None,
            identity: crate::transport::dtls_cert::IdentityRule::default().as_str().into(),
        }
    }
}

/// `[[serial]]`: one serial port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Baud rate.
    pub baud: u32,
    /// Data bits, 5 to 8.
    pub data_bits: u8,
    /// `"none"`, `"odd"` or `"even"`.
    pub parity: String,
    /// 1 or 2.
    pub stop_bits: u8,
    /// `"cobs"` or `"raw"`.
    pub framing: String,
}

impl Default for SerialConfig {
    fn default() -> Self {
        let d = SerialPortConfig::new("");
        SerialConfig {
            path: None,
            baud: d.baud,
            data_bits: 8,
            parity: "none".into(),
            stop_bits: 1,
            framing: d.framing.as_str().into(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Layering and validation.
// ---------------------------------------------------------------------------------------

/// Every problem found in a configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(e)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// Whether any message contains `needle` (for tests and callers that branch on it).
    pub fn mentions(&self, needle: &str) -> bool {
        self.0.iter().any(|e| e.contains(needle))
    }
}

impl From<figment::Error> for ConfigErrors {
    fn from(e: figment::Error) -> Self {
        ConfigErrors(e.into_iter().map(|e| e.to_string()).collect())
    }
}

impl Config {
    /// Defaults, then the file `cli.config` (if given), then the process environment,
    /// then the flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigErrors> {
        Self::load_with_env(cli, std::env::vars())
    }

    /// [`Config::load`] with the environment given (tests pass their own).
    pub fn load_with_env(cli: &Cli, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigErrors> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            figment = figment.merge(Toml::string(&read_file(path)?));
        }
        figment = merge_env(figment, env)?;
        figment = figment.merge(cli.layer()?);
        // Lossy: environment values arrive as text, and "10" must fill a number.
        Ok(figment.extract_lossy()?)
    }

    /// Parses configuration text on top of the defaults (no environment, no flags).
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Ok(Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract_lossy()?)
    }

    /// The configuration as TOML, the password replaced by `"<redacted>"`.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.broker.password.is_some() {
            shown.broker.password = Some("<redacted>".into());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))
}

/// `MQTT_SN_<SECTION>__<KEY>=value` sets `section.key`. Values are taken as text, and
/// the lossy extraction reads numbers and booleans out of them where a key wants one
/// (figment's own `Env` provider parses every value, so that a numeric password would
/// become a number). A variable with the prefix that names no key is an error, as
/// an unknown file key is.
fn merge_env(mut figment: Figment, env: impl IntoIterator<Item = (String, String)>) -> Result<Figment, ConfigErrors> {
    let mut errors = Vec::new();
    let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    // The legacy name first, so that MQTT_SN_BROKER__PASSWORD wins when both are set.
    vars.sort_by_key(|(k, _)| k != LEGACY_PASSWORD_ENV);
    for (name, value) in vars {
        let key = if name == LEGACY_PASSWORD_ENV {
            "broker.password".to_string()
        } else {
            let rest = &name[ENV_PREFIX.len()..];
            match rest.split_once("__") {
                Some((section, key)) if !section.is_empty() && !key.is_empty() && !key.contains("__") => {
                    format!("{}.{}", section.to_ascii_lowercase(), key.to_ascii_lowercase())
                }
                _ => {
                    errors.push(format!(
                        "environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}BROKER__URL"
                    ));
                    continue;
                }
            }
        };
        figment = figment.merge(Serialized::default(&key, env_value(&key, value)));
    }
    if errors.is_empty() {
        Ok(figment)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A list key (`udp.listen`, `broker.source_addresses`) takes a comma-separated value;
/// others take it as it is.
fn env_value(key: &str, value: String) -> figment::value::Value {
    if key == "udp.listen" || key == "broker.source_addresses" {
        let items: Vec<figment::value::Value> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string().into())
            .collect();
        return items.into();
    }
    value.into()
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_dtls;
#[cfg(test)]
mod tests_tls;
