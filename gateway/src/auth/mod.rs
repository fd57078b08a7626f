//! Device identity and access control, sans-IO: who may connect from where
//! ([`AuthConfig::admit`]), what a device may publish and subscribe to ([`Grants`]), the
//! mountpoint, and the device registry ([`registry`]). The engine asks; nothing here
//! reads a socket or a clock.
//!
//! MQTT-SN v1.2 has no authentication: a client id is a claim and an address is only as
//! good as the network. See `docs/security.md` for what this protects and what not.

pub mod acl;
pub mod registry;

use std::sync::Arc;

pub use registry::{Address, Device, Registry, RegistryChanges, Secret};

use crate::broker::tls::ClientIdentity;
use crate::broker::Credentials;
use crate::link::Peer;
use crate::topics::Predefined;

/// Whether a session may move to another address (a CONNECT takeover, or a PINGREQ
/// wake from elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressChange {
    /// Accepted (NAT rebinding keeps working; anyone who knows a client id can take its
    /// session).
    #[default]
    Allow,
    /// Refused: only the session's own address may take it over or wake it.
    Deny,
}

impl AddressChange {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressChange::Allow => "allow",
            AddressChange::Deny => "deny",
        }
    }
}

/// The engine's access settings.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `Some`: registry mode (only devices of the registry connect); `None`: open.
    pub registry: Option<Arc<Registry>>,
    /// Takeover and wake from another address.
    pub address_change: AddressChange,
    /// Prefix of every topic a device uses on the broker (`%c`, `%u`); `None`: none.
    pub mountpoint: Option<String>,
    /// The configured serial port paths, by index, for `serial:PATH` addresses.
    pub serial_paths: Vec<String>,
    /// The global `[broker]` user name (what `%u` is for a device without its own).
    pub default_username: Option<String>,
}

/// Why a device was refused at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No registry entry names the client id.
    UnknownClient,
    /// The entry does not list the address.
    Address,
    /// The mountpoint cannot be formed for it (the client id or user name it needs is
    /// missing or holds `/`, `+` or `#`).
    Mountpoint,
}

/// What an admitted device gets.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Its topic rights and mountpoint.
    pub grants: Grants,
    /// Its own broker login, when its entry gives one.
    pub credentials: Option<Credentials>,
    /// Its own TLS client certificate for the broker, when its entry gives one.
    pub client_identity: Option<Arc<ClientIdentity>>,
}

impl AuthConfig {
    /// Decides a CONNECT of `client_id` from `peer`.
    pub fn admit(&self, client_id: &str, peer: &Peer) -> Result<Admission, Refusal> {
        let Some(registry) = &self.registry else {
            let subst = acl::Subst {
                client_id: Some(client_id),
                username: self.default_username.as_deref(),
            };
            return Ok(Admission {
                grants: Grants::open(self.mount(subst)?),
                credentials: None,
                client_identity: None,
            });
        };
        let device = registry.lookup(client_id).ok_or(Refusal::UnknownClient)?;
        if !device.admits(peer, &self.serial_paths) {
            return Err(Refusal::Address);
        }
        let username = device.username_for(client_id);
        let subst = acl::Subst {
            client_id: Some(client_id),
            username: username.as_deref().or(self.default_username.as_deref()),
        };
        let grants = Grants::from_device(device, subst, self.mount(subst)?);
        let credentials = username.map(|username| Credentials {
            username,
            password: device.password.clone().map(|p| p.0).unwrap_or_default(),
        });
        Ok(Admission {
            grants,
            credentials,
            client_identity: device.client_identity.clone(),
        })
    }

    /// The rights of a session already admitted, under the registry in force now (a
    /// reload): its entry's patterns, or none when no entry names it any more. The
    /// mountpoint stays the one it connected with (its broker subscriptions use it).
    pub fn regrant(&self, client_id: &str, credentials: Option<&Credentials>, mountpoint: Option<String>) -> Grants {
        let Some(registry) = &self.registry else {
            return Grants::open(mountpoint);
        };
        let username = credentials
            .map(|c| c.username.as_str())
            .or(self.default_username.as_deref());
        let subst = acl::Subst {
            client_id: Some(client_id),
            username,
        };
        match registry.lookup(client_id) {
            Some(device) => Grants::from_device(device, subst, mountpoint),
            None => Grants {
                publish: Some(Vec::new()),
                subscribe: Some(Vec::new()),
                mountpoint,
                predefined: Vec::new(),
            },
        }
    }

    /// The rights of a QoS -1 sender at `peer`: in registry mode those of the first
    /// entry with `addresses` that admits it (`%c` is its client id when that is not a
    /// glob); `None` when it may publish nothing.
    pub fn qos_minus_one(&self, peer: &Peer) -> Option<Grants> {
        let Some(registry) = &self.registry else {
            let subst = acl::Subst {
                client_id: None,
                username: self.default_username.as_deref(),
            };
            return self.mount(subst).ok().map(Grants::open);
        };
        let device = registry.by_address(peer, &self.serial_paths)?;
        let client_id = (!acl::is_glob(&device.client_id)).then_some(device.client_id.as_str());
        let username = client_id.and_then(|c| device.username_for(c));
        let subst = acl::Subst {
            client_id,
            username: username.as_deref().or(self.default_username.as_deref()),
        };
        let mount = self.mount(subst).ok()?;
        Some(Grants::from_device(device, subst, mount))
    }

    fn mount(&self, subst: acl::Subst<'_>) -> Result<Option<String>, Refusal> {
        match &self.mountpoint {
            None => Ok(None),
            Some(m) => acl::substitute(m, subst).map(Some).ok_or(Refusal::Mountpoint),
        }
    }
}

/// Why a topic was refused to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A topic starting with `$` (broker-reserved, e.g. `$SYS`): never published to.
    Dollar,
    /// Outside the device's patterns.
    Acl,
}

/// One device's topic rights (patterns already filled in) and mountpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Filters it may publish to; `None`: any topic (open mode).
    pub publish: Option<Vec<String>>,
    /// Filters it may subscribe within; `None`: any.
    pub subscribe: Option<Vec<String>>,
    /// The prefix of its topics on the broker.
    pub mountpoint: Option<String>,
    /// Its own predefined topic ids (registry entry), on top of the global ones.
    pub predefined: Vec<(u16, String)>,
}

impl Grants {
    /// Open mode: everything but `$` topics.
    pub fn open(mountpoint: Option<String>) -> Grants {
        Grants {
            publish: None,
            subscribe: None,
            mountpoint,
            predefined: Vec::new(),
        }
    }

    fn from_device(device: &Device, subst: acl::Subst<'_>, mountpoint: Option<String>) -> Grants {
        let fill = |list: &[String]| list.iter().filter_map(|p| acl::substitute(p, subst)).collect();
        Grants {
            publish: Some(fill(&device.publish)),
            subscribe: Some(fill(&device.subscribe)),
            mountpoint,
            predefined: device.predefined.iter().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }

    /// The predefined topics of this device: `global` with its own on top.
    pub fn predefined(&self, global: &Arc<Predefined>) -> Arc<Predefined> {
        if self.predefined.is_empty() {
            global.clone()
        } else {
            Arc::new(global.overlay(&self.predefined))
        }
    }

    /// Whether the device may publish to `topic` (as the device names it, before the
    /// mountpoint).
    pub fn may_publish(&self, topic: &str) -> Result<(), Denied> {
        if topic.starts_with('$') {
            return Err(Denied::Dollar);
        }
        match &self.publish {
            None => Ok(()),
            Some(list) if list.iter().any(|f| acl::filter_matches(f, topic)) => Ok(()),
            Some(_) => Err(Denied::Acl),
        }
    }

    /// Whether the device may subscribe to `filter` (as it names it): every topic the
    /// filter matches must be allowed by one pattern.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match &self.subscribe {
            None => true,
            Some(list) => list.iter().any(|p| acl::filter_covers(p, filter)),
        }
    }

    /// The broker's name for a device's topic or filter.
    pub fn mount(&self, topic: &str) -> String {
        match &self.mountpoint {
            Some(m) => format!("{m}{topic}"),
            None => topic.to_string(),
        }
    }

    /// The device's name for a broker topic; `None` when it is outside the mountpoint
    /// (or would be empty once stripped).
    pub fn unmount<'t>(&self, topic: &'t str) -> Option<&'t str> {
        match &self.mountpoint {
            None => Some(topic),
            Some(m) => topic.strip_prefix(m.as_str()).filter(|t| !t.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::link::LinkAddr;
    use std::path::Path;

    fn peer(ip: &str) -> Peer {
        Peer::direct(LinkAddr::Udp(0, std::net::SocketAddr::new(ip.parse().unwrap(), 1)))
    }

    fn registry(text: &str) -> Arc<Registry> {
        Arc::new(Registry::parse(text, "devices.toml", Path::new("/"), |_| None).unwrap())
    }

    #[test]
    fn open_mode_admits_everyone_but_never_to_dollar_topics() {
        let auth = AuthConfig::default();
        let a = auth.admit("x", &peer("127.0.0.1")).unwrap();
        assert!(a.credentials.is_none());
        assert_eq!(a.grants.may_publish("any/thing"), Ok(()));
        assert_eq!(a.grants.may_publish("$SYS/x"), Err(Denied::Dollar));
        assert!(a.grants.may_subscribe("#"));
    }

    #[test]
    fn registry_mode_refuses_unknown_ids_and_addresses() {
        let auth = AuthConfig {
            registry: Some(registry(
                "[[device]]\nclient_id = \"s-*\"\naddresses = [\"127.0.0.2\"]\npublish = [\"s/%c/#\"]\nsubscribe = [\"c/%c/+\"]\nusername = \"u-%c\"\npassword = \"pw\"\n",
            )),
            ..AuthConfig::default()
        };
        assert_eq!(auth.admit("t", &peer("127.0.0.2")).unwrap_err(), Refusal::UnknownClient);
        assert_eq!(auth.admit("s-1", &peer("127.0.0.3")).unwrap_err(), Refusal::Address);
        let a = auth.admit("s-1", &peer("127.0.0.2")).unwrap();
        let c = a.credentials.unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u-s-1", "pw"));
        let g = a.grants;
        assert_eq!(g.may_publish("s/s-1/t"), Ok(()));
        assert_eq!(g.may_publish("s/s-2/t"), Err(Denied::Acl));
        assert!(g.may_subscribe("c/s-1/x") && g.may_subscribe("c/s-1/+"));
        assert!(!g.may_subscribe("c/s-1/#") && !g.may_subscribe("c/#"));
        // A client id that would widen a pattern grants nothing.
        let wide = auth.admit("s-+", &peer("127.0.0.2")).unwrap().grants;
        assert_eq!(wide.may_publish("s/x/t"), Err(Denied::Acl));
        assert!(!wide.may_subscribe("c/x/y"));
    }

    #[test]
    fn regrant_after_the_entry_is_gone_grants_nothing() {
        let auth = AuthConfig {
            registry: Some(registry("")),
            ..AuthConfig::default()
        };
        let g = auth.regrant("gone", None, None);
        assert_eq!(g.may_publish("a"), Err(Denied::Acl));
        assert!(!g.may_subscribe("a"));
    }

    #[test]
    fn mountpoints() {
        let auth = AuthConfig {
            mountpoint: Some("site/%c/".into()),
            ..AuthConfig::default()
        };
        let g = auth.admit("d1", &peer("127.0.0.1")).unwrap().grants;
        assert_eq!(g.mount("t/1"), "site/d1/t/1");
        assert_eq!(g.unmount("site/d1/t/1"), Some("t/1"));
        assert_eq!(g.unmount("site/d2/t/1"), None);
        assert_eq!(g.unmount("site/d1/"), None);
        assert_eq!(auth.admit("a/b", &peer("127.0.0.1")).unwrap_err(), Refusal::Mountpoint);
        // QoS -1 senders have no client id for %c.
        assert!(auth.qos_minus_one(&peer("127.0.0.1")).is_none());
    }

    #[test]
    fn qos_minus_one_senders_are_matched_by_address() {
        let auth = AuthConfig {
            registry: Some(registry(
                "[[device]]\nclient_id = \"any\"\npublish = [\"#\"]\n[[device]]\nclient_id = \"beacon\"\naddresses = [\"127.0.0.5\"]\npublish = [\"b/%c\"]\n",
            )),
            ..AuthConfig::default()
        };
        let g = auth.qos_minus_one(&peer("127.0.0.5")).unwrap();
        assert_eq!(g.may_publish("b/beacon"), Ok(()));
        assert_eq!(g.may_publish("b/other"), Err(Denied::Acl));
        assert!(
            auth.qos_minus_one(&peer("127.0.0.6")).is_none(),
            "entries without addresses do not match QoS -1"
        );
    }
}
