//! Which topic filters match a topic name: the subscription index of aggregating mode,
//! where the gateway, not the broker, decides which devices a message goes to.
//!
//! A tree with one level of the filter per edge (MQTT 3.1.1 section 4.7): `+` matches one
//! level, `#` (last) this level and all below, including the parent (`a/#` matches `a`),
//! and a filter starting with a wildcard does not match a topic starting with `$`.
//! Matching costs the depth of the topic times the wildcard branches, not the number of
//! filters held, so 100,000 devices each with their own command topic stay cheap.

use std::collections::HashMap;
use std::sync::Arc;

/// A set of topic filters, searchable by topic name.
#[derive(Debug, Default)]
pub struct FilterIndex {
    root: Node,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// The filter that ends at this node, if any.
    filter: Option<Arc<str>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.filter.is_none() && self.children.is_empty()
    }
}

impl FilterIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Filters held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no filter is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `filter` (no effect when held already).
    pub fn insert(&mut self, filter: Arc<str>) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.filter.is_none() {
            node.filter = Some(filter);
            self.len += 1;
        }
    }

    /// Removes `filter`, and the branches it alone used; whether it was held.
    pub fn remove(&mut self, filter: &str) -> bool {
        fn remove_at<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) -> bool {
            match levels.next() {
                None => node.filter.take().is_some(),
                Some(level) => {
                    let Some(child) = node.children.get_mut(level) else {
                        return false;
                    };
                    let removed = remove_at(child, levels);
                    if removed && child.is_empty() {
                        node.children.remove(level);
                    }
                    removed
                }
            }
        }
        let removed = remove_at(&mut self.root, filter.split('/'));
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `found` once for every held filter that matches `topic`.
    pub fn matches(&self, topic: &str, mut found: impl FnMut(&Arc<str>)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let system = topic.starts_with('$');
        walk(&self.root, &levels, 0, system, &mut found);
    }
}

fn walk(node: &Node, levels: &[&str], i: usize, system: bool, found: &mut impl FnMut(&Arc<str>)) {
    // A wildcard in the first level never matches a `$` topic (MQTT-4.7.2-1).
    let wild_ok = !(i == 0 && system);
    if wild_ok {
        if let Some(f) = node.children.get("#").and_then(|n| n.filter.as_ref()) {
            found(f);
        }
    }
    let Some(level) = levels.get(i) else {
        if let Some(f) = &node.filter {
            found(f);
        }
        return;
    };
    if let Some(child) = node.children.get(*level) {
        walk(child, levels, i + 1, system, found);
    }
    if wild_ok && *level != "+" {
        if let Some(child) = node.children.get("+") {
            walk(child, levels, i + 1, system, found);
        }
    }
}

/// Whether `filter` matches `topic`, by the same rules (for one filter, without an index).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matched(index: &FilterIndex, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        index.matches(topic, |f| v.push(f.to_string()));
        v.sort();
        v
    }

    fn index_of(filters: &[&str]) -> FilterIndex {
        let mut i = FilterIndex::new();
        for f in filters {
            i.insert(Arc::from(*f));
        }
        i
    }

    #[test]
    fn wildcards_match_as_the_mqtt_rules_say() {
        let i = index_of(&["a/b", "a/+", "a/#", "#", "+/b", "a/+/c", "$SYS/#", "+/+", "a/b/#"]);
        assert_eq!(matched(&i, "a/b"), ["#", "+/+", "+/b", "a/#", "a/+", "a/b", "a/b/#"]);
        assert_eq!(matched(&i, "a"), ["#", "a/#"]);
        assert_eq!(matched(&i, "a/x/c"), ["#", "a/#", "a/+/c"]);
        assert_eq!(matched(&i, "$SYS/x"), ["$SYS/#"]);
        assert_eq!(matched(&i, "b"), ["#"]);
        assert_eq!(matched(&i, "a//c"), ["#", "a/#", "a/+/c"]);
    }

    #[test]
    fn removing_prunes_and_keeps_the_others() {
        let mut i = index_of(&["a/b/c", "a/b", "x/#"]);
        assert!(i.remove("a/b/c"));
        assert!(!i.remove("a/b/c"));
        assert!(!i.remove("a"));
        assert_eq!(i.len(), 2);
        assert_eq!(matched(&i, "a/b"), ["a/b"]);
        assert!(matched(&i, "a/b/c").is_empty());
        assert!(i.remove("a/b"));
        assert!(i.remove("x/#"));
        assert!(i.is_empty());
        assert!(i.root.children.is_empty(), "no empty branch is left behind");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$s".to_string())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#".into());
                }
                levels.join("/")
            })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    proptest! {
        /// The index finds exactly the filters that match one by one, after any inserts
        /// and removals.
        #[test]
        fn the_index_agrees_with_matching_one_filter_at_a_time(
            filters in prop::collection::vec(filter(), 0..12),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut index = FilterIndex::new();
            let mut held: Vec<String> = Vec::new();
            for f in &filters {
                index.insert(Arc::from(f.as_str()));
                if !held.contains(f) {
                    held.push(f.clone());
                }
            }
            for r in removed {
                if held.is_empty() { break; }
                let f = held.remove(r.index(held.len()));
                prop_assert!(index.remove(&f));
            }
            prop_assert_eq!(index.len(), held.len());
            for t in &topics {
                let mut want: Vec<String> = held.iter().filter(|f| filter_matches(f, t)).cloned().collect();
                want.sort();
                prop_assert_eq!(matched(&index, t), want, "topic {}", t);
            }
        }
    }
}
