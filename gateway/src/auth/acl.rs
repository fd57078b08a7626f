//! Topic access rules: MQTT filter matching, whether one filter covers another (for
//! SUBSCRIBE), `%c`/`%u` substitution in patterns (as mosquitto's ACL file does), and
//! client-id globs.

/// Whether the topic `name` matches the MQTT filter `filter` (MQTT 3.1.1 section 4.7).
/// A name starting with `$` is not matched by a wildcard in the first level (4.7.2).
pub fn filter_matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic that the filter `requested` matches is also matched by `pattern`:
/// the test for a SUBSCRIBE, so that `sensors/+/temp` is allowed by `sensors/#` while
/// `#` is not. A first level starting with `$` is covered only by the same literal level.
pub fn filter_covers(pattern: &str, requested: &str) -> bool {
    if requested.starts_with('$') && (pattern.starts_with('+') || pattern.starts_with('#')) {
        return false;
    }
    // A requested filter with a wildcard first level also matches `$` topics only if the
    // pattern does: it never does with a wildcard there (see above), so no special case.
    let mut p = pattern.split('/');
    let mut r = requested.split('/');
    loop {
        match (p.next(), r.next()) {
            (Some("#"), _) => return true,
            // `+` covers one level of anything but `#` (which spans many).
            (Some("+"), Some(rl)) if rl != "#" => {}
            (Some(pl), Some(rl)) if pl == rl && pl != "+" && pl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The values `%c` and `%u` stand for in a pattern.
#[derive(Debug, Clone, Copy)]
pub struct Subst<'a> {
    /// The client id (`%c`); `None` when there is none (a QoS -1 sender matched by a
    /// glob entry).
    pub client_id: Option<&'a str>,
    /// The broker user name (`%u`); `None` when there is none.
    pub username: Option<&'a str>,
}

/// Whether a value may be put into a topic pattern: not empty and no `/`, `+` or `#`,
/// else a client id such as `a/#` would widen `sensors/%c` to `sensors/a/#`.
fn substitutable(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '+', '#'])
}

/// `pattern` with `%c` and `%u` replaced. `None` when the pattern needs a value that is
/// missing, empty, or holds `/`, `+` or `#`: such a pattern grants nothing.
pub fn substitute(pattern: &str, s: Subst<'_>) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_string());
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let value = match after.chars().next() {
            Some('c') => s.client_id.filter(|v| substitutable(v))?,
            Some('u') => s.username.filter(|v| substitutable(v))?,
            // Validation refuses any other `%`; were one to get here, it grants nothing.
            _ => return None,
        };
        out.push_str(value);
        rest = &after[1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether a pattern's `%` sequences are all `%c` or `%u`.
pub fn valid_placeholders(pattern: &str) -> bool {
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        match rest[i + 1..].chars().next() {
            Some('c' | 'u') => rest = &rest[i + 2..],
            _ => return false,
        }
    }
    true
}

/// Whether `text` matches the glob `pattern`: `*` any run of characters (none
/// included), `?` exactly one character, anything else itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point (the last `*`): linear for the usual
    // patterns, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a client id pattern is a glob (has `*` or `?`).
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matching() {
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+/c", "a/b/d"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(filter_matches("#", "x/y"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(filter_matches("a//b", "a//b"));
    }

    #[test]
    fn covering() {
        assert!(filter_covers("a/#", "a/#"));
        assert!(filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/#", "#"));
        assert!(!filter_covers("a/#", "+/b"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(filter_covers("#", "+/b"));
    }

    #[test]
    fn substitution() {
        let s = Subst {
            client_id: Some("dev-1"),
            username: Some("u"),
        };
        assert_eq!(substitute("sensors/%c/#", s).as_deref(), Some("sensors/dev-1/#"));
        assert_eq!(substitute("%u/%c", s).as_deref(), Some("u/dev-1"));
        assert_eq!(substitute("plain", s).as_deref(), Some("plain"));
        let bad = Subst {
            client_id: Some("a/#"),
            username: None,
        };
        assert_eq!(substitute("sensors/%c", bad), None);
        assert_eq!(substitute("sensors/%u", bad), None);
        assert_eq!(substitute("x/%x", s), None);
        assert!(valid_placeholders("a/%c/%u"));
        assert!(!valid_placeholders("a/%d"));
        assert!(!valid_placeholders("a/%"));
    }

    #[test]
    fn globs() {
        assert!(glob_matches("sensor-*", "sensor-1"));
        assert!(glob_matches("sensor-*", "sensor-"));
        assert!(!glob_matches("sensor-*", "sensor"));
        assert!(glob_matches("s?n", "sun"));
        assert!(!glob_matches("s?n", "sn"));
        assert!(glob_matches("*a*b", "xxaxxb"));
        assert!(!glob_matches("*a*b", "xxaxxbc"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exact2"));
        assert!(glob_matches("*", ""));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$s".to_string()),
            Just(String::new())
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..4).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("empty", |(mut l, hash)| {
                if hash {
                    l.push("#".into());
                }
                (!l.is_empty()).then(|| l.join("/"))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A filter the pattern covers never matches a name the pattern does not.
        #[test]
        fn covered_filters_match_nothing_more(p in filter(), r in filter(), n in name()) {
            prop_assume!(crate::topics::is_valid_topic_filter(&p) && crate::topics::is_valid_topic_filter(&r));
            if filter_covers(&p, &r) && filter_matches(&r, &n) {
                prop_assert!(filter_matches(&p, &n), "{p} covers {r}, which matches {n}, which {p} does not");
            }
        }

        /// A filter covers itself, and a name (a filter without wildcards) is covered
        /// exactly when it matches.
        #[test]
        fn names_are_covered_when_they_match(p in filter(), n in name()) {
            prop_assume!(crate::topics::is_valid_topic_filter(&p));
            prop_assert!(filter_covers(&p, &p));
            prop_assert_eq!(filter_covers(&p, &n), filter_matches(&p, &n));
        }

        /// Without wildcards, a glob is equality.
        #[test]
        fn plain_globs_are_equality(a in "[a-c]{0,4}", b in "[a-c]{0,4}") {
            prop_assert_eq!(glob_matches(&a, &b), a == b);
        }

        /// `*` then anything: a prefix test.
        #[test]
        fn star_globs_are_prefixes(a in "[a-c]{0,3}", b in "[a-c]{0,5}") {
            prop_assert_eq!(glob_matches(&format!("{a}*"), &b), b.starts_with(&a));
        }
    }
}
