//! What a configuration reload (SIGHUP) changes: the difference between the
//! configuration in force and one loaded again, split into what a running gateway
//! applies (`log.level`, `[predefined]`, `auth.devices_file` and the registry it names)
//! and what needs a restart (everything else).
//!
//! The comparison walks the whole [`Config`] through serde, so a key added later is
//! covered (as needing a restart) without being listed here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::Config;

/// The keys a reload applies; any other key that changed needs a restart.
/// (The registry's contents are compared by the caller, from the loaded [`super::Settings`].)
pub const RELOADABLE: [&str; 3] = ["log.level", "predefined", "auth.devices_file"];

/// What differs between the running configuration and a newly loaded one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// `log.level`, the running value and the new one, when they differ.
    pub log_level: Option<(String, String)>,
    /// Topic ids added to, removed from or renamed in `[predefined]`.
    pub predefined: PredefinedChanges,
    /// The other keys that differ (`section.key`, sorted): not applied, they need a
    /// restart. A list or an array of tables (`udp.listen`, `serial`) is one key.
    pub needs_restart: Vec<String>,
}

/// What a reload changed in a table keyed by `K` (topic ids of `[predefined]`, client
/// ids of the device registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedChanges<K> {
    /// Keys present now and not before.
    pub added: Vec<K>,
    /// Keys present before and not now.
    pub removed: Vec<K>,
    /// Keys present both times, with another value now.
    pub changed: Vec<K>,
}

impl<K> Default for KeyedChanges<K> {
    fn default() -> Self {
        KeyedChanges {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        }
    }
}

impl<K: Ord + Clone> KeyedChanges<K> {
    /// The differences from `old` to `new`, `same` deciding whether a value kept its
    /// meaning.
    pub fn between<V>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>, same: impl Fn(&V, &V) -> bool) -> Self {
        KeyedChanges {
            added: new.keys().filter(|k| !old.contains_key(*k)).cloned().collect(),
            removed: old.keys().filter(|k| !new.contains_key(*k)).cloned().collect(),
            changed: new
                .iter()
                .filter(|(k, v)| old.get(*k).is_some_and(|o| !same(o, v)))
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }
}

impl<K> KeyedChanges<K> {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl<K> fmt::Display for KeyedChanges<K> {
    /// `+added -removed ~changed`, as counts: `+3 -1 ~0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{} -{} ~{}",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        )
    }
}

/// Changes to `[predefined]`, by topic id (`changed`: another topic name now).
pub type PredefinedChanges = KeyedChanges<u16>;

impl Changes {
    /// What differs from `running` in `new`. Both are expected to be valid
    /// ([`Config::validate_offline`]); `[predefined]` keys that are not topic ids are
    /// ignored here (validation refuses them).
    pub fn between(running: &Config, new: &Config) -> Changes {
        let log_level = (running.log.level.trim() != new.log.level.trim())
            .then(|| (running.log.level.trim().to_string(), new.log.level.trim().to_string()));
        let (old_ids, new_ids) = (predefined_ids(running), predefined_ids(new));
        let predefined = PredefinedChanges::between(&old_ids, &new_ids, |a, b| a == b);
        let (old_keys, new_keys) = (leaves(running), leaves(new));
        let needs_restart = old_keys
            .keys()
            .chain(new_keys.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|key| !RELOADABLE.iter().any(|r| key == r || key.starts_with(&format!("{r}."))))
            .filter(|key| old_keys.get(*key) != new_keys.get(*key))
            .cloned()
            .collect();
        Changes {
            log_level,
            predefined,
            needs_restart,
        }
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.log_level.is_none() && self.predefined.is_empty() && self.needs_restart.is_empty()
    }
}

/// `[predefined]` by id (the file's keys are strings: `" 7"` and `"7"` are one id).
fn predefined_ids(config: &Config) -> BTreeMap<u16, &str> {
    config
        .predefined
        .iter()
        .filter_map(|(id, name)| Some((id.trim().parse::<u16>().ok()?, name.as_str())))
        .collect()
}

/// Every key of the configuration as `section.key`, with its value; tables are walked,
/// anything else (lists and arrays of tables included) is one value.
fn leaves(config: &Config) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(root)) => walk("", root, &mut out),
        // Config always serializes to a table; were it not to, everything would read as
        // unchanged, so say so loudly rather than hide a change.
        Ok(_) | Err(_) => {
            out.insert("<configuration does not serialize>".into(), toml::Value::Boolean(true));
        }
    }
    out
}

fn walk(prefix: &str, table: toml::map::Map<String, toml::Value>, out: &mut BTreeMap<String, toml::Value>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => walk(&path, t, out),
            v => {
                out.insert(path, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let text = "[log]\nlevel = \"info\"\n[predefined]\n1 = \"a\"\n[udp]\nlisten = [\"127.0.0.1:1\"]\n";
        let changes = Changes::between(&parse(text), &parse(text));
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn level_and_predefined_are_reloadable() {
        let old = parse("[log]\nlevel = \"info\"\n[predefined]\n1 = \"a\"\n2 = \"b\"\n3 = \"c\"\n");
        let new = parse("[log]\nlevel = \"debug\"\n[predefined]\n1 = \"a\"\n2 = \"B\"\n4 = \"d\"\n5 = \"e\"\n");
        let changes = Changes::between(&old, &new);
        assert_eq!(changes.log_level, Some(("info".into(), "debug".into())));
        assert_eq!(
            changes.predefined,
            PredefinedChanges {
                added: vec![4, 5],
                removed: vec![3],
                changed: vec![2],
            }
        );
        assert_eq!(changes.predefined.to_string(), "+2 -1 ~1");
        assert!(changes.needs_restart.is_empty(), "{changes:?}");
    }

    #[test]
    fn other_keys_need_a_restart_and_are_not_taken() {
        let old = parse("[udp]\nlisten = [\"127.0.0.1:1\"]\n[log]\nformat = \"text\"\n");
        let new = parse(
            "[udp]\nlisten = [\"127.0.0.1:2\"]\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\
             [broker]\nurl = \"mqtt://10.0.0.1:1883\"\n[[serial]]\npath = \"/dev/ttyUSB0\"\n",
        );
        let changes = Changes::between(&old, &new);
        assert_eq!(
            changes.needs_restart,
            ["broker.url", "log.format", "serial", "udp.listen"]
        );
        // Once the reloadable keys are applied, only the others still differ.
        let mut applied = old.clone();
        applied.log.level.clone_from(&new.log.level);
        let again = Changes::between(&applied, &new);
        assert_eq!(again.log_level, None);
        assert_eq!(again.needs_restart, changes.needs_restart);
    }

    #[test]
    fn a_key_removed_from_the_file_is_a_change_to_its_default() {
        let old = parse("[broker]\nurl = \"mqtt://10.0.0.1:1883\"\n");
        let changes = Changes::between(&old, &parse(""));
        assert_eq!(changes.needs_restart, ["broker.url"]);
    }

    #[test]
    fn predefined_ids_are_compared_as_numbers() {
        let old = parse("[predefined]\n\"7\" = \"a\"\n");
        let new = parse("[predefined]\n\" 7\" = \"a\"\n");
        assert!(Changes::between(&old, &new).predefined.is_empty());
    }
}
