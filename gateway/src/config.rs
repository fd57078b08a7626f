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
use crate::transport::serial::SerialPortConfig;
use sn_codec::framing::FramingKind;
use tokio_serial::{DataBits, Parity, StopBits};

/// The command line of `mqtt-sn-gateway`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "mqtt-sn-gateway",
    version,
    about = "MQTT-SN v1.2 gateway: serves sensors speaking MQTT-SN over UDP and serial links and makes each an MQTT 3.1.1 client of a broker",
    after_help = "Examples:\n  mqtt-sn-gateway --udp 127.0.0.1:10000 --broker mqtt://127.0.0.1:1883\n  mqtt-sn-gateway --embedded-broker\n  mqtt-sn-gateway --serial /dev/ttyUSB0:115200 --broker mqtt://127.0.0.1:1883\n  mqtt-sn-gateway --config gateway.toml --predefined 77=sensors/temp\n\nLogging: RUST_LOG=debug (or e.g. RUST_LOG=gateway=debug,info). Configuration keys: docs/configuration.md"
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
    /// Serial port to serve MQTT-SN on (repeatable), 8N1, e.g. /dev/ttyUSB0:115200 or
    /// /dev/ttyACM0:9600:raw. Replaces the serial ports of the configuration file.
    #[arg(long = "serial", value_name = "PATH[:BAUD[:FRAMING]]", value_parser = parse_serial_flag)]
    pub serial: Vec<SerialFlag>,
    /// Framing of the --serial ports that do not name one: cobs (default) or raw.
    #[arg(long, value_name = "FRAMING")]
    pub serial_framing: Option<FramingKind>,
    /// Seconds between ADVERTISE broadcasts (0: never; default 900).
    #[arg(long, value_name = "SECS")]
    pub advertise_interval: Option<u64>,
    /// UDP broadcast or multicast address for ADVERTISE and GWINFO, e.g. 255.255.255.255:10000.
    #[arg(long, value_name = "ADDR")]
    pub advertise_addr: Option<SocketAddr>,
}

/// A serial port given on the command line: `PATH[:BAUD[:FRAMING]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialFlag {
    /// Device path.
    pub path: PathBuf,
    /// Baud rate, if given.
    pub baud: Option<u32>,
    /// Framing, if given.
    pub framing: Option<FramingKind>,
}

fn parse_serial_flag(s: &str) -> Result<SerialFlag, String> {
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
    /// `[[serial]]`: one table per serial port.
    pub serial: Vec<SerialSection>,
    /// `[discovery]`.
    pub discovery: DiscoverySection,
}

/// `[[serial]]`: one serial port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerialSection {
    /// Device path (required).
    pub path: Option<PathBuf>,
    /// Baud rate.
    pub baud: Option<u32>,
    /// Data bits, 5 to 8.
    pub data_bits: Option<u8>,
    /// "none", "odd" or "even".
    pub parity: Option<String>,
    /// 1 or 2.
    pub stop_bits: Option<u8>,
    /// "cobs" or "raw".
    pub framing: Option<String>,
}

/// `[discovery]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverySection {
    /// Seconds between ADVERTISE broadcasts; 0 = never.
    pub advertise_interval_secs: Option<u64>,
    /// UDP broadcast or multicast address for ADVERTISE and GWINFO.
    pub advertise_addr: Option<SocketAddr>,
}

impl SerialSection {
    /// Checks the values and fills in the defaults.
    fn resolve(&self, n: usize) -> Result<SerialPortConfig, String> {
        let at = |key: &str| format!("[[serial]] #{} {key}", n + 1);
        let path = self
            .path
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| format!("{} is required, e.g. path = \"/dev/ttyUSB0\"", at("path")))?;
        let mut port = SerialPortConfig::new(path);
        if let Some(baud) = self.baud {
            if baud == 0 {
                return Err(format!("{} must be a positive number", at("baud")));
            }
            port.baud = baud;
        }
        port.data_bits = match self.data_bits.unwrap_or(8) {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            8 => DataBits::Eight,
            other => return Err(format!("{} must be 5, 6, 7 or 8, not {other}", at("data_bits"))),
        };
        port.parity = match self.parity.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("none") => Parity::None,
            Some("odd") => Parity::Odd,
            Some("even") => Parity::Even,
            Some(other) => {
                return Err(format!(
                    "{} must be \"none\", \"odd\" or \"even\", not {other:?}",
                    at("parity")
                ))
            }
        };
        port.stop_bits = match self.stop_bits.unwrap_or(1) {
            1 => StopBits::One,
            2 => StopBits::Two,
            other => return Err(format!("{} must be 1 or 2, not {other}", at("stop_bits"))),
        };
        if let Some(f) = &self.framing {
            port.framing = f
                .parse()
                .map_err(|_| format!("{} must be \"cobs\" or \"raw\", not {f:?}", at("framing")))?;
        }
        Ok(port)
    }
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
    /// Seconds a graceful stop waits for exchanges in flight.
    pub shutdown_timeout_secs: Option<u64>,
    /// Publish every device's will when the gateway stops.
    pub publish_wills_on_shutdown: Option<bool>,
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
    /// Serial ports, indexed as [`crate::engine::LinkAddr::Serial`].
    pub serial: Vec<SerialPortConfig>,
    /// On SIGTERM/SIGINT: how long, in seconds, exchanges in flight may take to finish
    /// before every session is ended anyway (see [`crate::engine::Gateway::shutdown`]).
    pub shutdown_timeout_secs: u64,
    /// On SIGTERM/SIGINT: publish every device's will (default: no will fires on a
    /// planned stop).
    pub publish_wills_on_shutdown: bool,
}

impl Default for Settings {
    /// The defaults: UDP on 0.0.0.0:10000, the broker on 127.0.0.1:1883, no serial port.
    fn default() -> Self {
        Settings {
            engine: EngineConfig::default(),
            udp: vec![SocketAddr::from(([0, 0, 0, 0], 10000))],
            broker: BrokerConfig::default(),
            embedded_broker: None,
            stats_interval: Some(Duration::from_secs(60)),
            serial: Vec::new(),
            shutdown_timeout_secs: 5,
            publish_wills_on_shutdown: false,
        }
    }
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
        let mut engine = EngineConfig {
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
            advertise_interval: None,
            udp_broadcast: None,
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
            backlog_capacity: db.backlog_capacity,
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

        // Serial ports: the flags replace the file's list, as --udp does.
        let serial = if cli.serial.is_empty() {
            file.serial
                .iter()
                .enumerate()
                .map(|(n, s)| s.resolve(n))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            cli.serial
                .iter()
                .map(|f| SerialPortConfig {
                    baud: f.baud.unwrap_or(115_200),
                    framing: f.framing.or(cli.serial_framing).unwrap_or_default(),
                    ..SerialPortConfig::new(f.path.clone())
                })
                .collect()
        };
        for (i, port) in serial.iter().enumerate() {
            if serial.iter().take(i).any(|p| p.path == port.path) {
                return Err(format!("serial port {} is configured twice", port.path.display()));
            }
        }
        if u16::try_from(serial.len()).is_err() {
            return Err("too many serial ports".into());
        }

        // Discovery (spec 6.1). The duration field of ADVERTISE is 16 bits.
        let advertise_secs = cli
            .advertise_interval
            .or(file.discovery.advertise_interval_secs)
            .unwrap_or(900);
        if advertise_secs > u64::from(u16::MAX) {
            return Err(format!(
                "advertise_interval_secs must be at most 65535 (ADVERTISE carries it in 16 bits), not {advertise_secs}"
            ));
        }
        engine.advertise_interval = (advertise_secs > 0).then(|| Duration::from_secs(advertise_secs));
        let advertise_addr = cli.advertise_addr.or(file.discovery.advertise_addr);
        if let (Some(addr), Some(first)) = (advertise_addr, udp.first()) {
            if addr.is_ipv4() != first.is_ipv4() {
                return Err(format!(
                    "advertise_addr {addr} and the first UDP listener {first} must be of the same address family (ADVERTISE is sent from that listener)"
                ));
            }
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(format!("advertise_addr {addr} needs an address and a port"));
            }
        }
        engine.udp_broadcast = advertise_addr;

        Ok(Settings {
            engine,
            udp,
            broker,
            embedded_broker: embedded.then_some(embedded_addr),
            stats_interval: (stats > 0).then(|| Duration::from_secs(stats)),
            serial,
            shutdown_timeout_secs: file.gateway.shutdown_timeout_secs.unwrap_or(5),
            publish_wills_on_shutdown: file.gateway.publish_wills_on_shutdown.unwrap_or(false),
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

    #[test]
    fn serial_ports_from_the_file() {
        let file = FileConfig::parse(
            "[[serial]]\npath = \"/dev/ttyUSB0\"\n\n[[serial]]\npath = \"/dev/ttyAMA0\"\nbaud = 9600\ndata_bits = 7\nparity = \"even\"\nstop_bits = 2\nframing = \"raw\"\n",
        )
        .expect("parses");
        let s = Settings::combine(file, &Cli::default()).expect("resolves");
        assert_eq!(s.serial.len(), 2);
        assert_eq!(s.serial[0], SerialPortConfig::new("/dev/ttyUSB0"));
        assert_eq!(s.serial[0].describe(), "115200 8N1 cobs");
        assert_eq!(s.serial[1].path, PathBuf::from("/dev/ttyAMA0"));
        assert_eq!(s.serial[1].describe(), "9600 7E2 raw");

        for (bad, names) in [
            ("[[serial]]\nbaud = 9600\n", "path"),
            ("[[serial]]\npath = \"/dev/x\"\nparity = \"mark\"\n", "parity"),
            ("[[serial]]\npath = \"/dev/x\"\nstop_bits = 3\n", "stop_bits"),
            ("[[serial]]\npath = \"/dev/x\"\ndata_bits = 9\n", "data_bits"),
            ("[[serial]]\npath = \"/dev/x\"\nframing = \"slip\"\n", "framing"),
            ("[[serial]]\npath = \"/dev/x\"\nbaud = 0\n", "baud"),
            (
                "[[serial]]\npath = \"/dev/x\"\n[[serial]]\npath = \"/dev/x\"\n",
                "twice",
            ),
        ] {
            let file = FileConfig::parse(bad).expect("parses");
            let err = Settings::combine(file, &Cli::default()).unwrap_err();
            assert!(err.contains(names), "{bad:?}: {err}");
        }
        assert!(FileConfig::parse("[[serial]]\npath = \"/dev/x\"\nspeed = 9600\n").is_err());
    }

    #[test]
    fn serial_flags_replace_the_file_ports() {
        let file = FileConfig::parse("[[serial]]\npath = \"/dev/ttyS0\"\n").expect("parses");
        let cli = Cli::parse_from([
            "mqtt-sn-gateway",
            "--serial",
            "/dev/ttyUSB0:115200",
            "--serial",
            "/dev/ttyACM0:9600:cobs",
            "--serial",
            "/dev/ttyUSB1",
            "--serial-framing",
            "raw",
        ]);
        let s = Settings::combine(file, &cli).expect("resolves");
        let got: Vec<_> = s
            .serial
            .iter()
            .map(|p| (p.path.display().to_string(), p.describe()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/dev/ttyUSB0".to_string(), "115200 8N1 raw".to_string()),
                ("/dev/ttyACM0".to_string(), "9600 8N1 cobs".to_string()),
                ("/dev/ttyUSB1".to_string(), "115200 8N1 raw".to_string()),
            ]
        );
        for bad in ["/dev/ttyUSB0:fast", "/dev/ttyUSB0:0", ":115200", "/dev/ttyUSB0:raw"] {
            assert!(parse_serial_flag(bad).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["mqtt-sn-gateway", "--serial-framing", "slip"]).is_err());
    }

    #[test]
    fn discovery_settings() {
        let s = Settings::combine(FileConfig::default(), &Cli::default()).expect("defaults");
        assert_eq!(s.engine.advertise_interval, Some(Duration::from_secs(900)));
        assert_eq!(s.engine.udp_broadcast, None);

        let file = FileConfig::parse(
            "[discovery]\nadvertise_interval_secs = 60\nadvertise_addr = \"255.255.255.255:10000\"\n",
        )
        .expect("parses");
        let s = Settings::combine(file.clone(), &Cli::default()).expect("resolves");
        assert_eq!(s.engine.advertise_interval, Some(Duration::from_secs(60)));
        assert_eq!(
            s.engine.udp_broadcast,
            Some(SocketAddr::from(([255, 255, 255, 255], 10000)))
        );
        let off = Cli::parse_from(["mqtt-sn-gateway", "--advertise-interval", "0"]);
        assert_eq!(
            Settings::combine(file, &off)
                .expect("resolves")
                .engine
                .advertise_interval,
            None
        );

        let too_long = FileConfig::parse("[discovery]\nadvertise_interval_secs = 70000\n").expect("parses");
        assert!(Settings::combine(too_long, &Cli::default())
            .unwrap_err()
            .contains("65535"));
        let v6 = FileConfig::parse("[discovery]\nadvertise_addr = \"[ff02::1]:10000\"\n").expect("parses");
        assert!(Settings::combine(v6, &Cli::default()).unwrap_err().contains("family"));
    }
}
