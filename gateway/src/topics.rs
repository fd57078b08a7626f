//! Topic ids: the per-client table of normal topic ids, predefined topics from
//! configuration, and the rules for which MQTT-SN topic reference a topic name gets.

use std::collections::HashMap;
use std::sync::Arc;

use sn_codec::TopicRef;

/// Predefined topic ids, shared by every client (spec 3: "predefined topic ids").
#[derive(Debug, Default, Clone)]
pub struct Predefined {
    by_id: HashMap<u16, Arc<str>>,
    by_name: HashMap<Arc<str>, u16>,
}

impl Predefined {
    /// Builds the table. Errors name the first id or topic defined twice, or a topic
    /// name that cannot be published to (wildcards, empty).
    pub fn new(entries: impl IntoIterator<Item = (u16, String)>) -> Result<Self, String> {
        let mut table = Predefined::default();
        for (id, name) in entries {
            if id == 0 || id == 0xFFFF {
                return Err(format!("predefined topic id {id} is reserved"));
            }
            if !is_valid_topic_name(&name) {
                return Err(format!("predefined topic {id}={name:?} is not a valid topic name"));
            }
            let name: Arc<str> = name.into();
            if table.by_id.insert(id, name.clone()).is_some() {
                return Err(format!("predefined topic id {id} is defined twice"));
            }
            if table.by_name.insert(name.clone(), id).is_some() {
                return Err(format!("predefined topic {name:?} is defined twice"));
            }
        }
        Ok(table)
    }

    /// The topic name of a predefined id.
    pub fn name(&self, id: u16) -> Option<&Arc<str>> {
        self.by_id.get(&id)
    }

    /// The predefined id of a topic name.
    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// Number of predefined topics.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no topic is predefined.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// This table with `own` on top (one device's predefined topics over the global
    /// ones): an id of `own` replaces the global entry with that id, and a name of `own`
    /// the global entry with that name, so that each id and each name stays unique.
    pub fn overlay(&self, own: &[(u16, String)]) -> Predefined {
        let mut table = self.clone();
        for (id, name) in own {
            if let Some(old) = table.by_id.remove(id) {
                table.by_name.remove(&old);
            }
            if let Some(old) = table.by_name.remove(name.as_str()) {
                table.by_id.remove(&old);
            }
            let name: Arc<str> = name.as_str().into();
            table.by_id.insert(*id, name.clone());
            table.by_name.insert(name, *id);
        }
        table
    }
}

/// Longest topic name or filter accepted from a device, in octets of UTF-8.
///
/// MQTT allows 65535 and an MQTT-SN datagram could carry almost as much, but no sensor
/// topic layout comes near 1024 octets (AWS IoT stops at 256), and every name a device
/// registers is kept in its topic table (up to `max_topics_per_client` of them), so the
/// gateway bounds it. The same rule holds for every path: REGISTER, PUBLISH to a short
/// name, SUBSCRIBE, UNSUBSCRIBE, will topics and predefined topics in the configuration.
pub const MAX_TOPIC_LEN: usize = 1024;

/// Why a topic name or filter is refused (the device is answered with return code 0x03,
/// and nothing goes to the broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TopicError {
    /// The empty string (MQTT 3.1.1 section 4.7.3: at least one character).
    #[error("empty topic")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] octets.
    #[error("topic longer than {MAX_TOPIC_LEN} octets")]
    TooLong,
    /// A character brokers refuse: U+0000 (MQTT 3.1.1 section 1.5.3, a malformed
    /// packet), the control characters U+0001..=U+001F and U+007F..=U+009F, and the
    /// Unicode non-characters (U+FDD0..=U+FDEF, U+xFFFE, U+xFFFF). The spec says
    /// "SHOULD NOT"; mosquitto closes the connection on any of them.
    #[error("topic contains the character {0:?}")]
    ForbiddenChar(char),
    /// A wildcard (`+` or `#`) in a topic name (section 4.7.1: names have none).
    #[error("wildcard in a topic name")]
    WildcardInName,
    /// A wildcard that is not a whole level, or `#` not at the end (`a/#/b`, `a+`,
    /// `#a`; section 4.7.1.2, 4.7.1.3).
    #[error("malformed wildcard in a topic filter")]
    MalformedWildcard,
    /// Not UTF-8 (a short topic name's two octets; MQTT 3.1.1 section 1.5.3).
    #[error("topic is not valid UTF-8")]
    NotUtf8,
}

/// Whether brokers refuse `c` in a topic (see [`TopicError::ForbiddenChar`]).
fn is_forbidden_char(c: char) -> bool {
    let u = u32::from(c);
    c.is_control() // U+0000..=U+001F and U+007F..=U+009F, exactly
        || (0xFDD0..=0xFDEF).contains(&u)
        || (u & 0xFFFE) == 0xFFFE
}

/// The rules names and filters share: length and characters.
fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    match topic.chars().find(|&c| is_forbidden_char(c)) {
        Some(c) => Err(TopicError::ForbiddenChar(c)),
        None => Ok(()),
    }
}

/// Checks a topic name a device publishes to (or names as its will topic). Empty levels
/// (`a//b`, `/a`) are allowed, as in MQTT.
pub fn check_topic_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter a device subscribes or unsubscribes to (MQTT 3.1.1 section
/// 4.7): `+` only as a whole level, `#` only as the whole last level.
pub fn check_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::MalformedWildcard);
        }
    }
    Ok(())
}

/// A topic name that can be published to ([`check_topic_name`]).
pub fn is_valid_topic_name(name: &str) -> bool {
    check_topic_name(name).is_ok()
}

/// A topic filter that can be subscribed to ([`check_topic_filter`]).
pub fn is_valid_topic_filter(filter: &str) -> bool {
    check_topic_filter(filter).is_ok()
}

/// Whether a filter contains wildcards (then SUBACK carries topic id 0).
pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// The normal topic ids of one client: both those the client registered and those the
/// gateway registered with the client before delivering on them.
#[derive(Debug, Default, Clone)]
pub struct TopicTable {
    by_id: HashMap<u16, Arc<str>>,
    by_name: HashMap<Arc<str>, u16>,
    next_id: u16,
    /// Changes since the last [`TopicTable::take_changes`], while recording (the state
    /// store writes them); `None`: not recording.
    journal: Option<Vec<TopicChange>>,
}

/// A change to a [`TopicTable`], as the state store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicChange {
    /// An id was assigned to a name (by the device's REGISTER or SUBSCRIBE, or by the
    /// gateway before it delivers on the name).
    Assigned(u16, Arc<str>),
    /// An id was forgotten.
    Removed(u16),
}

impl TopicTable {
    /// A table holding `entries` (read back from the state store). Later duplicates of an
    /// id or a name are ignored; reserved ids (0, 0xFFFF) are skipped.
    pub fn from_entries(entries: impl IntoIterator<Item = (u16, Arc<str>)>) -> TopicTable {
        let mut table = TopicTable::default();
        for (id, name) in entries {
            if id == 0 || id == 0xFFFF || table.by_id.contains_key(&id) || table.by_name.contains_key(&name) {
                continue;
            }
            table.by_id.insert(id, name.clone());
            table.by_name.insert(name, id);
            // New ids continue after the highest one in use, as before the restart.
            table.next_id = table.next_id.max(id);
        }
        table
    }

    /// Every id and its name, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (u16, &Arc<str>)> {
        self.by_id.iter().map(|(id, name)| (*id, name))
    }

    /// Starts (or stops) recording changes for [`TopicTable::take_changes`]; what was
    /// recorded before is dropped.
    pub fn record(&mut self, on: bool) {
        self.journal = on.then(Vec::new);
    }

    /// The changes recorded since the last call (empty when not recording).
    pub fn take_changes(&mut self) -> Vec<TopicChange> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The name behind a normal topic id.
    pub fn name(&self, id: u16) -> Option<&Arc<str>> {
        self.by_id.get(&id)
    }

    /// The normal id of a name, if one is assigned.
    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// Number of ids assigned.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no id is assigned.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The id of `name`, assigning a fresh one if needed. `None` when the table already
    /// holds `limit` ids (the caller answers with congestion).
    pub fn assign(&mut self, name: &str, limit: usize, predefined: &Predefined) -> Option<u16> {
        if let Some(id) = self.id(name) {
            return Some(id);
        }
        if self.by_id.len() >= limit || self.by_id.len() >= 0xFFFD {
            return None;
        }
        // Skip 0 and 0xFFFF (reserved) and ids predefined for everyone, so a normal
        // id never shadows a predefined one in logs and captures.
        let id = loop {
            self.next_id = self.next_id.wrapping_add(1);
            let id = self.next_id;
            if id != 0 && id != 0xFFFF && !self.by_id.contains_key(&id) && predefined.name(id).is_none() {
                break id;
            }
        };
        let name: Arc<str> = name.into();
        self.by_id.insert(id, name.clone());
        if let Some(journal) = &mut self.journal {
            journal.push(TopicChange::Assigned(id, name.clone()));
        }
        self.by_name.insert(name, id);
        Some(id)
    }

    /// Forgets an id (a REGISTER the client rejected, or an id it no longer knows).
    pub fn remove(&mut self, id: u16) {
        if let Some(name) = self.by_id.remove(&id) {
            self.by_name.remove(&name);
            if let Some(journal) = &mut self.journal {
                journal.push(TopicChange::Removed(id));
            }
        }
    }
}

/// How the gateway refers to `name` when delivering to a client: the client's normal id
/// if it has one (it registered or subscribed by that name), else a predefined id, else a
/// short name when the name is two octets. `None` means the gateway must REGISTER it first.
pub fn outbound_ref(name: &str, predefined: &Predefined, table: &TopicTable) -> Option<TopicRef> {
    if let Some(id) = table.id(name) {
        return Some(TopicRef::Normal(id));
    }
    if let Some(id) = predefined.id(name) {
        return Some(TopicRef::Predefined(id));
    }
    if let &[a, b] = name.as_bytes() {
        return Some(TopicRef::Short([a, b]));
    }
    None
}

/// The two octets of a topic reference as they stand in PUBACK's TopicId field.
pub fn raw_id(topic: TopicRef) -> u16 {
    match topic {
        TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
        TopicRef::Short(bytes) => u16::from_be_bytes(bytes),
    }
}

/// Why a client's topic reference names no topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Unresolved {
    /// A normal or predefined id nobody assigned (return code 0x02, invalid topic id).
    #[error("unknown topic id")]
    UnknownId,
    /// A short name that is not a valid topic name (return code 0x03, not supported).
    #[error("invalid short topic name: {0}")]
    Invalid(TopicError),
}

/// The topic name a client's PUBLISH refers to. Normal and predefined names were
/// checked when they were registered or configured; a short name is checked here.
pub fn resolve(topic: TopicRef, predefined: &Predefined, table: &TopicTable) -> Result<Arc<str>, Unresolved> {
    match topic {
        TopicRef::Normal(id) => table.name(id).cloned().ok_or(Unresolved::UnknownId),
        TopicRef::Predefined(id) => predefined.name(id).cloned().ok_or(Unresolved::UnknownId),
        TopicRef::Short(bytes) => {
            let name = std::str::from_utf8(&bytes).map_err(|_| Unresolved::Invalid(TopicError::NotUtf8))?;
            check_topic_name(name).map_err(Unresolved::Invalid)?;
            Ok(Arc::from(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predefined() -> Predefined {
        Predefined::new([(77, "sensors/temp".to_string()), (1, "a/b".to_string())]).expect("valid")
    }

    #[test]
    fn predefined_rejects_duplicates_and_wildcards() {
        assert!(Predefined::new([(1, "a".into()), (1, "b".into())]).is_err());
        assert!(Predefined::new([(1, "a".into()), (2, "a".into())]).is_err());
        assert!(Predefined::new([(1, "a/#".into())]).is_err());
        assert!(Predefined::new([(0, "a".into())]).is_err());
    }

    #[test]
    fn assign_skips_predefined_and_reuses() {
        let p = predefined();
        let mut t = TopicTable::default();
        let a = t.assign("x/y", 10, &p).expect("room");
        assert_eq!(a, 2, "id 1 is predefined");
        assert_eq!(t.assign("x/y", 10, &p), Some(a));
        assert_eq!(t.name(a).map(|s| &**s), Some("x/y"));
        t.remove(a);
        assert_eq!(t.id("x/y"), None);
    }

    #[test]
    fn assign_respects_limit() {
        let p = Predefined::default();
        let mut t = TopicTable::default();
        assert!(t.assign("a/1", 2, &p).is_some());
        assert!(t.assign("a/2", 2, &p).is_some());
        assert_eq!(t.assign("a/3", 2, &p), None);
    }

    #[test]
    fn ids_wrap_without_reusing_live_ones() {
        let p = Predefined::default();
        let mut t = TopicTable {
            next_id: 0xFFFD,
            ..Default::default()
        };
        let a = t.assign("a", 10, &p).expect("room");
        let b = t.assign("b", 10, &p).expect("room");
        assert_eq!((a, b), (0xFFFE, 1));
    }

    #[test]
    fn outbound_prefers_client_id_then_predefined_then_short() {
        let p = predefined();
        let mut t = TopicTable::default();
        assert_eq!(outbound_ref("sensors/temp", &p, &t), Some(TopicRef::Predefined(77)));
        assert_eq!(outbound_ref("ab", &p, &t), Some(TopicRef::Short(*b"ab")));
        assert_eq!(outbound_ref("x/y", &p, &t), None);
        let id = t.assign("x/y", 10, &p).expect("room");
        assert_eq!(outbound_ref("x/y", &p, &t), Some(TopicRef::Normal(id)));
        let id = t.assign("ab", 10, &p).expect("room");
        assert_eq!(outbound_ref("ab", &p, &t), Some(TopicRef::Normal(id)));
    }

    /// Every control character, C0 and C1 (U+0000..=U+001F, U+007F..=U+009F).
    fn control_chars() -> impl Iterator<Item = char> {
        (0u32..=0x1F).chain(0x7F..=0x9F).filter_map(char::from_u32)
    }

    #[test]
    fn control_characters_are_refused_in_names_and_filters() {
        let mut n = 0;
        for c in control_chars() {
            n += 1;
            for topic in [format!("a/{c}/b"), format!("{c}"), format!("ab{c}")] {
                assert_eq!(check_topic_name(&topic), Err(TopicError::ForbiddenChar(c)), "{topic:?}");
                assert_eq!(
                    check_topic_filter(&topic),
                    Err(TopicError::ForbiddenChar(c)),
                    "{topic:?}"
                );
            }
        }
        assert_eq!(n, 32 + 33);
        assert!(!is_valid_topic_name("\u{1}\u{2}"));
        assert!(!is_valid_topic_filter("a/\u{7f}/#"));
        // Just outside the ranges.
        assert!(is_valid_topic_name("a/\u{20}/\u{7e}/\u{a0}"));
    }

    #[test]
    fn non_characters_are_refused() {
        for c in [
            '\u{fdd0}',
            '\u{fdef}',
            '\u{fffe}',
            '\u{ffff}',
            '\u{1fffe}',
            '\u{10ffff}',
        ] {
            assert_eq!(check_topic_name(&format!("a/{c}")), Err(TopicError::ForbiddenChar(c)));
        }
        assert!(is_valid_topic_name("température/°C/\u{fdcf}/\u{fff0}"));
    }

    #[test]
    fn wildcards_are_refused_in_names() {
        for name in ["a/+", "+", "#", "a/#", "+/b", "a+b", "a/b#"] {
            assert_eq!(check_topic_name(name), Err(TopicError::WildcardInName), "{name:?}");
        }
    }

    #[test]
    fn malformed_filters_are_refused() {
        for filter in ["a/#/b", "a+", "#a", "a/b#", "+a/b", "##", "a/++", "#/", "#/#", "a/+b/c"] {
            assert_eq!(
                check_topic_filter(filter),
                Err(TopicError::MalformedWildcard),
                "{filter:?}"
            );
        }
        for filter in ["+", "#", "a/+/c", "+/+", "/#", "a//b", "/", "+/#", "a/b"] {
            assert_eq!(check_topic_filter(filter), Ok(()), "{filter:?}");
        }
    }

    #[test]
    fn empty_topics_are_refused_but_empty_levels_are_not() {
        assert_eq!(check_topic_name(""), Err(TopicError::Empty));
        assert_eq!(check_topic_filter(""), Err(TopicError::Empty));
        // MQTT 3.1.1 section 4.7.3: zero-length levels are allowed.
        for name in ["a//b", "/a", "a/", "/", "//"] {
            assert_eq!(check_topic_name(name), Ok(()), "{name:?}");
            assert_eq!(check_topic_filter(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn over_long_topics_are_refused() {
        let longest = "a".repeat(MAX_TOPIC_LEN);
        assert_eq!(check_topic_name(&longest), Ok(()));
        assert_eq!(check_topic_filter(&longest), Ok(()));
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(check_topic_name(&too_long), Err(TopicError::TooLong));
        assert_eq!(check_topic_filter(&too_long), Err(TopicError::TooLong));
        // Octets, not characters: 513 two-octet characters are 1026 octets.
        assert_eq!(check_topic_name(&"é".repeat(513)), Err(TopicError::TooLong));
        assert_eq!(check_topic_name(&"é".repeat(512)), Ok(()));
    }

    #[test]
    fn resolve_checks_short_names() {
        let p = predefined();
        let t = TopicTable::default();
        assert_eq!(
            resolve(TopicRef::Short([1, 2]), &p, &t),
            Err(Unresolved::Invalid(TopicError::ForbiddenChar('\u{1}')))
        );
        assert_eq!(
            resolve(TopicRef::Short([0xFF, 0xFE]), &p, &t),
            Err(Unresolved::Invalid(TopicError::NotUtf8))
        );
        assert_eq!(
            resolve(TopicRef::Short(*b"a#"), &p, &t),
            Err(Unresolved::Invalid(TopicError::WildcardInName))
        );
        assert_eq!(resolve(TopicRef::Short(*b"ab"), &p, &t).as_deref(), Ok("ab"));
        assert_eq!(resolve(TopicRef::Normal(5), &p, &t), Err(Unresolved::UnknownId));
        assert_eq!(resolve(TopicRef::Predefined(5), &p, &t), Err(Unresolved::UnknownId));
        assert_eq!(resolve(TopicRef::Predefined(77), &p, &t).as_deref(), Ok("sensors/temp"));
    }

    #[test]
    fn predefined_topics_follow_the_same_rules() {
        assert!(Predefined::new([(1, "a/\u{1}/b".into())]).is_err());
        assert!(Predefined::new([(1, "a".repeat(MAX_TOPIC_LEN + 1))]).is_err());
    }

    #[test]
    fn filters() {
        assert!(is_valid_topic_filter("a/+/c"));
        assert!(is_valid_topic_filter("a/#"));
        assert!(is_valid_topic_filter("#"));
        assert!(!is_valid_topic_filter("a/#/c"));
        assert!(!is_valid_topic_filter("a+/b"));
        assert!(!is_valid_topic_filter(""));
        assert!(has_wildcards("a/+"));
        assert!(!is_valid_topic_name("a/+"));
    }
}
