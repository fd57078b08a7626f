//! Who each device of a fleet is: its client id and its DTLS pre-shared key.
//!
//! Names follow a [`NamePattern`] in which `%n` is the device's number in the fleet (its
//! index, from 0), for client ids (`--client-id dev-%n`) and PSK identities
//! (`--psk-identity id-%n`) alike. Keys come from one of three [`FleetKeys`] sources: one
//! key for every device (`--psk HEX`), a key per device derived from a fleet secret
//! (`--psk-derive SECRET`: HMAC-SHA256(SECRET, identity), the first 16 octets), or the
//! gateway's own device registry (`--psk-registry FILE`). [`registry_toml`] writes the
//! registry a gateway needs for a derived fleet (`mqtt-sn-sim registry`), so that both
//! sides compute the same keys.

use std::collections::HashMap;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::dtls::Psk;

/// Octets of a derived key (an AES-128 key, what TLS_PSK_WITH_AES_128_CCM_8 devices take).
pub const DERIVED_KEY_LEN: usize = 16;

/// Longest MQTT-SN client id the simulator sends (the 23 characters MQTT 3.1.1 servers
/// must accept).
pub const MAX_CLIENT_ID: usize = 23;

/// Longest PSK identity (what the gateway's registry accepts).
pub const MAX_PSK_IDENTITY: usize = 128;

/// A per-device name: text in which `%n` stands for the device number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    text: String,
}

impl NamePattern {
    /// `text`, checked: `%` may only be followed by `n`, no control characters, not empty.
    /// `what` names the option in errors (`--client-id`).
    pub fn parse(text: &str, what: &str) -> Result<NamePattern, String> {
        if text.is_empty() {
            return Err(format!("{what}: the pattern is empty"));
        }
        if text.chars().any(char::is_control) {
            return Err(format!("{what} {text:?}: control characters are not allowed"));
        }
        if text.replace("%n", "").contains('%') {
            return Err(format!("{what} {text:?}: only %n (the device number) may follow a %"));
        }
        Ok(NamePattern { text: text.into() })
    }

    /// The name of device `n`.
    pub fn name(&self, n: usize) -> String {
        self.text.replace("%n", &n.to_string())
    }

    /// Whether every device gets a name of its own (the pattern holds `%n`).
    pub fn per_device(&self) -> bool {
        self.text.contains("%n")
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Checks the names of devices `0..devices`: distinct when there is more than one
    /// device, and each 1 to `max` octets (the longest name is the last device's).
    pub fn check(&self, devices: usize, max: usize, what: &str) -> Result<(), String> {
        if devices > 1 && !self.per_device() {
            return Err(format!(
                "{what} {:?}: {devices} devices would share one name; put %n (the device number) in it",
                self.text
            ));
        }
        let longest = self.name(devices.saturating_sub(1));
        if longest.len() > max {
            return Err(format!(
                "{what} {:?}: {longest:?} is longer than {max} octets",
                self.text
            ));
        }
        Ok(())
    }
}

/// The key of `identity` under the fleet secret `secret`: HMAC-SHA256(secret, identity),
/// its first [`DERIVED_KEY_LEN`] octets.
pub fn derive_key(secret: &[u8], identity: &str) -> Vec<u8> {
    // HMAC takes a key of any length (longer ones are hashed first), so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return Vec::new();
    };
    mac.update(identity.as_bytes());
    let tag = mac.finalize().into_bytes();
    tag.get(..DERIVED_KEY_LEN).map(<[u8]>::to_vec).unwrap_or_default()
}

/// Where the devices of a fleet get their pre-shared keys.
#[derive(Clone, PartialEq, Eq)]
pub enum FleetKeys {
    /// One identity and key for every device (`--psk-identity ID --psk HEX`); the gateway's
    /// registry binds the fleet's client ids to it with a glob entry.
    One(Psk),
    /// A key per device: identity from the pattern, key derived from the secret.
    Derived {
        /// The identity of each device.
        identity: NamePattern,
        /// The fleet secret (the octets of `--psk-derive`).
        secret: Vec<u8>,
    },
    /// The identities and keys of a gateway device registry, by client id.
    Registry(RegistryKeys),
}

impl std::fmt::Debug for FleetKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FleetKeys::One(psk) => f.debug_tuple("One").field(psk).finish(),
            FleetKeys::Derived { identity, .. } => f
                .debug_struct("Derived")
                .field("identity", &identity.as_str())
                .field("secret", &"<redacted>")
                .finish(),
            FleetKeys::Registry(r) => f.debug_tuple("Registry").field(r).finish(),
        }
    }
}

impl FleetKeys {
    /// The identity and key of device `n`, whose client id is `client_id`; `None` when
    /// the registry has no entry for it.
    pub fn psk_for(&self, n: usize, client_id: &str) -> Option<Psk> {
        match self {
            FleetKeys::One(psk) => Some(psk.clone()),
            FleetKeys::Derived { identity, secret } => {
                let identity = identity.name(n);
                let key = derive_key(secret, &identity);
                Some(Psk { identity, key })
            }
            FleetKeys::Registry(r) => r.lookup(client_id).cloned(),
        }
    }

    /// Checks, before a run, that each of the `devices` devices (client id of device `n`:
    /// `client_id(n)`) has a key and an identity the gateway can take; the error names
    /// the first device without one and how many there are.
    pub fn check(&self, devices: usize, client_id: impl Fn(usize) -> String) -> Result<(), String> {
        match self {
            FleetKeys::One(_) => Ok(()),
            FleetKeys::Derived { identity, secret } => {
                if secret.is_empty() {
                    return Err("--psk-derive: the secret is empty".into());
                }
                let longest = identity.name(devices.saturating_sub(1));
                if longest.len() > MAX_PSK_IDENTITY {
                    return Err(format!(
                        "--psk-identity {:?}: {longest:?} is longer than {MAX_PSK_IDENTITY} octets",
                        identity.as_str()
                    ));
                }
                Ok(())
            }
            FleetKeys::Registry(r) => {
                let missing: Vec<String> = (0..devices)
                    .map(&client_id)
                    .filter(|id| r.lookup(id).is_none())
                    .collect();
                match missing.first() {
                    None => Ok(()),
                    Some(first) => Err(format!(
                        "{}: no entry with a psk_identity for client id {first:?}{} (of {devices} devices, {} have none; \
                         set the fleet's client ids with --client-id PATTERN)",
                        r.origin,
                        if missing.len() > 1 { " and others" } else { "" },
                        missing.len()
                    )),
                }
            }
        }
    }
}

/// Where a fleet's keys come from, as the command line or a scenario's `[run]` gives them
/// (`psk_identity` with `psk` or `psk_derive`, or `psk_registry` alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// `--psk-identity`: the identity, or its pattern with `psk_derive`.
    pub psk_identity: Option<String>,
    /// `--psk`: one key for every device, in hex.
    pub psk: Option<String>,
    /// `--psk-derive`: the fleet secret.
    pub psk_derive: Option<String>,
    /// `--psk-registry`: the gateway's registry file.
    pub psk_registry: Option<std::path::PathBuf>,
}

impl KeyOptions {
    /// Whether any key option is given.
    pub fn any(&self) -> bool {
        self.psk_identity.is_some() || self.psk.is_some() || self.psk_derive.is_some() || self.psk_registry.is_some()
    }

    /// The fleet's keys (`None`: plain UDP); errors name the options.
    pub fn resolve(&self) -> Result<Option<FleetKeys>, String> {
        let sources = [
            self.psk.is_some(),
            self.psk_derive.is_some(),
            self.psk_registry.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err("give one of --psk, --psk-derive and --psk-registry".into());
        }
        let identity = |with: &str| {
            self.psk_identity
                .as_deref()
                .ok_or_else(|| format!("{with} needs --psk-identity"))
        };
        if let Some(hex) = &self.psk {
            let id = identity("--psk")?;
            if id.contains("%n") {
                return Err(format!(
                    "--psk-identity {id:?}: with --psk every device has the one identity; \
                     a pattern with %n needs --psk-derive (a key per device)"
                ));
            }
            return Psk::from_hex(id, hex)
                .map(|p| Some(FleetKeys::One(p)))
                .map_err(|e| format!("--psk: {e}"));
        }
        if let Some(secret) = &self.psk_derive {
            let identity = NamePattern::parse(identity("--psk-derive")?, "--psk-identity")?;
            if secret.is_empty() {
                return Err("--psk-derive: the secret is empty".into());
            }
            return Ok(Some(FleetKeys::Derived {
                identity,
                secret: secret.as_bytes().to_vec(),
            }));
        }
        if let Some(path) = &self.psk_registry {
            if self.psk_identity.is_some() {
                return Err("--psk-registry: the identities are the registry's; leave --psk-identity out".into());
            }
            return RegistryKeys::load(path).map(|r| Some(FleetKeys::Registry(r)));
        }
        match &self.psk_identity {
            Some(_) => Err("--psk-identity needs --psk, --psk-derive or --psk-registry".into()),
            None => Ok(None),
        }
    }
}

/// The pre-shared keys of a gateway device registry (`[[device]]` entries with
/// `client_id`, `psk_identity` and `psk` or `psk_file`), looked up as the gateway looks
/// them up: the entry naming the client id exactly, else the first glob (`*`, `?`) in
/// file order that matches it. Entries without a key are left out.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryKeys {
    /// The file, for messages.
    pub origin: String,
    exact: HashMap<String, Psk>,
    globs: Vec<(String, Psk)>,
}

impl std::fmt::Debug for RegistryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryKeys")
            .field("origin", &self.origin)
            .field("exact", &self.exact.len())
            .field("globs", &self.globs.len())
            .finish()
    }
}

/// The part of a registry entry the simulator reads (other keys are the gateway's).
#[derive(Debug, Deserialize)]
struct RawEntry {
    client_id: Option<String>,
    psk_identity: Option<String>,
    psk: Option<String>,
    psk_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
struct RawRegistry {
    #[serde(default)]
    device: Vec<RawEntry>,
}

impl RegistryKeys {
    /// Reads the registry at `path` (`psk_file` relative to its directory).
    pub fn load(path: &Path) -> Result<RegistryKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        RegistryKeys::parse(&text, &path.display().to_string(), base)
    }

    /// Parses registry text; `origin` names it in errors, `base` is where `psk_file`
    /// paths start.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<RegistryKeys, String> {
        let raw: RawRegistry = toml::from_str(text).map_err(|e| format!("{origin}: {}", e.to_string().trim_end()))?;
        let mut keys = RegistryKeys {
            origin: origin.into(),
            exact: HashMap::new(),
            globs: Vec::new(),
        };
        for (i, e) in raw.device.into_iter().enumerate() {
            let at = |key: &str| format!("{origin}: [[device]] #{} {key}", i + 1);
            let Some(client_id) = e.client_id.filter(|c| !c.is_empty()) else {
                return Err(at("has no client_id"));
            };
            let hex = match (e.psk, &e.psk_file) {
                (Some(hex), None) => hex,
                (None, Some(file)) => {
                    let path = base.join(file);
                    std::fs::read_to_string(&path)
                        .map_err(|err| format!("{}: cannot read {}: {err}", at("psk_file"), path.display()))?
                }
                (Some(_), Some(_)) => return Err(at("gives both psk and psk_file")),
                // No key: a plain UDP or certificate entry, nothing for PSK devices.
                (None, None) => continue,
            };
            let Some(identity) = e.psk_identity else {
                return Err(at("has a key but no psk_identity"));
            };
            let psk = Psk::from_hex(&identity, &hex).map_err(|why| format!("{}: {why}", at("psk")))?;
            if client_id.contains(['*', '?']) {
                keys.globs.push((client_id, psk));
            } else {
                keys.exact.entry(client_id).or_insert(psk);
            }
        }
        Ok(keys)
    }

    /// The identity and key for `client_id`.
    pub fn lookup(&self, client_id: &str) -> Option<&Psk> {
        self.exact.get(client_id).or_else(|| {
            self.globs
                .iter()
                .find(|(glob, _)| glob_matches(glob.as_bytes(), client_id.as_bytes()))
                .map(|(_, psk)| psk)
        })
    }

    /// Number of entries with a key.
    pub fn len(&self) -> usize {
        self.exact.len() + self.globs.len()
    }

    /// Whether no entry has a key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `name` matches `glob` (`*`: any run of characters, `?`: one), as the
/// gateway's registry matches client ids.
fn glob_matches(glob: &[u8], name: &[u8]) -> bool {
    // Iterative, with one backtrack point: the last `*` seen.
    let (mut g, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match glob.get(g) {
            Some(b'*') => {
                star = Some((g, n));
                g += 1;
            }
            Some(&c) if c == b'?' || Some(&c) == name.get(n) => {
                g += 1;
                n += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    g = sg + 1;
                    n = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    glob.get(g..).is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// What `mqtt-sn-sim registry` writes: a fleet of derived keys.
#[derive(Debug, Clone)]
pub struct RegistrySpec {
    /// Number of devices.
    pub devices: usize,
    /// Their client ids.
    pub client_id: NamePattern,
    /// Their PSK identities.
    pub psk_identity: NamePattern,
    /// The fleet secret.
    pub secret: Vec<u8>,
    /// Each entry with `dtls_only = true`.
    pub dtls_only: bool,
    /// The entries' `publish` patterns.
    pub publish: Vec<String>,
    /// The entries' `subscribe` patterns.
    pub subscribe: Vec<String>,
}

impl RegistrySpec {
    /// Checks what the gateway would refuse: names too long or shared.
    pub fn check(&self) -> Result<(), String> {
        if self.devices == 0 {
            return Err("--devices: at least one device".into());
        }
        if self.secret.is_empty() {
            return Err("--psk-derive: the secret is empty".into());
        }
        self.client_id.check(self.devices, MAX_CLIENT_ID, "--client-id")?;
        if self.client_id.as_str().contains(['*', '?']) {
            return Err(format!(
                "--client-id {:?}: '*' and '?' would make each entry a glob matching other devices' client ids",
                self.client_id.as_str()
            ));
        }
        // The gateway refuses the same psk_identity on two entries.
        self.psk_identity
            .check(self.devices, MAX_PSK_IDENTITY, "--psk-identity")?;
        if self.psk_identity.as_str().starts_with("cert:") {
            return Err("--psk-identity: must not start with \"cert:\" (the prefix of certificate identities)".into());
        }
        Ok(())
    }
}

/// A TOML basic string (JSON's escapes are a subset of TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn toml_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// The gateway registry (`[auth] devices_file`) for the fleet `spec`: one `[[device]]`
/// entry per device with its client id, identity and derived key.
pub fn registry_toml(spec: &RegistrySpec) -> String {
    let mut out = format!(
        "# Device registry written by mqtt-sn-sim registry: {} devices, client ids {}, PSK identities {},\n\
         # keys HMAC-SHA256(fleet secret, identity) truncated to {DERIVED_KEY_LEN} octets.\n\
         # The keys are secrets: keep this file readable by the gateway's user alone.\n",
        spec.devices,
        toml_string(spec.client_id.as_str()),
        toml_string(spec.psk_identity.as_str()),
    );
    let publish = toml_list(&spec.publish);
    let subscribe = toml_list(&spec.subscribe);
    for n in 0..spec.devices {
        let identity = spec.psk_identity.name(n);
        let key: String = derive_key(&spec.secret, &identity)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push_str(&format!(
            "\n[[device]]\nclient_id = {}\npsk_identity = {}\npsk = \"{key}\"\npublish = {publish}\nsubscribe = {subscribe}\n",
            toml_string(&spec.client_id.name(n)),
            toml_string(&identity),
        ));
        if spec.dtls_only {
            out.push_str("dtls_only = true\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_each_device() {
        let p = NamePattern::parse("dev-%n-x", "--client-id").expect("valid");
        assert_eq!((p.name(0), p.name(42)), ("dev-0-x".into(), "dev-42-x".into()));
        assert!(NamePattern::parse("dev-%d", "--client-id").is_err(), "only %n");
        assert!(NamePattern::parse("", "--client-id").is_err());
        assert!(NamePattern::parse("a\nb", "--client-id").is_err());
        let fixed = NamePattern::parse("one", "--client-id").expect("valid");
        assert!(fixed.check(1, 23, "--client-id").is_ok());
        assert!(fixed.check(2, 23, "--client-id").is_err(), "two devices, one name");
        let long = NamePattern::parse("a-rather-long-name-%n", "--client-id").expect("valid");
        assert!(long.check(9, 23, "--client-id").is_ok());
        assert!(
            long.check(100_000, 23, "--client-id").is_err(),
            "a-rather-long-name-99999: 24"
        );
    }

    #[test]
    fn derived_keys_are_hmac_sha256_truncated() {
        // RFC 4231, test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let k = derive_key(b"Jefe", "what do ya want for nothing?");
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c7");
        assert_ne!(derive_key(b"Jefe", "a"), derive_key(b"Jefe", "b"));
        assert_ne!(derive_key(b"Jefe", "a"), derive_key(b"jefe", "a"));
    }

    #[test]
    fn key_options_take_one_source() {
        let opts = |id: Option<&str>, psk: Option<&str>, derive: Option<&str>| KeyOptions {
            psk_identity: id.map(Into::into),
            psk: psk.map(Into::into),
            psk_derive: derive.map(Into::into),
            psk_registry: None,
        };
        assert_eq!(opts(None, None, None).resolve(), Ok(None));
        assert!(matches!(
            opts(Some("fleet"), Some("00ff"), None).resolve(),
            Ok(Some(FleetKeys::One(_)))
        ));
        assert!(matches!(
            opts(Some("id-%n"), None, Some("s")).resolve(),
            Ok(Some(FleetKeys::Derived { .. }))
        ));
        assert!(
            opts(Some("id-%n"), Some("00ff"), None).resolve().is_err(),
            "a pattern, one key"
        );
        assert!(opts(Some("i"), Some("00"), Some("s")).resolve().is_err(), "two sources");
        assert!(opts(None, None, Some("s")).resolve().is_err(), "no identity");
        assert!(opts(Some("i"), None, None).resolve().is_err(), "no key");
        assert!(opts(Some("i-%n"), None, Some("")).resolve().is_err(), "empty secret");
    }

    #[test]
    fn globs_match_as_the_gateway_does() {
        let m = |g: &str, n: &str| glob_matches(g.as_bytes(), n.as_bytes());
        assert!(m("sim-*", "sim-0a-3"));
        assert!(m("*", ""));
        assert!(m("s?m-*-3", "sim-0a-3"));
        assert!(m("*a*b", "xxaxxb"));
        assert!(!m("sim-*", "sensor"));
        assert!(!m("s?m", "sm"));
        assert!(!m("*a*b", "xxaxxbc"));
    }

    #[test]
    fn a_written_registry_reads_back_with_the_same_keys() {
        let spec = RegistrySpec {
            devices: 3,
            client_id: NamePattern::parse("dev-%n", "c").expect("valid"),
            psk_identity: NamePattern::parse("id \"%n\"", "i").expect("valid"),
            secret: b"s3cret".to_vec(),
            dtls_only: true,
            publish: vec!["sim/#".into()],
            subscribe: vec![],
        };
        spec.check().expect("valid");
        let glob = RegistrySpec {
            client_id: NamePattern::parse("dev-*-%n", "c").expect("valid"),
            ..spec.clone()
        };
        assert!(glob.check().is_err(), "a glob per entry");
        let shared = RegistrySpec {
            psk_identity: NamePattern::parse("fleet", "i").expect("valid"),
            ..spec.clone()
        };
        assert!(shared.check().is_err(), "one identity on three entries");
        let text = registry_toml(&spec);
        let keys = RegistryKeys::parse(&text, "r.toml", Path::new("/")).expect("parses");
        assert_eq!(keys.len(), 3);
        let derived = FleetKeys::Derived {
            identity: spec.psk_identity.clone(),
            secret: spec.secret.clone(),
        };
        let from_file = FleetKeys::Registry(keys);
        for n in 0..3 {
            let id = format!("dev-{n}");
            assert_eq!(derived.psk_for(n, &id), from_file.psk_for(n, &id), "device {n}");
        }
        assert!(from_file.check(3, |n| format!("dev-{n}")).is_ok());
        let err = from_file
            .check(5, |n| format!("dev-{n}"))
            .expect_err("dev-3, dev-4 missing");
        assert!(err.contains("\"dev-3\"") && err.contains("2 have none"), "{err}");
        assert!(!format!("{derived:?}").contains("s3cret"), "the secret never shows");
    }

    #[test]
    fn registry_keys_take_globs_files_and_skip_keyless_entries() {
        let dir = std::env::temp_dir().join(format!("device-sim-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("k7.hex"), "0011\n").expect("key file");
        let text = "[[device]]\nclient_id = \"plain\"\npublish = [\"#\"]\n\
                    [[device]]\nclient_id = \"s-7\"\npsk_identity = \"id-7\"\npsk_file = \"k7.hex\"\n\
                    [[device]]\nclient_id = \"s-*\"\npsk_identity = \"fleet\"\npsk = \"ff\"\n";
        let keys = RegistryKeys::parse(text, "r.toml", &dir).expect("parses");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(keys.lookup("s-7").map(|p| p.key.clone()), Some(vec![0x00, 0x11]));
        assert_eq!(keys.lookup("s-8").map(|p| p.identity.as_str()), Some("fleet"));
        assert!(keys.lookup("plain").is_none());
        let bad = "[[device]]\nclient_id = \"x\"\npsk = \"zz\"\npsk_identity = \"i\"\n";
        assert!(RegistryKeys::parse(bad, "r.toml", Path::new("/")).is_err());
    }
}
