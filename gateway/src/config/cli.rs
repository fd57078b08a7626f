//! The command line: each flag is named by the configuration key it sets (its clap id is
//! the key path), so that `--help` shows the key's default and only the flags given
//! become the last configuration layer.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use figment::providers::Serialized;
use serde::{Serialize, Serializer};
use sn_codec::framing::FramingKind;

use super::{Config, ConfigErrors};

// ---------------------------------------------------------------------------------------

/// The command line of `mqtt-sn-gateway`. Each flag's id is the configuration key it
/// sets (`broker.url`), which is how `--help` finds its default and how the flags become
/// the last configuration layer: only the flags given are serialized.
#[derive(Debug, Clone, Default, Parser, Serialize)]
#[command(
    name = "mqtt-sn-gateway",
    version,
    about = "MQTT-SN v1.2 gateway: serves sensors speaking MQTT-SN over UDP and serial links and makes each an MQTT 3.1.1 client of a broker",
    after_help = "Settings are layered: defaults, then the --config file, then MQTT_SN_<SECTION>__<KEY> environment variables (e.g. MQTT_SN_BROKER__URL), then these flags.\n\nExamples:\n  mqtt-sn-gateway --udp 127.0.0.1:10000 --broker mqtt://127.0.0.1:1883\n  mqtt-sn-gateway --embedded-broker\n  mqtt-sn-gateway --serial /dev/ttyUSB0:115200 --broker mqtt://127.0.0.1:1883\n  mqtt-sn-gateway --config gateway.toml --check-config\n\nLogging: --log-level / log.level (RUST_LOG, when set, overrides it), --log-format text|json. Configuration keys: docs/configuration.md"
)]
pub struct Cli {
    /// TOML configuration file; the environment and flags override its values.
    #[arg(short, long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 2 with every error otherwise.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// Print the effective configuration as TOML (password redacted) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// `[gateway]` flags.
    #[command(flatten)]
    pub gateway: GatewayFlags,
    /// `[udp]` flags.
    #[command(flatten)]
    pub udp: UdpFlags,
    /// `[broker]` flags.
    #[command(flatten)]
    pub broker: BrokerFlags,
    /// `[timers]` flags.
    #[command(flatten)]
    pub timers: TimersFlags,
    /// `[limits]` flags.
    #[command(flatten)]
    pub limits: LimitsFlags,
    /// `[discovery]` flags.
    #[command(flatten)]
    pub discovery: DiscoveryFlags,
    /// `[metrics]` flags.
    #[command(flatten)]
    pub metrics: MetricsFlags,
    /// `[log]` flags.
    #[command(flatten)]
    pub log: LogFlags,
    /// `[auth]` flags.
    #[command(flatten)]
    pub auth: AuthFlags,
    /// `[state]` flags.
    #[command(flatten)]
    pub state: StateFlags,
    /// Predefined topic, ID=TOPIC (repeatable), e.g. 77=sensors/temp; replaces the
    /// file's entry for the same id.
    #[arg(long, id = "predefined", value_name = "ID=TOPIC", value_parser = parse_predefined)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "predefined_as_map")]
    pub predefined: Vec<(u16, String)>,
    /// Serial port to serve MQTT-SN on (repeatable), 8N1, e.g. /dev/ttyUSB0:115200 or
    /// /dev/ttyACM0:9600:raw. Replaces the serial ports of the configuration file.
    #[arg(long = "serial", id = "serial", value_name = "PATH[:BAUD[:FRAMING]]", value_parser = parse_serial_flag)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serial: Vec<SerialFlag>,
    /// UDP address to serve MQTT-SN over DTLS (PSK) on (repeatable); replaces the
    /// file's `[[dtls]]` listeners. Keys come from the device registry.
    #[arg(long = "dtls", id = "dtls", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dtls: Vec<DtlsFlag>,
    /// Framing of the --serial ports that do not name one: cobs (default) or raw.
    #[arg(long, value_name = "FRAMING")]
    #[serde(skip)]
    pub serial_framing: Option<FramingKind>,
    /// Server certificate (PEM) of the --dtls listeners, for the ECDHE-ECDSA suite
    /// (with --dtls-key and --dtls-client-ca).
    #[arg(long = "dtls-cert", value_name = "PEM", requires = "dtls")]
    #[serde(skip)]
    pub dtls_cert: Option<PathBuf>,
    /// Private key (PEM) of --dtls-cert.
    #[arg(long = "dtls-key", value_name = "PEM", requires = "dtls")]
    #[serde(skip)]
    pub dtls_key: Option<PathBuf>,
    /// CA (PEM) the device certificates of the --dtls listeners must be signed by.
    #[arg(long = "dtls-client-ca", value_name = "PEM", requires = "dtls")]
    #[serde(skip)]
    pub dtls_client_ca: Option<PathBuf>,
    /// Which name of a device certificate is its identity on the --dtls listeners: cn or san.
    #[arg(long = "dtls-identity", value_name = "cn|san", requires = "dtls")]
    #[serde(skip)]
    pub dtls_identity: Option<String>,
    /// New DTLS handshakes per second on each --dtls listener (bursts of one second's worth).
    #[arg(long = "dtls-handshake-rate", value_name = "N", requires = "dtls")]
    #[serde(skip)]
    pub dtls_handshake_rate: Option<u32>,
}

/// `[gateway]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct GatewayFlags {
    /// Gateway id announced in GWINFO/ADVERTISE.
    #[arg(long = "gateway-id", id = "gateway.id", value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u8>,
    /// Seconds between statistics lines in the log (0: never).
    #[arg(long = "stats-interval", id = "gateway.stats_interval_secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_interval_secs: Option<u64>,
    /// Seconds in-flight work may take on SIGTERM/SIGINT before the gateway exits.
    #[arg(long = "shutdown-timeout", id = "gateway.shutdown_timeout_secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<f64>,
    /// Publish the wills of connected devices when the gateway is stopped.
    #[arg(long = "publish-wills-on-shutdown", id = "gateway.publish_wills_on_shutdown")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub publish_wills_on_shutdown: bool,
}

/// `[udp]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct UdpFlags {
    /// UDP address to serve MQTT-SN on (repeatable); replaces the file's list.
    #[arg(long = "udp", id = "udp.listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<SocketAddr>,
}

/// `[broker]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct BrokerFlags {
    /// Broker URL, mqtt://host:port, or mqtts://host:port for TLS [default: the embedded broker when it runs, else mqtt://127.0.0.1:1883].
    #[arg(long = "broker", id = "broker.url", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PEM file of the CAs the broker's TLS certificate must chain to [default: the system's trusted roots].
    #[arg(long = "broker-ca", id = "broker.ca_file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate the gateway presents to a broker that asks for one (with --broker-key).
    #[arg(long = "broker-cert", id = "broker.client_cert", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(long = "broker-key", id = "broker.client_key", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// User name for the broker.
    #[arg(long = "username", id = "broker.username", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for the broker (better: MQTT_SN_BROKER__PASSWORD in the environment).
    #[arg(long = "password", id = "broker.password", value_name = "PASSWORD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Prefix added to each device's client id on the broker.
    #[arg(long = "client-id-prefix", id = "broker.client_id_prefix", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_prefix: Option<String>,
    /// Run an in-process broker (rumqttd) on loopback and serve through it.
    #[arg(long = "embedded-broker", id = "broker.embedded")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub embedded: bool,
    /// Address of the embedded broker.
    #[arg(long = "embedded-broker-listen", id = "broker.embedded_listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded_listen: Option<SocketAddr>,
    /// transparent: one broker connection per device; aggregating: a few shared ones, the gateway keeping subscriptions and sessions (docs/scaling.md).
    #[arg(long = "mode", id = "broker.mode", value_name = "MODE", value_parser = ["transparent", "aggregating"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Aggregating mode: the shared broker connections, devices spread over them by client id.
    #[arg(long = "broker-connections", id = "broker.connections", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// Local address to make broker connections from (repeatable: used in turn, each adding ~28,000 ephemeral ports); replaces the file's list.
    #[arg(long = "broker-source-address", id = "broker.source_addresses", value_name = "IP")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_addresses: Vec<IpAddr>,
}

/// `[timers]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct TimersFlags {
    /// Tretry: seconds before a message to a device is retransmitted.
    #[arg(long = "retry-interval", id = "timers.retry_interval_secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_interval_secs: Option<f64>,
    /// Nretry: retransmissions before a device is declared lost.
    #[arg(long = "max-retries", id = "timers.max_retries", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// `[limits]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct LimitsFlags {
    /// Maximum number of client sessions.
    #[arg(long = "max-clients", id = "limits.max_clients", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<usize>,
    /// Seconds a clean-session-false device that went keeps its topic ids (0: until it
    /// comes back).
    #[arg(long = "session-expiry", id = "limits.session_expiry_secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_expiry_secs: Option<u64>,
}

/// `[discovery]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct DiscoveryFlags {
    /// Seconds between ADVERTISE broadcasts (0: never).
    #[arg(
        long = "advertise-interval",
        id = "discovery.advertise_interval_secs",
        value_name = "SECS"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_interval_secs: Option<u64>,
    /// UDP broadcast or multicast address for ADVERTISE and GWINFO, e.g. 255.255.255.255:10000.
    #[arg(long = "advertise-addr", id = "discovery.advertise_addr", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<SocketAddr>,
}

/// `[metrics]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct MetricsFlags {
    /// TCP address serving GET /metrics (Prometheus) and GET /healthz, e.g. 127.0.0.1:9100.
    #[arg(long = "metrics", id = "metrics.listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// `[log]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct LogFlags {
    /// Log format on stderr: text, or json (one JSON object per line).
    #[arg(long = "log-format", id = "log.format", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Log level, a tracing EnvFilter directive such as info or info,gateway=debug (RUST_LOG, when set, overrides it).
    #[arg(long = "log-level", id = "log.level", value_name = "LEVEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// `[auth]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct AuthFlags {
    /// Device registry file (TOML); selects registry mode by itself.
    #[arg(long = "devices", id = "auth.devices_file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_file: Option<PathBuf>,
    /// Authentication mode: open or registry [default: registry with --devices, else open].
    #[arg(long = "auth-mode", id = "auth.mode", value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Takeover and wake from another address: allow or deny [default: deny in registry mode, else allow].
    #[arg(long = "address-change", id = "auth.address_change", value_name = "POLICY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_change: Option<String>,
    /// Prefix of every device topic on the broker, e.g. site-a/%c/ (%c client id, %u user name).
    #[arg(long = "mountpoint", id = "auth.mountpoint", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
}

/// `[state]` flags.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct StateFlags {
    /// Directory of the crash-safe state store (topic ids of clean-session-false devices survive a restart) [default: none, in memory].
    #[arg(long = "state-dir", id = "state.dir", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// On a damaged state store: keep it aside and start with an empty one instead of refusing to start.
    #[arg(long = "state-recover", id = "state.recover")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recover: bool,
}

/// A DTLS listener given on the command line: its address, and the certificates of
/// `--dtls-cert`, `--dtls-key`, `--dtls-client-ca`, `--dtls-identity` and
/// `--dtls-handshake-rate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DtlsFlag {
    /// The listener's address.
    pub address: SocketAddr,
    /// `--dtls-cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// `--dtls-key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// `--dtls-client-ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// `--dtls-identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `--dtls-handshake-rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_rate: Option<u32>,
}

impl std::str::FromStr for DtlsFlag {
    type Err = std::net::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DtlsFlag {
            address: s.parse()?,
            cert: None,
            key: None,
            client_ca: None,
            identity: None,
            handshake_rate: None,
        })
    }
}

/// A serial port given on the command line: `PATH[:BAUD[:FRAMING]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SerialFlag {
    /// Device path.
    pub path: PathBuf,
    /// Baud rate, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
    /// Framing, if given.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "framing_name")]
    pub framing: Option<FramingKind>,
}

fn framing_name<S: Serializer>(f: &Option<FramingKind>, s: S) -> Result<S::Ok, S::Error> {
    match f {
        Some(f) => s.serialize_str(f.as_str()),
        None => s.serialize_none(),
    }
}

fn predefined_as_map<S: Serializer>(entries: &[(u16, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(entries.iter().map(|(id, topic)| (id.to_string(), topic)))
}

pub(super) fn parse_serial_flag(s: &str) -> Result<SerialFlag, String> {
    let usage =
        || format!("{s:?}: expected PATH[:BAUD[:FRAMING]], e.g. /dev/ttyUSB0:115200 or /dev/ttyUSB0:115200:raw");
    let mut rest = s;
    let mut framing = None;
    if let Some((head, tail)) = rest.rsplit_once(':') {
        if let Ok(f) = tail.parse::<FramingKind>() {
            framing = Some(f);
            rest = head;
        }
    }
    let mut baud = None;
    if let Some((head, tail)) = rest.rsplit_once(':') {
        baud = Some(tail.parse::<u32>().ok().filter(|b| *b > 0).ok_or_else(usage)?);
        rest = head;
    } else if framing.is_some() {
        // PATH:FRAMING without a baud rate reads too much like a typo.
        return Err(usage());
    }
    if rest.is_empty() {
        return Err(usage());
    }
    Ok(SerialFlag {
        path: PathBuf::from(rest),
        baud,
        framing,
    })
}

pub(super) fn parse_predefined(s: &str) -> Result<(u16, String), String> {
    let (id, topic) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=TOPIC, e.g. 77=sensors/temp"))?;
    let id = id
        .trim()
        .parse::<u16>()
        .map_err(|_| format!("{s:?}: topic id must be a number from 1 to 65534"))?;
    Ok((id, topic.to_string()))
}

impl Cli {
    /// The clap command, each flag's help ending with its default from [`Config`].
    pub fn command_with_defaults() -> clap::Command {
        let defaults = toml::Value::try_from(Config::default()).ok();
        Cli::command().mut_args(|arg| {
            let shown = defaults
                .as_ref()
                .and_then(|d| lookup(d, arg.get_id().as_str()))
                .and_then(display_default);
            match (shown, arg.get_help().cloned()) {
                (Some(default), Some(help)) => arg.help(format!("{help} [default: {default}]")),
                _ => arg,
            }
        })
    }

    /// Parses the process's arguments (exits with clap's message on a usage error).
    pub fn parse_args() -> Cli {
        let matches = Self::command_with_defaults().get_matches();
        match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    }

    /// The flags as the last configuration layer.
    pub(super) fn layer(&self) -> Result<Serialized<Cli>, ConfigErrors> {
        let mut seen = std::collections::BTreeSet::new();
        let twice: Vec<String> = self
            .predefined
            .iter()
            .filter(|(id, _)| !seen.insert(*id))
            .map(|(id, _)| format!("--predefined: topic id {id} is given twice"))
            .collect();
        if !twice.is_empty() {
            return Err(ConfigErrors(twice));
        }
        let mut flags = self.clone();
        for port in &mut flags.serial {
            port.framing = port.framing.or(self.serial_framing);
        }
        for listener in &mut flags.dtls {
            listener.cert.clone_from(&self.dtls_cert);
            listener.key.clone_from(&self.dtls_key);
            listener.client_ca.clone_from(&self.dtls_client_ca);
            listener.identity.clone_from(&self.dtls_identity);
            listener.handshake_rate = self.dtls_handshake_rate;
        }
        Ok(Serialized::defaults(flags))
    }
}

/// The value at a dotted key path.
pub(super) fn lookup<'v>(root: &'v toml::Value, path: &str) -> Option<&'v toml::Value> {
    path.split('.').try_fold(root, |v, key| v.get(key))
}

/// How a default appears in `--help`; `None` for flags whose default says nothing
/// (off switches, empty lists).
fn display_default(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) if s.is_empty() => Some("\"\"".into()),
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Boolean(false) => None,
        toml::Value::Array(a) if a.is_empty() => None,
        toml::Value::Table(t) if t.is_empty() => None,
        toml::Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Some(format!("{f:.0}")),
        toml::Value::Array(a) => Some(a.iter().filter_map(display_default).collect::<Vec<_>>().join(", ")),
        other => Some(other.to_string()),
    }
}
