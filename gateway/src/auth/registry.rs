//! The device registry: a TOML file of `[[device]]` entries, each naming a client id
//! (or a glob) and what that device may do. Parsed and validated once (at start and on
//! each reload); every error names the file, the entry (its index and client id) and
//! the key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::acl;
use crate::broker::tls::ClientIdentity;
use crate::link::{LinkAddr, Peer};
use crate::topics::{self, Predefined};
use crate::transport::dtls::PskSource;
use crate::transport::dtls_cert::CERT_IDENTITY_PREFIX;

/// A secret (a password, a pre-shared key) that never shows in a log or a debug print.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(pub T);

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One place a device may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// An IP network (`10.0.0.0/8`, or one address): the UDP source address, or that of
    /// the forwarder a node speaks through.
    Net {
        /// The network address (canonical: an IPv4-mapped IPv6 address is IPv4).
        ip: IpAddr,
        /// Prefix length in bits.
        prefix: u8,
    },
    /// A serial port, by its configured path (`serial:/dev/ttyUSB0`).
    Serial(String),
    /// A wireless node id behind a forwarder (`node:0a1b`, hexadecimal): through the
    /// forwarder at the given address (`node:0a1b@10.0.0.5`, `node:0a1b@serial:/dev/ttyUSB0`),
    /// or, without one, through any forwarder (then anyone who can send to the gateway
    /// can claim the node id).
    Node(Vec<u8>, Option<Box<Address>>),
}

impl Address {
    fn parse(s: &str) -> Result<Address, String> {
        if let Some(path) = s.strip_prefix("serial:") {
            if path.is_empty() {
                return Err(format!("{s:?}: expected serial:PATH, e.g. serial:/dev/ttyUSB0"));
            }
            return Ok(Address::Serial(path.to_string()));
        }
        if let Some(rest) = s.strip_prefix("node:") {
            let (hex, via) = match rest.split_once('@') {
                Some((hex, via)) if !via.starts_with("node:") => (hex, Some(Box::new(Address::parse(via)?))),
                Some(_) => return Err(format!("{s:?}: a forwarder is an IP network or serial:PATH")),
                None => (rest, None),
            };
            return match parse_hex(hex) {
                Some(id) if !id.is_empty() => Ok(Address::Node(id, via)),
                _ => Err(format!(
                    "{s:?}: expected node:HEX[@FORWARDER], e.g. node:0a1b or node:0a1b@10.0.0.5"
                )),
            };
        }
        let usage = || format!("{s:?} is not an IP address, a CIDR network (10.0.0.0/8), serial:PATH or node:HEX");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| usage())?)),
            None => (s, None),
        };
        let written = ip.parse::<IpAddr>().map_err(|_| usage())?;
        let max = if written.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max} bits"));
        }
        let ip = written.to_canonical();
        if ip.is_ipv4() && written.is_ipv6() {
            // ::ffff:a.b.c.d/n is the IPv4 network a.b.c.d/(n - 96).
            return match prefix.checked_sub(96) {
                Some(prefix) => Ok(Address::Net { ip, prefix }),
                None => Err(format!(
                    "{s:?}: an IPv4-mapped network needs a prefix of at least 96 bits"
                )),
            };
        }
        Ok(Address::Net { ip, prefix })
    }

    /// Whether `peer` is at this address; `serial_paths` names the serial ports by index.
    pub fn matches(&self, peer: &Peer, serial_paths: &[String]) -> bool {
        match (self, &peer.link) {
            (Address::Net { ip, prefix }, LinkAddr::Udp(_, from) | LinkAddr::Dtls(_, from, _)) => {
                in_net(from.ip().to_canonical(), *ip, *prefix)
            }
            (Address::Serial(path), LinkAddr::Serial(i)) => {
                serial_paths.get(usize::from(*i)).is_some_and(|p| p == path)
            }
            (Address::Node(id, via), _) => {
                peer.node.as_deref() == Some(id.as_slice())
                    && via.as_ref().map_or(true, |forwarder| {
                        // The forwarder's own address, as if it spoke directly.
                        forwarder.matches(&Peer::direct(peer.link.clone()), serial_paths)
                    })
            }
            _ => false,
        }
    }
}

fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// One validated `[[device]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Its position in the file (from 1), for messages.
    pub index: usize,
    /// A client id, or a glob (`*`, `?`) matching many.
    pub client_id: String,
    /// Where it may come from; empty: anywhere.
    pub addresses: Vec<Address>,
    /// Its broker user name (`%c` replaced by the client id); `None`: the global one.
    pub username: Option<String>,
    /// Its broker password, resolved from `password`, `password_env` or `password_file`.
    pub password: Option<Secret<String>>,
    /// Topic filter patterns it may publish to (`%c`, `%u`); empty: none.
    pub publish: Vec<String>,
    /// Topic filter patterns it may subscribe to; empty: none.
    pub subscribe: Vec<String>,
    /// Its own predefined topic ids (on top of the global ones), as written.
    pub predefined: BTreeMap<u16, String>,
    /// DTLS PSK identity (parsed for DTLS; not used over plain UDP).
    pub psk_identity: Option<String>,
    /// DTLS pre-shared key.
    pub psk: Option<Secret<Vec<u8>>>,
    /// Its client ids connect over DTLS only: a CONNECT over plain UDP (or a serial
    /// link) is refused, so the key cannot be side-stepped by leaving DTLS out.
    pub dtls_only: bool,
    /// The name (CN or SAN, as the listener's `identity` says) of the DTLS client
    /// certificate this entry's client ids go with; `%c`: the name must be the client
    /// id itself.
    pub cert_identity: Option<String>,
    /// Its own TLS client certificate and key for the broker (`client_cert`,
    /// `client_key`, PEM, relative to the registry's directory), presented over
    /// `mqtts://` instead of the gateway's `broker.client_cert`.
    pub client_identity: Option<Arc<ClientIdentity>>,
}

impl Device {
    /// Whether `peer` may speak for this device.
    pub fn admits(&self, peer: &Peer, serial_paths: &[String]) -> bool {
        self.addresses.is_empty() || self.addresses.iter().any(|a| a.matches(peer, serial_paths))
    }

    /// The broker user name for `client_id`.
    pub fn username_for(&self, client_id: &str) -> Option<String> {
        self.username.as_ref().map(|u| u.replace("%c", client_id))
    }

    /// Whether a DTLS session authenticated as `identity` (a PSK identity, or
    /// [`CERT_IDENTITY_PREFIX`] and a certificate name) may use `client_id` under this
    /// entry. The two kinds never stand for each other.
    pub fn binds_dtls(&self, client_id: &str, identity: &str) -> bool {
        match identity.strip_prefix(CERT_IDENTITY_PREFIX) {
            Some(name) => match self.cert_identity.as_deref() {
                Some("%c") => name == client_id,
                Some(bound) => name == bound,
                None => false,
            },
            None => self.psk_identity.as_deref() == Some(identity),
        }
    }

    /// How the entry is named in messages: `#3 (client_id "sensor-*")`.
    pub fn name(&self) -> String {
        format!("#{} (client_id {:?})", self.index, self.client_id)
    }
}

/// The validated registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    /// Where it was read from (for messages).
    pub origin: String,
    devices: Vec<Arc<Device>>,
    exact: HashMap<String, usize>,
    globs: Vec<usize>,
}

impl PskSource for Registry {
    fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        self.psk_of(identity).map(<[u8]>::to_vec)
    }
}

/// The file's shape (unknown keys are errors).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    client_id: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    predefined: BTreeMap<String, String>,
    psk_identity: Option<String>,
    psk: Option<String>,
    psk_file: Option<PathBuf>,
    #[serde(default)]
    dtls_only: bool,
    cert_identity: Option<String>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// Longest pre-shared key accepted, octets (what common DTLS stacks take).
pub const MAX_PSK_LEN: usize = 64;

impl Registry {
    /// Reads and validates the file at `path` (`password_env` from the process
    /// environment, `password_file` relative to the file's directory).
    pub fn load(path: &Path) -> Result<Registry, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        let base = path.parent().unwrap_or(Path::new(""));
        Registry::parse(&text, &path.display().to_string(), base, |name| {
            std::env::var(name).ok()
        })
    }

    /// Parses and validates registry text; `origin` names it in errors, `base` is the
    /// directory `password_file` paths are relative to, `env` reads `password_env`.
    pub fn parse(
        text: &str,
        origin: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Registry, Vec<String>> {
        let file: File = toml::from_str(text).map_err(|e| vec![format!("{origin}: {}", e.to_string().trim_end())])?;
        let mut errors = Vec::new();
        let mut registry = Registry {
            origin: origin.to_string(),
            ..Registry::default()
        };
        for (i, raw) in file.device.into_iter().enumerate() {
            let index = i + 1;
            let Some(client_id) = raw.client_id.clone().filter(|c| !c.is_empty()) else {
                errors.push(format!(
                    "{origin}: [[device]] #{index}: client_id is required, e.g. client_id = \"sensor-*\""
                ));
                continue;
            };
            let at = |key: &str| format!("{origin}: [[device]] #{index} (client_id {client_id:?}): {key}");
            match raw.resolve(index, client_id.clone(), base, &env, &at) {
                Ok(device) => {
                    let same_identity = device
                        .psk_identity
                        .as_ref()
                        .and_then(|id| registry.devices.iter().find(|d| d.psk_identity.as_ref() == Some(id)));
                    if let Some(first) = same_identity {
                        errors.push(format!(
                            "{}: the same psk_identity as entry #{}",
                            at("psk_identity"),
                            first.index
                        ));
                        continue;
                    }
                    let same_cert = device
                        .cert_identity
                        .as_ref()
                        .filter(|id| *id != "%c")
                        .and_then(|id| registry.devices.iter().find(|d| d.cert_identity.as_ref() == Some(id)));
                    if let Some(first) = same_cert {
                        errors.push(format!(
                            "{}: the same cert_identity as entry #{}",
                            at("cert_identity"),
                            first.index
                        ));
                        continue;
                    }
                    if acl::is_glob(&device.client_id) {
                        registry.globs.push(registry.devices.len());
                    } else if let Some(first) = registry.exact.get(&device.client_id) {
                        errors.push(format!(
                            "{}: the same client_id as entry #{}",
                            at("client_id"),
                            first + 1
                        ));
                        continue;
                    } else {
                        registry.exact.insert(device.client_id.clone(), registry.devices.len());
                    }
                    registry.devices.push(Arc::new(device));
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(registry)
        } else {
            Err(errors)
        }
    }

    /// The pre-shared key of the entry whose `psk_identity` is `identity` (the DTLS
    /// handshake's key; validation makes identities unique).
    pub fn psk_of(&self, identity: &str) -> Option<&[u8]> {
        self.devices
            .iter()
            .find(|d| d.psk_identity.as_deref() == Some(identity))
            .and_then(|d| d.psk.as_ref())
            .map(|k| k.0.as_slice())
    }

    /// The entry for `client_id`: the one naming it exactly, else the first glob (in
    /// file order) that matches it.
    pub fn lookup(&self, client_id: &str) -> Option<&Arc<Device>> {
        let i = self.exact.get(client_id).copied().or_else(|| {
            self.globs.iter().copied().find(|&i| {
                self.devices
                    .get(i)
                    .is_some_and(|d| acl::glob_matches(&d.client_id, client_id))
            })
        })?;
        self.devices.get(i)
    }

    /// The entry a QoS -1 sender (which carries no client id) speaks for: the first, in
    /// file order, that gives `addresses` and admits `peer`.
    pub fn by_address(&self, peer: &Peer, serial_paths: &[String]) -> Option<&Arc<Device>> {
        self.devices
            .iter()
            .find(|d| !d.addresses.is_empty() && d.admits(peer, serial_paths))
    }

    /// Every entry, in file order.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there is no entry (every device is refused).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// What changed from `old` to `self`, by client id (pattern): added, removed, and
    /// changed in any field.
    pub fn diff(&self, old: &Registry) -> RegistryChanges {
        let by_id = |r: &Registry| -> BTreeMap<String, Arc<Device>> {
            r.devices.iter().map(|d| (d.client_id.clone(), d.clone())).collect()
        };
        let (old, new) = (by_id(old), by_id(self));
        let same = |a: &Arc<Device>, b: &Arc<Device>| {
            // The position in the file alone is not a change.
            let mut a = Device::clone(a);
            a.index = b.index;
            a == **b
        };
        RegistryChanges::between(&old, &new, same)
    }
}

/// What a reload changed in the registry, by client id (pattern): entries new in the
/// file, gone from it, and changed in any field.
pub type RegistryChanges = crate::config::KeyedChanges<String>;

/// Checks a topic pattern (`publish`, `subscribe`, `mountpoint`): its placeholders, and
/// that it is a valid topic filter once they are filled in.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    if !acl::valid_placeholders(pattern) {
        return Err(format!(
            "{pattern:?}: only %c (client id) and %u (user name) may follow a %"
        ));
    }
    let filled = pattern.replace("%c", "c").replace("%u", "u");
    topics::check_topic_filter(&filled).map_err(|e| format!("{pattern:?}: {e}"))
}

impl RawDevice {
    fn resolve(
        self,
        index: usize,
        client_id: String,
        base: &Path,
        env: &impl Fn(&str) -> Option<String>,
        at: &impl Fn(&str) -> String,
    ) -> Result<Device, Vec<String>> {
        let mut e = Vec::new();
        if client_id.chars().any(char::is_control) {
            e.push(format!("{}: control characters are not allowed", at("client_id")));
        }
        let mut addresses = Vec::new();
        for a in &self.addresses {
            match Address::parse(a.trim()) {
                Ok(addr) => addresses.push(addr),
                Err(why) => e.push(format!("{}: {why}", at("addresses"))),
            }
        }
        if let Some(u) = &self.username {
            if u.is_empty() {
                e.push(format!(
                    "{}: must not be empty (leave it out for the global [broker] login)",
                    at("username")
                ));
            }
            if u.replace("%c", "").contains('%') {
                e.push(format!("{}: only %c (the client id) may follow a %", at("username")));
            }
        }
        let given = [
            self.password.is_some(),
            self.password_env.is_some(),
            self.password_file.is_some(),
        ];
        let password = match given.iter().filter(|g| **g).count() {
            0 => None,
            1 => {
                if self.username.is_none() {
                    e.push(format!(
                        "{}: a password needs a username (MQTT 3.1.1 sends a password only with a user name)",
                        at("password")
                    ));
                }
                if let Some(p) = self.password {
                    Some(p)
                } else if let Some(name) = &self.password_env {
                    if name.starts_with(crate::config::ENV_PREFIX) {
                        e.push(format!(
                            "{}: {name:?} starts with {}, which names configuration keys; choose another name",
                            at("password_env"),
                            crate::config::ENV_PREFIX
                        ));
                        None
                    } else {
                        match env(name) {
                            Some(p) => Some(p),
                            None => {
                                e.push(format!(
                                    "{}: the environment variable {name} is not set",
                                    at("password_env")
                                ));
                                None
                            }
                        }
                    }
                } else if let Some(file) = &self.password_file {
                    let path = base.join(file);
                    match std::fs::read_to_string(&path) {
                        // One line: the trailing newline an editor adds is not part of it.
                        Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_string()),
                        Err(err) => {
                            e.push(format!(
                                "{}: cannot read {}: {err}",
                                at("password_file"),
                                path.display()
                            ));
                            None
                        }
                    }
                } else {
                    None
                }
            }
            _ => {
                e.push(format!(
                    "{}: give one of password, password_env and password_file",
                    at("password")
                ));
                None
            }
        };
        for (key, list) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            for p in list {
                if let Err(why) = check_pattern(p) {
                    e.push(format!("{}: {why}", at(key)));
                }
            }
        }
        let mut predefined = BTreeMap::new();
        for (id, name) in &self.predefined {
            match id.trim().parse::<u16>() {
                Ok(n) => {
                    predefined.insert(n, name.clone());
                }
                Err(_) => e.push(format!("{}: {id:?} is not a topic id (1..65534)", at("predefined"))),
            }
        }
        if let Err(why) = Predefined::new(predefined.iter().map(|(k, v)| (*k, v.clone()))) {
            e.push(format!("{}: {why}", at("predefined")));
        }
        // The key in hex, given inline or in a file of its own (kept out of the registry,
        // e.g. readable by the gateway's user alone); which key names it in errors.
        let psk_hex = match (&self.psk, &self.psk_file) {
            (Some(_), Some(_)) => {
                e.push(format!("{}: give psk or psk_file, not both", at("psk")));
                None
            }
            (Some(hex), None) => Some(("psk", hex.clone())),
            (None, Some(file)) => {
                let path = base.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(hex) => Some(("psk_file", hex)),
                    Err(err) => {
                        e.push(format!("{}: cannot read {}: {err}", at("psk_file"), path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        };
        let psk = match &psk_hex {
            None => None,
            Some((key, hex)) => match parse_hex(hex.trim()) {
                Some(k) if !k.is_empty() && k.len() <= MAX_PSK_LEN => Some(Secret(k)),
                _ => {
                    let shown = match (key, &self.psk_file) {
                        (&"psk_file", Some(file)) => format!("{} ({})", at(key), base.join(file).display()),
                        _ => at(key),
                    };
                    e.push(format!(
                        "{shown}: expected 1 to {MAX_PSK_LEN} octets in hexadecimal (an even number of 0-9a-f)"
                    ));
                    None
                }
            },
        };
        let has_key = self.psk.is_some() || self.psk_file.is_some();
        match (&self.psk_identity, has_key) {
            (Some(id), true) if id.is_empty() || id.len() > 128 => {
                e.push(format!("{}: must be 1 to 128 octets", at("psk_identity")));
            }
            (Some(id), true) if id.starts_with(CERT_IDENTITY_PREFIX) => {
                e.push(format!(
                    "{}: must not start with {CERT_IDENTITY_PREFIX:?} (the prefix of certificate identities)",
                    at("psk_identity")
                ));
            }
            (Some(_), false) => e.push(format!("{}: given without psk or psk_file", at("psk_identity"))),
            (None, true) => e.push(format!("{}: given without psk_identity", at("psk"))),
            _ => {}
        }
        if self.dtls_only && !has_key && self.cert_identity.is_none() {
            e.push(format!(
                "{}: the entry has neither psk_identity nor cert_identity, so none of its client ids could connect",
                at("dtls_only")
            ));
        }
        if self
            .cert_identity
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > 255)
        {
            e.push(format!("{}: must be 1 to 255 octets", at("cert_identity")));
        }
        let client_identity = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                match ClientIdentity::load("client_cert", &base.join(cert), "client_key", &base.join(key)) {
                    Ok(id) => Some(Arc::new(id)),
                    Err(err) => {
                        e.push(format!("{}: {err}", at("client_cert")));
                        None
                    }
                }
            }
            (Some(_), None) => {
                e.push(format!("{}: given without client_key", at("client_cert")));
                None
            }
            (None, Some(_)) => {
                e.push(format!("{}: given without client_cert", at("client_key")));
                None
            }
        };
        if !e.is_empty() {
            return Err(e);
        }
        Ok(Device {
            index,
            client_id,
            addresses,
            username: self.username,
            password: password.map(Secret),
            publish: self.publish,
            subscribe: self.subscribe,
            predefined,
            psk_identity: self.psk_identity,
            psk,
            dtls_only: self.dtls_only,
            cert_identity: self.cert_identity,
            client_identity,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::net::SocketAddr;

    fn parse(text: &str) -> Result<Registry, Vec<String>> {
        Registry::parse(text, "devices.toml", Path::new("/nonexistent"), |n| {
            (n == "SENSOR_PASSWORD").then(|| "s3cret".to_string())
        })
    }

    fn udp(ip: &str) -> Peer {
        Peer::direct(LinkAddr::Udp(0, SocketAddr::new(ip.parse().unwrap(), 5000)))
    }

    const EXAMPLE: &str = r#"
[[device]]
client_id = "sensor-*"
addresses = ["127.0.0.0/8"]
publish = ["sensors/%c/#"]
subscribe = ["cmd/%c/#"]
username = "%c"
password_env = "SENSOR_PASSWORD"

[[device]]
client_id = "sensor-7"
addresses = ["10.1.2.3", "serial:/dev/ttyUSB0", "node:0a1b", "::ffff:192.168.0.0/112", "node:0c0d@10.9.0.0/16"]
predefined = { 5 = "sensors/seven" }
psk_identity = "sensor-7"
psk = "00112233445566778899aabbccddeeff"
"#;

    #[test]
    fn the_issue_example_parses() {
        let r = parse(EXAMPLE).unwrap();
        assert_eq!(r.len(), 2);
        let glob = r.lookup("sensor-1").unwrap();
        assert_eq!(glob.index, 1);
        assert_eq!(glob.username_for("sensor-1").as_deref(), Some("sensor-1"));
        assert_eq!(glob.password, Some(Secret("s3cret".into())));
        // The exact entry wins over an earlier glob.
        let exact = r.lookup("sensor-7").unwrap();
        assert_eq!(exact.index, 2);
        assert_eq!(exact.predefined.get(&5).map(String::as_str), Some("sensors/seven"));
        assert_eq!(exact.psk.as_ref().map(|k| k.0.len()), Some(16));
        assert!(r.lookup("other").is_none());
        assert!(!format!("{r:?}").contains("s3cret"), "a secret in a debug print");
    }

    #[test]
    fn addresses_match() {
        let r = parse(EXAMPLE).unwrap();
        let paths = vec!["/dev/ttyUSB0".to_string(), "/dev/ttyUSB1".to_string()];
        let glob = r.lookup("sensor-1").unwrap();
        assert!(glob.admits(&udp("127.0.0.2"), &paths));
        assert!(
            glob.admits(&udp("::ffff:127.0.0.9"), &paths),
            "IPv4-mapped addresses are IPv4"
        );
        assert!(!glob.admits(&udp("10.0.0.1"), &paths));
        let seven = r.lookup("sensor-7").unwrap();
        assert!(seven.admits(&udp("10.1.2.3"), &paths));
        assert!(!seven.admits(&udp("10.1.2.4"), &paths));
        assert!(seven.admits(&udp("192.168.3.4"), &paths));
        assert!(seven.admits(&Peer::direct(LinkAddr::Serial(0)), &paths));
        assert!(!seven.admits(&Peer::direct(LinkAddr::Serial(1)), &paths));
        let node = Peer {
            link: LinkAddr::Serial(1),
            node: Some(vec![0x0a, 0x1b].into()),
        };
        assert!(seven.admits(&node, &paths));
        // A node bound to its forwarder: only through that forwarder.
        let behind = |ip: &str| Peer {
            link: LinkAddr::Udp(0, SocketAddr::new(ip.parse().unwrap(), 1)),
            node: Some(vec![0x0c, 0x0d].into()),
        };
        assert!(seven.admits(&behind("10.9.1.1"), &paths));
        assert!(
            !seven.admits(&behind("10.8.1.1"), &paths),
            "the node id claimed through another forwarder"
        );
        assert!(
            !seven.admits(&Peer::direct(LinkAddr::Udp(0, "10.9.1.1:1".parse().unwrap())), &paths),
            "the forwarder is not the node"
        );
        // QoS -1 senders: the first entry with addresses that admits them.
        assert_eq!(r.by_address(&udp("127.0.0.5"), &paths).map(|d| d.index), Some(1));
        assert_eq!(r.by_address(&udp("10.1.2.3"), &paths).map(|d| d.index), Some(2));
        assert!(r.by_address(&udp("172.16.0.1"), &paths).is_none());
    }

    #[test]
    fn errors_name_the_file_the_entry_and_the_key() {
        let e = parse(
            r#"
[[device]]
client_id = "a"
addresses = ["300.1.1.1", "10.0.0.0/33", "node:xyz"]
publish = ["a/#/b", "x/%d"]
password = "p"
psk = "abc"

[[device]]
publish = ["a"]

[[device]]
client_id = "a"
username = "u"
password = "p"
password_env = "P"

[[device]]
client_id = "b"
username = "u"
password_env = "MQTT_SN_X"

[[device]]
client_id = "c"
username = "u"
password_env = "UNSET"
"#,
        )
        .unwrap_err();
        let all = e.join("\n");
        for needle in [
            "devices.toml: [[device]] #1 (client_id \"a\"): addresses: \"300.1.1.1\"",
            "#1 (client_id \"a\"): addresses: \"10.0.0.0/33\": prefix longer than 32 bits",
            "#1 (client_id \"a\"): addresses: \"node:xyz\"",
            "#1 (client_id \"a\"): publish: \"a/#/b\"",
            "#1 (client_id \"a\"): publish: \"x/%d\"",
            "#1 (client_id \"a\"): password: a password needs a username",
            "#1 (client_id \"a\"): psk: expected 1 to 64 octets",
            "devices.toml: [[device]] #2: client_id is required",
            "#3 (client_id \"a\"): password: give one of",
            "#4 (client_id \"b\"): password_env: \"MQTT_SN_X\" starts with MQTT_SN_",
            "#5 (client_id \"c\"): password_env: the environment variable UNSET is not set",
        ] {
            assert!(all.contains(needle), "{needle:?} not in:\n{all}");
        }
    }

    #[test]
    fn duplicates_unknown_keys_and_syntax_are_errors() {
        let e = parse("[[device]]\nclient_id = \"a\"\n[[device]]\nclient_id = \"a\"\n").unwrap_err();
        assert!(
            e[0].contains("#2 (client_id \"a\"): client_id: the same client_id as entry #1"),
            "{e:?}"
        );
        let e = parse("[[device]]\nclient_id = \"a\"\npublsh = [\"x\"]\n").unwrap_err();
        assert!(e[0].starts_with("devices.toml:") && e[0].contains("publsh"), "{e:?}");
        let e = parse("[[device]\n").unwrap_err();
        assert!(e[0].starts_with("devices.toml:"), "{e:?}");
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn password_files_are_read_relative_to_the_registry() {
        let dir = std::env::temp_dir().join(format!("gw-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "from-file\n").unwrap();
        let text = "[[device]]\nclient_id = \"a\"\nusername = \"a\"\npassword_file = \"pw\"\n";
        std::fs::write(dir.join("devices.toml"), text).unwrap();
        let r = Registry::load(&dir.join("devices.toml")).unwrap();
        assert_eq!(r.lookup("a").unwrap().password, Some(Secret("from-file".into())));
        let e = Registry::load(&dir.join("missing.toml")).unwrap_err();
        assert!(e[0].contains("missing.toml: cannot read"), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn psk_files_are_read_relative_to_the_registry_and_read_again_on_each_load() {
        let dir = std::env::temp_dir().join(format!("gw-registry-psk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        // Whitespace around the hex (an editor's newline, indentation) is not part of it.
        std::fs::write(dir.join("keys/a.psk"), "  00112233445566778899aabbccddeeff \n").unwrap();
        let text = "[[device]]\nclient_id = \"a\"\npsk_identity = \"id-a\"\npsk_file = \"keys/a.psk\"\n";
        std::fs::write(dir.join("devices.toml"), text).unwrap();
        let r = Registry::load(&dir.join("devices.toml")).unwrap();
        assert_eq!(
            r.psk_of("id-a"),
            Some(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff][..])
        );
        // A rotated key file is what the next load (a SIGHUP reload) uses.
        std::fs::write(dir.join("keys/a.psk"), "cafe").unwrap();
        let r = Registry::load(&dir.join("devices.toml")).unwrap();
        assert_eq!(r.psk_of("id-a"), Some(&[0xca, 0xfe][..]));

        let base = dir.as_path();
        let parse = |extra: &str| {
            let text = format!("[[device]]\nclient_id = \"a\"\npsk_identity = \"id-a\"\n{extra}");
            Registry::parse(&text, "devices.toml", base, |_| None).unwrap_err()
        };
        let e = parse("psk = \"00\"\npsk_file = \"keys/a.psk\"\n");
        assert!(e[0].contains("psk: give psk or psk_file, not both"), "{e:?}");
        let e = parse("psk_file = \"keys/missing.psk\"\n");
        assert!(
            e[0].contains("psk_file: cannot read") && e[0].contains("missing.psk"),
            "{e:?}"
        );
        std::fs::write(dir.join("keys/bad.psk"), "not hex").unwrap();
        let e = parse("psk_file = \"keys/bad.psk\"\n");
        assert!(
            e[0].contains("psk_file (") && e[0].contains("bad.psk") && e[0].contains("hexadecimal"),
            "{e:?}"
        );
        let e = Registry::parse(
            "[[device]]\nclient_id = \"a\"\npsk_file = \"keys/a.psk\"\n",
            "devices.toml",
            base,
            |_| None,
        )
        .unwrap_err();
        assert!(e[0].contains("given without psk_identity"), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn client_certificates_are_read_relative_to_the_registry_and_checked() {
        let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker/testdata");
        let ok = "[[device]]\nclient_id = \"a\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n";
        let r = Registry::parse(ok, "devices.toml", &testdata, |_| None).unwrap();
        assert!(r.lookup("a").unwrap().client_identity.is_some());
        for (text, wanted) in [
            (
                "client_cert = \"client.pem\"\n",
                "client_cert: given without client_key",
            ),
            ("client_key = \"client.key\"\n", "client_key: given without client_cert"),
            (
                "client_cert = \"missing.pem\"\nclient_key = \"client.key\"\n",
                "missing.pem: ",
            ),
            (
                "client_cert = \"client.pem\"\nclient_key = \"other.key\"\n",
                "not usable with client_cert",
            ),
            (
                "client_cert = \"client.key\"\nclient_key = \"client.key\"\n",
                "no PEM certificate",
            ),
        ] {
            let text = format!("[[device]]\nclient_id = \"a\"\n{text}");
            let e = Registry::parse(&text, "devices.toml", &testdata, |_| None).unwrap_err();
            assert!(
                e.iter()
                    .any(|e| e.contains(wanted) && e.contains("#1 (client_id \"a\")")),
                "{text}: {e:?}"
            );
        }
    }

    #[test]
    fn diff_by_client_id() {
        let old = parse("[[device]]\nclient_id = \"a\"\n[[device]]\nclient_id = \"b\"\n").unwrap();
        let new = parse("[[device]]\nclient_id = \"b\"\npublish = [\"x\"]\n[[device]]\nclient_id = \"c\"\n").unwrap();
        let d = new.diff(&old);
        assert_eq!(d.added, ["c"]);
        assert_eq!(d.removed, ["a"]);
        assert_eq!(d.changed, ["b"]);
        assert_eq!(d.to_string(), "+1 -1 ~1");
        let moved = parse("[[device]]\nclient_id = \"b\"\npublish = [\"x\"]\n").unwrap();
        assert!(moved.diff(&new).removed == ["c"] && moved.diff(&new).changed.is_empty());
    }

    #[test]
    fn certificate_and_psk_identities_bind_separately() {
        let r = parse(
            "[[device]]\nclient_id = \"a\"\ncert_identity = \"dev-a\"\n\n\
             [[device]]\nclient_id = \"b\"\npsk_identity = \"dev-a\"\npsk = \"0011\"\n\n\
             [[device]]\nclient_id = \"fleet-*\"\ncert_identity = \"%c\"\n",
        )
        .unwrap();
        let a = r.lookup("a").unwrap();
        assert!(a.binds_dtls("a", "cert:dev-a"));
        assert!(!a.binds_dtls("a", "dev-a"), "a PSK identity is not the certificate");
        assert!(!a.binds_dtls("a", "cert:dev-b"));
        let b = r.lookup("b").unwrap();
        assert!(b.binds_dtls("b", "dev-a"));
        assert!(
            !b.binds_dtls("b", "cert:dev-a"),
            "a certificate name is not the PSK identity"
        );
        // %c: the certificate's name is the client id itself.
        let fleet = r.lookup("fleet-3").unwrap();
        assert!(fleet.binds_dtls("fleet-3", "cert:fleet-3"));
        assert!(!fleet.binds_dtls("fleet-3", "cert:fleet-4"));
        assert!(!fleet.binds_dtls("fleet-3", "fleet-3"));
    }

    #[test]
    fn bad_certificate_identities_are_errors() {
        for (text, names) in [
            (
                "[[device]]\nclient_id = \"a\"\npsk_identity = \"cert:x\"\npsk = \"00\"\n",
                "must not start with \"cert:\"",
            ),
            ("[[device]]\nclient_id = \"a\"\ncert_identity = \"\"\n", "cert_identity: must be 1 to 255"),
            (
                "[[device]]\nclient_id = \"a\"\ncert_identity = \"x\"\n[[device]]\nclient_id = \"b\"\ncert_identity = \"x\"\n",
                "the same cert_identity as entry #1",
            ),
        ] {
            let err = parse(text).unwrap_err().join("\n");
            assert!(err.contains(names), "{text:?}: {err}");
        }
        // Several entries may each bind the certificate named like the client id.
        parse("[[device]]\nclient_id = \"a-*\"\ncert_identity = \"%c\"\n[[device]]\nclient_id = \"b-*\"\ncert_identity = \"%c\"\n")
            .unwrap();
    }
}
