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
}

/// A topic name that can be published to: non-empty, no wildcards, no NUL.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', '#', '\0'])
}

/// A topic filter that can be subscribed to (MQTT 3.1.1 section 4.7 rules).
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
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
}

impl TopicTable {
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
        self.by_name.insert(name, id);
        Some(id)
    }

    /// Forgets an id (a REGISTER the client rejected, or an id it no longer knows).
    pub fn remove(&mut self, id: u16) {
        if let Some(name) = self.by_id.remove(&id) {
            self.by_name.remove(&name);
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

/// The topic name a client's PUBLISH refers to, or `None` for an unknown id.
pub fn resolve(topic: TopicRef, predefined: &Predefined, table: &TopicTable) -> Option<Arc<str>> {
    match topic {
        TopicRef::Normal(id) => table.name(id).cloned(),
        TopicRef::Predefined(id) => predefined.name(id).cloned(),
        TopicRef::Short(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .filter(|s| is_valid_topic_name(s))
            .map(Arc::from),
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
