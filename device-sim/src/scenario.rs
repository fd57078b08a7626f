//! Scenario files (TOML): groups of devices and how each behaves. The format is described
//! in `docs/simulator.md`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::device::MAX_PAYLOAD;
use crate::radio::LinkModel;

/// A duration written as `"250ms"`, `"10s"`, `"5m"`, `"1h"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(try_from = "DurationRepr", into = "String")]
pub struct Dur(pub Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationRepr {
    Secs(f64),
    Text(String),
}

impl TryFrom<DurationRepr> for Dur {
    type Error = String;
    fn try_from(r: DurationRepr) -> Result<Self, String> {
        match r {
            DurationRepr::Secs(s) if s.is_finite() && s >= 0.0 => Ok(Dur(Duration::from_secs_f64(s))),
            DurationRepr::Secs(s) => Err(format!("{s} is not a duration")),
            DurationRepr::Text(t) => parse_duration(&t).map(Dur),
        }
    }
}

impl From<Dur> for String {
    fn from(d: Dur) -> String {
        format!("{}ms", d.0.as_millis())
    }
}

impl Dur {
    /// Milliseconds.
    pub fn ms(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Parses `"250ms"`, `"10s"`, `"1.5s"`, `"5m"`, `"1h"` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 10s, 5m, 1h)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Relative weights of the QoS levels of a group's publishes (they need not sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QosMix {
    /// QoS -1 (needs `short_topic`).
    pub minus_one: f64,
    /// QoS 0.
    pub q0: f64,
    /// QoS 1.
    pub q1: f64,
    /// QoS 2.
    pub q2: f64,
}

impl Default for QosMix {
    fn default() -> Self {
        QosMix {
            minus_one: 0.0,
            q0: 0.4,
            q1: 0.4,
            q2: 0.2,
        }
    }
}

impl QosMix {
    /// Picks a QoS for a draw `u` uniform in `0..1`.
    pub fn pick(&self, u: f64) -> sn_codec::QoS {
        use sn_codec::QoS;
        let total = self.minus_one + self.q0 + self.q1 + self.q2;
        let mut x = u * total;
        for (w, q) in [
            (self.minus_one, QoS::MinusOne),
            (self.q0, QoS::AtMostOnce),
            (self.q1, QoS::AtLeastOnce),
        ] {
            if x < w {
                return q;
            }
            x -= w;
        }
        QoS::ExactlyOnce
    }
}

/// Sleep cycle of a group: DISCONNECT with `duration`, wake with PINGREQ when it is about
/// to run out; CONNECT again when there is something to publish, stay `awake` that long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepSpec {
    /// Sleep duration announced in DISCONNECT.
    pub duration: Dur,
    /// How long a device stays connected after (re)connecting before it sleeps again.
    #[serde(default = "default_awake")]
    pub awake: Dur,
}

fn default_awake() -> Dur {
    Dur(Duration::from_secs(1))
}

/// A group of identical devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Group {
    /// Name (part of the topic and the report).
    pub name: String,
    /// Number of devices.
    pub count: usize,
    /// Time between two publishes of a device (0: never publishes).
    pub publish_interval: Dur,
    /// Random extra time added to each interval, uniform in `0..=jitter`.
    pub jitter: Dur,
    /// Payload size in bytes (at least the identifying header; padded).
    pub payload_size: usize,
    /// QoS mix.
    pub qos: QosMix,
    /// Two-character short topic for QoS -1 publishes.
    pub short_topic: Option<String>,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// Tretry of the devices.
    pub t_retry: Dur,
    /// Nretry of the devices.
    pub n_retry: u8,
    /// CLEAN SESSION flag.
    pub clean_session: bool,
    /// Devices of the group start spread uniformly over this long.
    pub ramp: Dur,
    /// Sleep cycle, if the devices sleep.
    pub sleep: Option<SleepSpec>,
    /// Time between two downlink messages the broker side sends to each device of the
    /// group (0: none). Devices subscribe to their downlink topic.
    pub downlink_interval: Dur,
    /// QoS of the downlink subscription and messages (0, 1 or 2).
    pub downlink_qos: u8,
    /// Extra topic filters every device subscribes to (QoS 1), after its downlink topic.
    /// `{prefix}`, `{run}`, `{group}` and `{device}` are replaced, e.g. `"{prefix}/{run}/+/+"`
    /// makes every device receive every uplink message of the run (fan-out).
    pub subscribe: Vec<String>,
    /// Devices connect with a will (QoS 1) on `<prefix>/<run>-will/<group>/<device>`; the
    /// verifier counts the wills the gateway publishes for lost devices.
    pub will: bool,
    /// The radio of the group.
    pub radio: LinkModel,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            name: "devices".into(),
            count: 1,
            publish_interval: Dur(Duration::from_secs(5)),
            jitter: Dur(Duration::from_secs(1)),
            payload_size: 64,
            qos: QosMix::default(),
            short_topic: None,
            keep_alive: 60,
            t_retry: Dur(Duration::from_secs(2)),
            n_retry: 5,
            clean_session: true,
            ramp: Dur(Duration::from_secs(1)),
            sleep: None,
            downlink_interval: Dur(Duration::ZERO),
            downlink_qos: 1,
            subscribe: Vec::new(),
            will: false,
            radio: LinkModel::PERFECT,
        }
    }
}

/// `[run]`: defaults for the command line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Run duration (publishing stops then).
    pub duration: Option<Dur>,
    /// Seed.
    pub seed: Option<u64>,
    /// First topic level of every device topic (default `sim`).
    pub topic_prefix: Option<String>,
    /// How long, after publishing stops, devices may finish outstanding exchanges and the
    /// verifier waits for the last messages (default 5 s).
    pub drain: Option<Dur>,
    /// The devices' client ids, `%n` the device number (default `sim-<run>-<n>`).
    pub client_id: Option<String>,
    /// DTLS: the PSK identity (with `psk`), or its pattern (with `psk_derive`).
    pub psk_identity: Option<String>,
    /// DTLS: one pre-shared key for every device, in hex.
    pub psk: Option<String>,
    /// DTLS: the fleet secret each device's key is derived from.
    pub psk_derive: Option<String>,
    /// DTLS: the gateway registry to read each device's identity and key from (relative
    /// to the scenario file's directory).
    pub psk_registry: Option<std::path::PathBuf>,
}

/// A scenario file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// `[run]`.
    pub run: RunSection,
    /// `[[group]]` tables.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

/// A scenario that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range.
    #[error("group {group:?}: {message}")]
    Invalid {
        /// The group.
        group: String,
        /// What is wrong.
        message: String,
    },
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut s = Self::parse(&text).map_err(|e| match e {
            ScenarioError::Parse(m) => ScenarioError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })?;
        if let (Some(registry), Some(dir)) = (&mut s.run.psk_registry, path.parent()) {
            *registry = dir.join(&*registry);
        }
        Ok(s)
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// One group of `devices` devices with the defaults.
    pub fn single(devices: usize) -> Scenario {
        Scenario {
            run: RunSection::default(),
            groups: vec![Group {
                count: devices,
                ..Group::default()
            }],
        }
    }

    /// Total number of devices.
    pub fn devices(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Scales the group counts so that they add up to `total` (keeping proportions).
    pub fn scale_to(&mut self, total: usize) {
        let current = self.devices();
        if current == 0 || current == total {
            if let (0, Some(g)) = (current, self.groups.first_mut()) {
                g.count = total;
            }
            return;
        }
        let mut assigned = 0;
        let n = self.groups.len();
        for (i, g) in self.groups.iter_mut().enumerate() {
            g.count = if i + 1 == n {
                total.saturating_sub(assigned)
            } else {
                (g.count as u128 * total as u128 / current as u128) as usize
            };
            assigned += g.count;
        }
    }

    /// Checks every group.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.groups.is_empty() {
            return Err(ScenarioError::Parse("the scenario has no [[group]]".into()));
        }
        for g in &self.groups {
            let bad = |message: String| ScenarioError::Invalid {
                group: g.name.clone(),
                message,
            };
            if g.name.is_empty() || g.name.contains(['/', '+', '#']) {
                return Err(bad("name must be non-empty without '/', '+' or '#'".into()));
            }
            g.radio.validate().map_err(|e| bad(e.to_string()))?;
            if g.payload_size > MAX_PAYLOAD {
                return Err(bad(format!("payload_size {} exceeds {MAX_PAYLOAD}", g.payload_size)));
            }
            let q = g.qos;
            if [q.minus_one, q.q0, q.q1, q.q2]
                .iter()
                .any(|w| !w.is_finite() || *w < 0.0)
                || q.minus_one + q.q0 + q.q1 + q.q2 <= 0.0
            {
                return Err(bad("qos weights must be non-negative and not all zero".into()));
            }
            if q.minus_one > 0.0 && !matches!(&g.short_topic, Some(s) if s.len() == 2) {
                return Err(bad("QoS -1 needs short_topic, a two-character topic name".into()));
            }
            if let Some(s) = g.sleep {
                if s.duration.0.as_secs() == 0 || s.duration.0.as_secs() > u64::from(u16::MAX) {
                    return Err(bad("sleep duration must be 1 s to 65535 s".into()));
                }
            }
            if g.subscribe.iter().any(|f| f.is_empty()) {
                return Err(bad("subscribe filters must not be empty".into()));
            }
            if g.downlink_qos > 2 {
                return Err(bad("downlink_qos must be 0, 1 or 2".into()));
            }
            if g.t_retry.ms() == 0 || g.t_retry.ms() > u64::from(u32::MAX) {
                return Err(bad("t_retry must be positive".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn example_parses() {
        let s = Scenario::parse(include_str!("../scenarios/sleepy.toml")).expect("example parses");
        assert_eq!(s.groups.len(), 2);
        assert!(s.groups.iter().any(|g| g.sleep.is_some()));
    }

    #[test]
    fn scaling_keeps_proportions() {
        let mut s = Scenario::parse(
            "[[group]]\nname = \"a\"\ncount = 30\n[[group]]\nname = \"b\"\ncount = 10\n[group.radio]\nloss = 0.1\n",
        )
        .expect("parses");
        s.scale_to(1000);
        assert_eq!(s.groups.iter().map(|g| g.count).collect::<Vec<_>>(), vec![750, 250]);
        assert!((s.groups[1].radio.loss - 0.1).abs() < 1e-9);
    }

    #[test]
    fn bad_scenarios_are_refused() {
        assert!(Scenario::parse("[[group]]\nloss = 2\n").is_err());
        assert!(Scenario::parse("[[group]]\n[group.radio]\nloss = 2.0\n").is_err());
        assert!(Scenario::parse("[[group]]\n[group.qos]\nminus_one = 1.0\n").is_err());
        assert!(Scenario::parse("[[group]]\npayload_size = 100000\n").is_err());
        assert!(Scenario::parse("").is_err());
    }

    #[test]
    fn qos_mix_picks_by_weight() {
        use sn_codec::QoS;
        let m = QosMix {
            minus_one: 1.0,
            q0: 1.0,
            q1: 1.0,
            q2: 1.0,
        };
        assert_eq!(m.pick(0.1), QoS::MinusOne);
        assert_eq!(m.pick(0.3), QoS::AtMostOnce);
        assert_eq!(m.pick(0.6), QoS::AtLeastOnce);
        assert_eq!(m.pick(0.9), QoS::ExactlyOnce);
    }
}
