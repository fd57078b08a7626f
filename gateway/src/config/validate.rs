//! Validation: every key checked once, every problem reported, and the runtime
//! [`Settings`] built from a valid [`Config`].

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio_serial::{DataBits, Parity, StopBits};

use super::{Cli, Config, ConfigErrors, LogFormat, SerialConfig};
use crate::auth::{AddressChange, AuthConfig, Registry};
use crate::broker::mqtt::{BrokerConfig, BrokerUrl};
use crate::broker::tls::{self, BrokerTls, TlsFiles};
use crate::engine::EngineConfig;
use crate::topics::Predefined;
use crate::transport::dtls::DtlsLimits;
use crate::transport::dtls_cert::{DtlsCertificates, IdentityRule};
use crate::transport::serial::SerialPortConfig;
pub use crate::transport::udp::UdpProbe;

/// Everything the gateway runs with: each module's typed slice of a validated [`Config`].
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
    /// DTLS listeners, indexed as [`crate::engine::LinkAddr::Dtls`].
    pub dtls: Vec<DtlsListener>,
    /// How long a graceful stop may take.
    pub shutdown_timeout: Duration,
    /// Publish the wills of connected devices on a graceful stop.
    pub publish_wills_on_shutdown: bool,
    /// The metrics and health endpoint, and the UDP health probe.
    pub metrics: MetricsSettings,
    /// Log format and filter.
    pub log: LogSettings,
    /// The state store.
    pub state: StateSettings,
}

/// `[state]`, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSettings {
    /// Directory of the store; `None`: in memory only.
    pub dir: Option<std::path::PathBuf>,
    /// Rename a damaged store aside and start afresh.
    pub recover: bool,
}

/// One `[[dtls]]` listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtlsListener {
    /// Address to bind.
    pub address: SocketAddr,
    /// Its bounds.
    pub limits: DtlsLimits,
    /// Its certificates (`cert`, `key`, `client_ca`), loaded; `None`: PSK only.
    pub certificates: Option<Arc<DtlsCertificates>>,
}

/// `[metrics]`, validated.
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// Where `GET /metrics` and `GET /healthz` are served; `None`: nowhere.
    pub listen: Option<SocketAddr>,
    /// The UDP health probe, when configured.
    pub udp_probe: Option<UdpProbe>,
}

/// How and what the binary logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// The validated `log.level`: an `EnvFilter` directive (`RUST_LOG` overrides it).
    pub level: String,
}

impl LogSettings {
    /// The filter to log with: `RUST_LOG` when it is set (and not empty), else `log.level`.
    /// The embedded broker's own log (rumqttd reports every client disconnect as an
    /// error) is off unless the directive names `rumqttd`. The second value is the
    /// problem with `RUST_LOG`, when it is set but does not parse (then `log.level` is
    /// used).
    pub fn filter(&self, rust_log: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
        let mut problem = None;
        if let Some(env) = rust_log.map(str::trim).filter(|s| !s.is_empty()) {
            // RUST_LOG keeps its usual meaning (a bare word is a target), unlike log.level.
            let mut directive = env.to_string();
            if !directive.contains("rumqttd") {
                directive.push_str(",rumqttd=off");
            }
            match tracing_subscriber::EnvFilter::builder().parse(&directive) {
                Ok(f) => return (f, None),
                Err(e) => problem = Some(format!("RUST_LOG ignored: {e}")),
            }
        }
        let filter =
            parse_level(&self.level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
        (filter, problem)
    }
}

/// Level names a bare directive may be (anything else bare would silently be read as a
/// target name, enabling every level of a module that does not exist).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses an `EnvFilter` directive strictly; `rumqttd=off` is added unless it names rumqttd.
fn parse_level(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let parts: Vec<&str> = level.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        return Err("it is empty; e.g. \"info\" or \"info,gateway=debug\"".into());
    }
    for part in &parts {
        if !part.contains('=') && !part.contains('[') && !LEVELS.contains(&part.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{part:?} is not a level (trace, debug, info, warn, error, off); a module's level is module=level, e.g. gateway=debug"
            ));
        }
    }
    let mut directive = parts.join(",");
    if !directive.contains("rumqttd") {
        directive.push_str(",rumqttd=off");
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(&directive)
        .map_err(|e| format!("{level:?} is not a valid filter: {e}"))
}

impl Default for Settings {
    /// The validated defaults.
    fn default() -> Self {
        match Config::default().validate_offline() {
            Ok(s) => s,
            // The defaults are valid (a unit test checks it); this arm is never taken.
            Err(e) => panic!("the default configuration is invalid: {e}"),
        }
    }
}

impl Settings {
    /// Loads ([`Config::load`]) and validates ([`Config::validate`]) the configuration
    /// the command line describes.
    pub fn from_cli(cli: &Cli) -> Result<Settings, ConfigErrors> {
        Config::load(cli)?.validate()
    }
}

/// Checks that a number of seconds is a number, greater than zero (or zero, when
/// `zero_ok`), and at most `max`.
fn secs_in(errors: &mut Vec<String>, key: &str, v: f64, zero_ok: bool, max: f64) -> Duration {
    let low_ok = if zero_ok { v >= 0.0 } else { v > 0.0 };
    if v.is_finite() && low_ok && v <= max {
        Duration::from_secs_f64(v)
    } else {
        let low = if zero_ok { "from 0" } else { "greater than 0" };
        errors.push(format!("{key} must be a number of seconds {low} up to {max}, not {v}"));
        Duration::ZERO
    }
}

fn factor_in(errors: &mut Vec<String>, key: &str, v: f64) -> f64 {
    if v.is_finite() && (1.0..=100.0).contains(&v) {
        v
    } else {
        errors.push(format!("{key} must be a number from 1 to 100, not {v}"));
        1.0
    }
}

fn at_least<T: PartialOrd + fmt::Display + Copy>(errors: &mut Vec<String>, key: &str, v: T, min: T, max: T) -> T {
    if v < min || v > max {
        errors.push(format!("{key} must be from {min} to {max}, not {v}"));
    }
    v
}

/// Longest `limits.session_expiry_secs` accepted: ten years (beyond, use 0: never).
const MAX_EXPIRY_SECS: u64 = 10 * 366 * 24 * 3600;

/// `broker.source_addresses`, checked: unicast, each once, and of the broker's family when
/// the broker is given by address (a name may resolve to either; a connection then uses
/// only the addresses of the source's family).
fn source_addresses(e: &mut Vec<String>, given: &[IpAddr], broker_host: &str) -> Vec<IpAddr> {
    let broker_ip = broker_host.parse::<IpAddr>().ok();
    let mut seen = Vec::with_capacity(given.len());
    for &ip in given {
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
            e.push(format!(
                "broker.source_addresses: {ip} is not a unicast address a connection can be made from"
            ));
        } else if seen.contains(&ip) {
            e.push(format!("broker.source_addresses: {ip} is given twice"));
        } else if broker_ip.is_some_and(|b| b.is_ipv4() != ip.is_ipv4()) {
            e.push(format!(
                "broker.source_addresses: {ip} cannot reach the broker at {broker_host} (another address family)"
            ));
        } else {
            seen.push(ip);
        }
    }
    seen
}

/// Longest Tretry and connect timeout accepted: an hour.
const MAX_TIMER_SECS: f64 = 3600.0;

impl Config {
    /// Checks every key and builds the runtime settings, reporting every problem at
    /// once. Resolves the broker host name (a name that does not resolve is an error).
    pub fn validate(&self) -> Result<Settings, ConfigErrors> {
        let settings = self.validate_offline()?;
        let b = &settings.broker;
        if settings.embedded_broker.is_none() || self.broker.url.is_some() {
            if let Err(e) = (b.host.as_str(), b.port).to_socket_addrs() {
                return Err(ConfigErrors(vec![format!(
                    "broker.url: cannot resolve broker host {:?}: {e}",
                    b.host
                )]));
            }
        }
        Ok(settings)
    }

    /// [`Config::validate`] without the name lookup.
    pub fn validate_offline(&self) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        let e = &mut errors;

        let mut predefined = Vec::new();
        for (id, topic) in &self.predefined {
            match id.trim().parse::<u16>() {
                Ok(n) => predefined.push((n, topic.clone())),
                Err(_) => e.push(format!("[predefined] key {id:?} is not a topic id (1..65534)")),
            }
        }
        let predefined = Predefined::new(predefined).unwrap_or_else(|err| {
            e.push(format!("[predefined]: {err}"));
            Predefined::default()
        });

        let t = &self.timers;
        let s = &self.sleep;
        let l = &self.limits;
        let retry_interval = secs_in(
            e,
            "timers.retry_interval_secs",
            t.retry_interval_secs,
            false,
            MAX_TIMER_SECS,
        );
        let connect_timeout = secs_in(
            e,
            "timers.connect_timeout_secs",
            t.connect_timeout_secs,
            false,
            MAX_TIMER_SECS,
        );
        let max_sleep = at_least(
            e,
            "sleep.max_duration_secs",
            s.max_duration_secs,
            1,
            u64::from(u16::MAX),
        );
        let advertise = at_least(
            e,
            "discovery.advertise_interval_secs (ADVERTISE carries it in 16 bits)",
            self.discovery.advertise_interval_secs,
            0,
            u64::from(u16::MAX),
        );
        let mut engine = EngineConfig {
            gateway_id: self.gateway.id,
            retry_interval,
            max_retries: at_least(e, "timers.max_retries", t.max_retries, 0, 1000),
            keep_alive_factor: factor_in(e, "timers.keep_alive_factor", t.keep_alive_factor),
            sleep_factor: factor_in(e, "sleep.tolerance_factor", s.tolerance_factor),
            max_sleep: Duration::from_secs(max_sleep),
            connect_timeout,
            max_clients: at_least(e, "limits.max_clients", l.max_clients, 1, 10_000_000),
            max_topics_per_client: at_least(e, "limits.max_topics_per_client", l.max_topics_per_client, 1, 0xFFFD),
            max_queued_messages: at_least(e, "sleep.max_held_messages", s.max_held_messages, 1, 1_000_000),
            max_queued_bytes: at_least(e, "sleep.max_held_bytes", s.max_held_bytes, 1, 1 << 30),
            max_persisted_sessions: l.max_persisted_sessions,
            session_expiry: match at_least(
                e,
                "limits.session_expiry_secs",
                l.session_expiry_secs,
                0,
                MAX_EXPIRY_SECS,
            ) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            predefined: Arc::new(predefined),
            qos_minus_one: self.gateway.qos_minus_one,
            advertise_interval: (advertise > 0).then(|| Duration::from_secs(advertise)),
            udp_broadcast: None,
            auth: crate::auth::AuthConfig::default(),
        };

        let broker = self.broker_config(e);
        let udp = self.udp.listen.clone();
        for (i, addr) in udp.iter().enumerate() {
            if udp[..i].contains(addr) {
                e.push(format!("udp.listen: {addr} is given twice"));
            }
        }
        let serial = self.serial_ports(e);
        let dtls = self.dtls_listeners(e, &udp);
        if udp.is_empty() && serial.is_empty() && dtls.is_empty() {
            e.push("udp.listen is empty and no serial port or DTLS listener is configured: the gateway would serve nothing".into());
        }

        let advertise_addr = self.discovery.advertise_addr;
        if let Some(addr) = advertise_addr {
            if let Some(first) = udp.first() {
                if addr.is_ipv4() != first.is_ipv4() {
                    e.push(format!(
                        "discovery.advertise_addr {addr} and the first UDP listener {first} must be of the same address family (ADVERTISE is sent from that listener)"
                    ));
                }
            }
            if addr.port() == 0 || addr.ip().is_unspecified() {
                e.push(format!("discovery.advertise_addr {addr} needs an address and a port"));
            }
        }
        engine.udp_broadcast = advertise_addr;
        engine.auth = self.auth_config(e, &serial, &broker);
        if !dtls.is_empty() {
            // Some device must be able to prove an identity: a PSK, or a certificate name
            // on a listener that takes certificates.
            let certs = dtls.iter().any(|d| d.certificates.is_some());
            let has_identities = engine.auth.registry.as_ref().is_some_and(|r| {
                r.devices()
                    .iter()
                    .any(|d| d.psk.is_some() || (certs && d.cert_identity.is_some()))
            });
            if !has_identities {
                e.push("[[dtls]] listeners need auth.mode = \"registry\" and an auth.devices_file whose devices give psk_identity and psk (the keys of the DTLS handshakes), or cert_identity on a listener with cert, key and client_ca".into());
            }
        }

        let shutdown_timeout = secs_in(
            e,
            "gateway.shutdown_timeout_secs",
            self.gateway.shutdown_timeout_secs,
            true,
            MAX_TIMER_SECS,
        );
        let stats = self.gateway.stats_interval_secs;
        let metrics = MetricsSettings {
            listen: self.metrics.listen,
            udp_probe: self.udp_probe(e),
        };
        let log = self.log_settings(e);
        let state = self.state_settings(e);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Settings {
            engine,
            udp,
            broker,
            embedded_broker: self.broker.embedded.then_some(self.broker.embedded_listen),
            stats_interval: (stats > 0).then(|| Duration::from_secs(stats)),
            serial,
            dtls,
            shutdown_timeout,
            publish_wills_on_shutdown: self.gateway.publish_wills_on_shutdown,
            metrics,
            log,
            state,
        })
    }

    /// `[state]`: a directory that is not a file, and `recover` only with a directory.
    fn state_settings(&self, e: &mut Vec<String>) -> StateSettings {
        let s = &self.state;
        match &s.dir {
            Some(dir) if dir.as_os_str().is_empty() => e.push("state.dir must not be empty".into()),
            Some(dir) if dir.exists() && !dir.is_dir() => {
                e.push(format!("state.dir {} exists and is not a directory", dir.display()));
            }
            None if s.recover => e.push("state.recover needs state.dir (there is no store to recover)".into()),
            _ => {}
        }
        StateSettings {
            dir: s.dir.clone(),
            recover: s.recover,
        }
    }

    /// The UDP probe: both strings or neither, neither empty, and a request that no
    /// MQTT-SN device could send (it must not decode as an MQTT-SN message), so that the
    /// probe never hides a device's datagram.
    fn udp_probe(&self, e: &mut Vec<String>) -> Option<UdpProbe> {
        let m = &self.metrics;
        match (&m.udp_probe_request, &m.udp_probe_reply) {
            (None, None) => None,
            (Some(request), Some(reply)) => {
                if request.is_empty() || reply.is_empty() {
                    e.push("metrics.udp_probe_request and metrics.udp_probe_reply must not be empty".into());
                    return None;
                }
                if sn_codec::Packet::decode(request.as_bytes()).is_ok() {
                    e.push(format!(
                        "metrics.udp_probe_request {request:?} decodes as an MQTT-SN message; choose bytes no device sends"
                    ));
                    return None;
                }
                Some(UdpProbe {
                    request: request.as_bytes().to_vec(),
                    reply: reply.as_bytes().to_vec(),
                })
            }
            _ => {
                e.push("metrics.udp_probe_request and metrics.udp_probe_reply are set together or not at all".into());
                None
            }
        }
    }

    fn log_settings(&self, e: &mut Vec<String>) -> LogSettings {
        let format = match self.log.format.to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                e.push(format!(
                    "log.format must be \"text\" or \"json\", not {:?}",
                    self.log.format
                ));
                LogFormat::Text
            }
        };
        if let Err(err) = parse_level(&self.log.level) {
            e.push(format!("log.level: {err}"));
        }
        LogSettings {
            format,
            level: self.log.level.trim().to_string(),
        }
    }

    fn broker_config(&self, e: &mut Vec<String>) -> BrokerConfig {
        let b = &self.broker;
        let default = BrokerConfig::default();
        let plain = |host: String, port| BrokerUrl { host, port, tls: false };
        let url = match &b.url {
            Some(url) => BrokerConfig::parse_url(url).unwrap_or_else(|err| {
                e.push(format!("broker.url: {err}"));
                plain(default.host.clone(), default.port)
            }),
            None if b.embedded => plain(b.embedded_listen.ip().to_string(), b.embedded_listen.port()),
            None => plain(default.host.clone(), default.port),
        };
        let tls = self.broker_tls(e, &url);
        let BrokerUrl { host, port, .. } = url;
        if b.password.is_some() && b.username.is_none() {
            e.push(
                "broker.password is set without broker.username (MQTT 3.1.1 sends a password only with a user name)"
                    .into(),
            );
        }
        let source_addresses = source_addresses(e, &b.source_addresses, &host);
        BrokerConfig {
            host,
            port,
            tls,
            username: b.username.clone(),
            password: b.password.clone(),
            client_id_prefix: b.client_id_prefix.clone(),
            request_capacity: at_least(e, "broker.request_capacity", b.request_capacity, 1, 1_000_000),
            backlog_capacity: at_least(e, "broker.backlog_capacity", b.backlog_capacity, 0, 10_000_000),
            backlog_bytes: at_least(e, "broker.backlog_bytes", b.backlog_bytes, 0, 1 << 30),
            inflight: at_least(e, "broker.inflight", b.inflight, 1, u16::MAX),
            connect_timeout_secs: at_least(e, "broker.connect_timeout_secs", b.connect_timeout_secs, 1, 3600),
            gateway_client_id: format!("mqtt-sn-gw-{}-qos-1", self.gateway.id),
            max_connections: match at_least(e, "broker.max_connections", b.max_connections, 0, 100_000_000) {
                0 => None,
                n => Some(n),
            },
            mode: b.mode,
            connections: at_least(e, "broker.connections", b.connections, 1, 1024),
            offline_queue: at_least(e, "broker.offline_queue", b.offline_queue, 0, 10_000_000),
            aggregate_client_id: format!("mqtt-sn-gw-{}", self.gateway.id),
            source_addresses,
        }
    }

    /// TLS to the broker for an `mqtts://` URL: the files read and checked now, so that
    /// a missing or invalid one is a start-up (and `--check-config`) error naming its
    /// key and file. The TLS keys without `mqtts://` are an error: the operator expects
    /// TLS and would get plain TCP.
    fn broker_tls(&self, e: &mut Vec<String>, url: &BrokerUrl) -> Option<BrokerTls> {
        let b = &self.broker;
        let files = TlsFiles {
            ca_file: b.ca_file.clone(),
            client_cert: b.client_cert.clone(),
            client_key: b.client_key.clone(),
        };
        if !url.tls {
            let set: Vec<&str> = [
                ("broker.ca_file", &files.ca_file),
                ("broker.client_cert", &files.client_cert),
                ("broker.client_key", &files.client_key),
            ]
            .into_iter()
            .filter_map(|(key, v)| v.as_ref().map(|_| key))
            .collect();
            if !set.is_empty() {
                e.push(format!(
                    "{} set, but the broker URL is not mqtts:// (TLS): use broker.url = \"mqtts://{}:8883\" or remove {}",
                    set.join(", "),
                    url.host,
                    if set.len() == 1 { "it" } else { "them" }
                ));
            }
            return None;
        }
        if let Err(err) = tls::server_name(&url.host) {
            e.push(format!("broker.url: {err}"));
            return None;
        }
        BrokerTls::load(files).map_err(|err| e.push(err.to_string())).ok()
    }

    /// `[auth]`, with the registry loaded (its errors are the configuration's).
    fn auth_config(&self, e: &mut Vec<String>, serial: &[SerialPortConfig], broker: &BrokerConfig) -> AuthConfig {
        let a = &self.auth;
        let registry_mode = match a.mode.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => a.devices_file.is_some(),
            Some("registry") => true,
            Some("open") => {
                if a.devices_file.is_some() {
                    e.push(
                        "auth.mode is \"open\" but auth.devices_file is set: choose one (registry mode uses the file)"
                            .into(),
                    );
                }
                false
            }
            Some(other) => {
                e.push(format!("auth.mode must be \"open\" or \"registry\", not {other:?}"));
                false
            }
        };
        let registry = if registry_mode {
            match &a.devices_file {
                None => {
                    e.push(
                        "auth.devices_file is required in registry mode, e.g. devices_file = \"devices.toml\"".into(),
                    );
                    None
                }
                Some(path) => match Registry::load(path) {
                    Ok(r) => {
                        if broker.tls.is_none() {
                            for d in r.devices().iter().filter(|d| d.client_identity.is_some()) {
                                e.push(format!(
                                    "auth.devices_file: {}: {}: client_cert is set, but the broker URL is not mqtts:// (TLS)",
                                    path.display(),
                                    d.name()
                                ));
                            }
                        }
                        Some(Arc::new(r))
                    }
                    Err(mut errs) => {
                        for err in &mut errs {
                            *err = format!("auth.devices_file: {err}");
                        }
                        e.append(&mut errs);
                        None
                    }
                },
            }
        } else {
            None
        };
        let address_change = match a.address_change.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None if registry_mode => AddressChange::Deny,
            None => AddressChange::Allow,
            Some("allow") => AddressChange::Allow,
            Some("deny") => AddressChange::Deny,
            Some(other) => {
                e.push(format!(
                    "auth.address_change must be \"allow\" or \"deny\", not {other:?}"
                ));
                AddressChange::Allow
            }
        };
        if let Some(m) = &a.mountpoint {
            let check = crate::auth::registry::check_pattern(m).and_then(|()| {
                if m.is_empty() || m.starts_with('$') || m.contains(['+', '#']) {
                    Err(format!(
                        "{m:?}: a mountpoint is a topic prefix: not empty, no wildcards, not starting with $"
                    ))
                } else {
                    Ok(())
                }
            });
            if let Err(why) = check {
                e.push(format!("auth.mountpoint: {why}"));
            }
        }
        AuthConfig {
            registry,
            address_change,
            mountpoint: a.mountpoint.clone(),
            serial_paths: serial.iter().map(|p| p.path.display().to_string()).collect(),
            default_username: broker.username.clone(),
        }
    }

    fn dtls_listeners(&self, e: &mut Vec<String>, udp: &[SocketAddr]) -> Vec<DtlsListener> {
        let mut out: Vec<DtlsListener> = Vec::new();
        for (n, d) in self.dtls.iter().enumerate() {
            let at = |key: &str| format!("[[dtls]] #{} {key}", n + 1);
            let Some(address) = d.address else {
                e.push(format!(
                    "{} is required, e.g. address = \"0.0.0.0:10001\"",
                    at("address")
                ));
                continue;
            };
            if out.iter().any(|l| l.address == address) {
                e.push(format!("{}: {address} is given twice", at("address")));
            }
            if udp.contains(&address) && address.port() != 0 {
                e.push(format!("{}: {address} is also in udp.listen", at("address")));
            }
            if d.max_handshakes == 0 || d.max_handshakes > 1_000_000 {
                e.push(format!("{} must be 1 to 1000000", at("max_handshakes")));
            }
            if d.handshake_rate == 0 || d.handshake_rate > 1_000_000 {
                e.push(format!("{} must be 1 to 1000000", at("handshake_rate")));
            }
            if d.idle_timeout_secs == 0 || d.idle_timeout_secs > 86_400 {
                e.push(format!("{} must be 1 to 86400", at("idle_timeout_secs")));
            }
            let certificates = dtls_certificates(e, d, n + 1);
            out.push(DtlsListener {
                address,
                limits: DtlsLimits {
                    max_handshakes: d.max_handshakes,
                    handshake_rate: d.handshake_rate,
                    idle_timeout: Duration::from_secs(d.idle_timeout_secs),
                    ..DtlsLimits::default()
                },
                certificates,
            });
        }
        if u16::try_from(out.len()).is_err() {
            e.push("too many DTLS listeners".into());
        }
        out
    }

    fn serial_ports(&self, e: &mut Vec<String>) -> Vec<SerialPortConfig> {
        let mut ports: Vec<SerialPortConfig> = Vec::new();
        for (n, s) in self.serial.iter().enumerate() {
            match s.resolve(n) {
                Ok(port) if ports.iter().any(|p| p.path == port.path) => {
                    e.push(format!("serial port {} is configured twice", port.path.display()));
                }
                Ok(port) => ports.push(port),
                Err(err) => e.push(err),
            }
        }
        if u16::try_from(ports.len()).is_err() {
            e.push("too many serial ports".into());
        }
        ports
    }
}

impl SerialConfig {
    /// Checks the values of the `n`-th port.
    fn resolve(&self, n: usize) -> Result<SerialPortConfig, String> {
        let at = |key: &str| format!("[[serial]] #{} {key}", n + 1);
        let path = self
            .path
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| format!("{} is required, e.g. path = \"/dev/ttyUSB0\"", at("path")))?;
        if self.baud == 0 {
            return Err(format!("{} must be a positive number", at("baud")));
        }
        let data_bits = match self.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            8 => DataBits::Eight,
            other => return Err(format!("{} must be 5, 6, 7 or 8, not {other}", at("data_bits"))),
        };
        let parity = match self.parity.to_ascii_lowercase().as_str() {
            "none" => Parity::None,
            "odd" => Parity::Odd,
            "even" => Parity::Even,
            other => {
                return Err(format!(
                    "{} must be \"none\", \"odd\" or \"even\", not {other:?}",
                    at("parity")
                ))
            }
        };
        let stop_bits = match self.stop_bits {
            1 => StopBits::One,
            2 => StopBits::Two,
            other => return Err(format!("{} must be 1 or 2, not {other}", at("stop_bits"))),
        };
        let framing = self
            .framing
            .parse()
            .map_err(|_| format!("{} must be \"cobs\" or \"raw\", not {:?}", at("framing"), self.framing))?;
        Ok(SerialPortConfig {
            path,
            baud: self.baud,
            data_bits,
            parity,
            stop_bits,
            framing,
        })
    }
}

/// The certificates of the `[[dtls]]` table number `n` (from 1): `cert`, `key` and
/// `client_ca` all three or none, the files read and checked here so that a bad one is
/// a configuration error.
fn dtls_certificates(e: &mut Vec<String>, d: &super::DtlsConfig, n: usize) -> Option<Arc<DtlsCertificates>> {
    let Some(rule) = IdentityRule::parse(d.identity.trim()) else {
        e.push(format!(
            "[[dtls]] #{n}: dtls.identity: {:?} is not \"cn\" or \"san\"",
            d.identity
        ));
        return None;
    };
    match (&d.cert, &d.key, &d.client_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => match DtlsCertificates::load(cert, key, ca, rule) {
            Ok(c) => Some(Arc::new(c)),
            Err(err) => {
                e.push(format!("[[dtls]] #{n}: {err}"));
                None
            }
        },
        (cert, key, ca) => {
            let missing: Vec<&str> = [("dtls.cert", cert), ("dtls.key", key), ("dtls.client_ca", ca)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            e.push(format!(
                "[[dtls]] #{n}: {} missing: a DTLS listener with certificates needs cert, key and client_ca (the CA of the device certificates)",
                missing.join(", ")
            ));
            None
        }
    }
}
