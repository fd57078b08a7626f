use super::cli::{lookup, parse_predefined, parse_serial_flag};
use super::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

use clap::Parser;

pub(super) fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["mqtt-sn-gateway"];
    all.extend_from_slice(args);
    let matches = Cli::command_with_defaults().get_matches_from(all);
    Cli::from_arg_matches(&matches).expect("flags parse")
}

pub(super) fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub(super) fn file(text: &str) -> (tempdir::Dir, PathBuf) {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).expect("write the test file");
    (dir, path)
}

/// A scratch directory removed on drop (no crate needed for this much).
mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "mqtt-sn-config-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).expect("create a scratch directory");
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn defaults_are_valid() {
    let s = Config::default().validate_offline().expect("defaults validate");
    assert_eq!(s.udp, vec![SocketAddr::from(([0, 0, 0, 0], 10000))]);
    assert_eq!((s.broker.host.as_str(), s.broker.port), ("127.0.0.1", 1883));
    assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
    assert!(!s.publish_wills_on_shutdown);
    assert_eq!(s.stats_interval, Some(Duration::from_secs(60)));
    assert_eq!(s.engine.advertise_interval, Some(Duration::from_secs(900)));
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../../docs/gateway.example.toml");
    let s = Config::parse(text)
        .expect("example parses")
        .validate_offline()
        .expect("example validates");
    assert_eq!(s.engine.predefined.id("sensors/temp"), Some(77));
    assert_eq!(s.udp.len(), 1);
}

/// The commented configuration the Debian package installs in /etc: it validates, and
/// says what the defaults say (it only uncomments a default or two), apart from the
/// broker and the state directory the unit's StateDirectory= creates.
#[test]
fn packaged_file_validates_and_keeps_the_defaults() {
    let text = include_str!("../../../packaging/gateway.toml");
    let c = Config::parse(text).expect("packaging/gateway.toml parses");
    c.validate_offline().expect("packaging/gateway.toml validates");
    let mut expected = Config::default();
    expected.broker.url = Some("mqtt://127.0.0.1:1883".into());
    expected.state.dir = Some("/var/lib/mqtt-sn-gateway".into());
    let unit = include_str!("../../../packaging/mqtt-sn-gateway.service");
    assert!(
        unit.lines().any(|l| l == "StateDirectory=mqtt-sn-gateway"),
        "the unit creates the state directory"
    );
    assert_eq!(c, expected);
}

#[test]
fn layers_file_then_environment_then_flags() {
    let (_dir, path) = file(
        "[broker]\nurl = \"mqtt://10.0.0.1:1884\"\nusername = \"gw\"\n[predefined]\n77 = \"a/b\"\n78 = \"x/y\"\n[timers]\nmax_retries = 2\nretry_interval_secs = 3\n[udp]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n",
    );
    let path = path.to_string_lossy().into_owned();
    let flags = cli(&[
        "--config",
        &path,
        "--broker",
        "mqtt://127.0.0.1:1999",
        "--predefined",
        "77=c/d",
        "--max-retries",
        "7",
        "--udp",
        "127.0.0.1:10001",
    ]);
    let environment = env(&[
        ("MQTT_SN_TIMERS__MAX_RETRIES", "4"),
        ("MQTT_SN_TIMERS__RETRY_INTERVAL_SECS", "2.5"),
        ("MQTT_SN_BROKER__PASSWORD", "007"),
        ("UNRELATED", "x"),
    ]);
    let c = Config::load_with_env(&flags, environment).expect("loads");
    let s = c.validate_offline().expect("validates");
    assert_eq!(
        (s.broker.host.as_str(), s.broker.port),
        ("127.0.0.1", 1999),
        "flag beats file"
    );
    assert_eq!(s.engine.max_retries, 7, "flag beats environment and file");
    assert_eq!(
        s.engine.retry_interval,
        Duration::from_millis(2500),
        "environment beats file"
    );
    assert_eq!(
        s.broker.password.as_deref(),
        Some("007"),
        "a numeric password stays text"
    );
    assert_eq!(s.broker.username.as_deref(), Some("gw"));
    assert_eq!(
        s.engine.predefined.name(77).map(|n| &**n),
        Some("c/d"),
        "flag replaces one id"
    );
    assert_eq!(
        s.engine.predefined.name(78).map(|n| &**n),
        Some("x/y"),
        "and keeps the others"
    );
    assert_eq!(
        s.udp,
        vec![SocketAddr::from(([127, 0, 0, 1], 10001))],
        "a list flag replaces the list"
    );
}

#[test]
fn environment_lists_legacy_names_and_typos() {
    let c = Config::load_with_env(
        &Cli::default(),
        env(&[
            ("MQTT_SN_UDP__LISTEN", "127.0.0.1:1, 127.0.0.1:2"),
            ("MQTT_SN_BROKER_PASSWORD", "old"),
            ("MQTT_SN_BROKER__USERNAME", "u"),
            ("MQTT_SN_GATEWAY__QOS_MINUS_ONE", "false"),
        ]),
    )
    .expect("loads");
    assert_eq!(c.udp.listen.len(), 2);
    assert_eq!(c.broker.password.as_deref(), Some("old"));
    assert!(!c.gateway.qos_minus_one);
    let both = Config::load_with_env(
        &Cli::default(),
        env(&[("MQTT_SN_BROKER__PASSWORD", "new"), ("MQTT_SN_BROKER_PASSWORD", "old")]),
    )
    .expect("loads");
    assert_eq!(both.broker.password.as_deref(), Some("new"));

    let typo = Config::load_with_env(&Cli::default(), env(&[("MQTT_SN_BROKER__URLL", "x")])).unwrap_err();
    assert!(typo.mentions("urll"), "{typo}");
    let shape = Config::load_with_env(&Cli::default(), env(&[("MQTT_SN_RETRIES", "1")])).unwrap_err();
    assert!(shape.mentions("MQTT_SN_RETRIES"), "{shape}");
    let bad_number =
        Config::load_with_env(&Cli::default(), env(&[("MQTT_SN_TIMERS__MAX_RETRIES", "many")])).unwrap_err();
    assert!(bad_number.mentions("max_retries"), "{bad_number}");
}

#[test]
fn bad_files_are_clear_errors() {
    assert!(Config::parse("[broker]\nurll = 1\n").unwrap_err().mentions("urll"));
    assert!(Config::parse("[sleep]\nmax_held_messages = \"lots\"\n").is_err());
    let missing = Config::load_with_env(&cli(&["--config", "/nonexistent/gateway.toml"]), no_env()).unwrap_err();
    assert!(missing.mentions("/nonexistent/gateway.toml"), "{missing}");
    let bad_id = Config::parse("[predefined]\nx = \"a\"\n").expect("parses");
    assert!(bad_id.validate_offline().unwrap_err().mentions("predefined"));
    let bad_factor = Config::parse("[sleep]\ntolerance_factor = -1.0\n").expect("parses");
    assert!(bad_factor.validate_offline().unwrap_err().mentions("tolerance_factor"));
    assert!(parse_predefined("77").is_err());
    assert!(parse_predefined("x=a").is_err());
}

/// Issue 9, item 5: each of these ran the gateway half-configured or panicked.
#[test]
fn values_that_cannot_work_are_refused_all_at_once() {
    let c = Config::load_with_env(
        &cli(&["--retry-interval", "1e30", "--max-clients", "0"]),
        env(&[
            ("MQTT_SN_BROKER__INFLIGHT", "0"),
            ("MQTT_SN_BROKER__REQUEST_CAPACITY", "0"),
        ]),
    )
    .expect("loads");
    let errors = c.validate_offline().unwrap_err();
    for key in [
        "timers.retry_interval_secs",
        "limits.max_clients",
        "broker.inflight",
        "broker.request_capacity",
    ] {
        assert!(errors.mentions(key), "{key} missing from:\n{errors}");
    }
    assert_eq!(errors.0.len(), 4, "{errors}");

    for (text, key) in [
        ("[timers]\nretry_interval_secs = 0\n", "retry_interval_secs"),
        ("[timers]\nretry_interval_secs = nan\n", "retry_interval_secs"),
        ("[timers]\nmax_retries = 4294967295\n", "max_retries"),
        ("[timers]\nkeep_alive_factor = 0.5\n", "keep_alive_factor"),
        ("[timers]\nconnect_timeout_secs = inf\n", "connect_timeout_secs"),
        ("[sleep]\nmax_held_messages = 0\n", "max_held_messages"),
        ("[sleep]\nmax_held_bytes = 0\n", "max_held_bytes"),
        ("[sleep]\nmax_duration_secs = 70000\n", "max_duration_secs"),
        ("[limits]\nmax_topics_per_client = 0\n", "max_topics_per_client"),
        ("[broker]\nconnect_timeout_secs = 0\n", "connect_timeout_secs"),
        ("[broker]\nurl = \"ws://x\"\n", "broker.url"),
        ("[broker]\npassword = \"p\"\n", "username"),
        ("[gateway]\nshutdown_timeout_secs = -1\n", "shutdown_timeout_secs"),
        ("[udp]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n", "twice"),
        ("[udp]\nlisten = []\n", "serve nothing"),
        ("[predefined]\n1 = \"a\"\n2 = \"a\"\n", "twice"),
        ("[predefined]\n0 = \"a\"\n", "reserved"),
    ] {
        let errors = Config::parse(text).expect("parses").validate_offline().unwrap_err();
        assert!(errors.mentions(key), "{text:?}: {errors}");
    }

    let twice = Config::load_with_env(&cli(&["--predefined", "5=a", "--predefined", "5=b"]), no_env()).unwrap_err();
    assert!(twice.mentions("topic id 5 is given twice"), "{twice}");
}

#[test]
fn an_unresolvable_broker_host_is_an_error() {
    let c = Config::parse("[broker]\nurl = \"mqtt://no-such-host.invalid:1883\"\n").expect("parses");
    assert!(c.validate_offline().is_ok(), "the name is only looked up by validate");
    let errors = c.validate().unwrap_err();
    assert!(errors.mentions("no-such-host.invalid"), "{errors}");
    // The embedded broker's address is ours: nothing to resolve.
    let embedded = Config::parse("[broker]\nembedded = true\nembedded_listen = \"127.0.0.1:0\"\n").expect("parses");
    let s = embedded.validate().expect("validates");
    assert_eq!((s.broker.host.as_str(), s.broker.port), ("127.0.0.1", 0));
}

#[test]
fn help_shows_defaults() {
    let help = Cli::command_with_defaults().render_long_help().to_string();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for shown in [
        "[default: 0.0.0.0:10000]",
        "[default: 10]",
        "[default: 5]",
        "[default: 900]",
        "[default: 100000]",
        "[default: 127.0.0.1:1883]",
    ] {
        assert!(help.contains(shown), "{shown} missing from --help:\n{help}");
    }
    assert!(help.contains("--check-config") && help.contains("--print-config"));
}

#[test]
fn printed_configuration_reads_back() {
    let flags = cli(&[
        "--predefined",
        "9=p/q",
        "--serial",
        "/dev/ttyUSB0:9600:raw",
        "--username",
        "u",
    ]);
    let c = Config::load_with_env(&flags, env(&[("MQTT_SN_BROKER__PASSWORD", "secret")])).expect("loads");
    let text = c.to_toml_redacted();
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    let back = Config::parse(&text).expect("printed configuration parses");
    let mut want = c.clone();
    want.broker.password = Some("<redacted>".into());
    assert_eq!(back, want);
}

#[test]
fn serial_ports_from_the_file() {
    let c = Config::parse(
        "[[serial]]\npath = \"/dev/ttyUSB0\"\n\n[[serial]]\npath = \"/dev/ttyAMA0\"\nbaud = 9600\ndata_bits = 7\nparity = \"even\"\nstop_bits = 2\nframing = \"raw\"\n",
    )
    .expect("parses");
    let s = c.validate_offline().expect("resolves");
    assert_eq!(s.serial.len(), 2);
    assert_eq!(s.serial[0], SerialPortConfig::new("/dev/ttyUSB0"));
    assert_eq!(s.serial[0].describe(), "115200 8N1 cobs");
    assert_eq!(s.serial[1].path, PathBuf::from("/dev/ttyAMA0"));
    assert_eq!(s.serial[1].describe(), "9600 7E2 raw");

    for (bad, names) in [
        ("[[serial]]\nbaud = 9600\n", "path"),
        ("[[serial]]\npath = \"/dev/x\"\nparity = \"mark\"\n", "parity"),
        ("[[serial]]\npath = \"/dev/x\"\nstop_bits = 3\n", "stop_bits"),
        ("[[serial]]\npath = \"/dev/x\"\ndata_bits = 9\n", "data_bits"),
        ("[[serial]]\npath = \"/dev/x\"\nframing = \"slip\"\n", "framing"),
        ("[[serial]]\npath = \"/dev/x\"\nbaud = 0\n", "baud"),
        (
            "[[serial]]\npath = \"/dev/x\"\n[[serial]]\npath = \"/dev/x\"\n",
            "twice",
        ),
    ] {
        let err = Config::parse(bad).expect("parses").validate_offline().unwrap_err();
        assert!(err.mentions(names), "{bad:?}: {err}");
    }
    assert!(Config::parse("[[serial]]\npath = \"/dev/x\"\nspeed = 9600\n").is_err());
}

#[test]
fn serial_flags_replace_the_file_ports() {
    let (_dir, path) = file("[[serial]]\npath = \"/dev/ttyS0\"\n");
    let path = path.to_string_lossy().into_owned();
    let flags = cli(&[
        "--config",
        &path,
        "--serial",
        "/dev/ttyUSB0:115200",
        "--serial",
        "/dev/ttyACM0:9600:cobs",
        "--serial",
        "/dev/ttyUSB1",
        "--serial-framing",
        "raw",
    ]);
    let s = Config::load_with_env(&flags, no_env())
        .expect("loads")
        .validate_offline()
        .expect("resolves");
    let got: Vec<_> = s
        .serial
        .iter()
        .map(|p| (p.path.display().to_string(), p.describe()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/dev/ttyUSB0".to_string(), "115200 8N1 raw".to_string()),
            ("/dev/ttyACM0".to_string(), "9600 8N1 cobs".to_string()),
            ("/dev/ttyUSB1".to_string(), "115200 8N1 raw".to_string()),
        ]
    );
    for bad in ["/dev/ttyUSB0:fast", "/dev/ttyUSB0:0", ":115200", "/dev/ttyUSB0:raw"] {
        assert!(parse_serial_flag(bad).is_err(), "{bad}");
    }
    assert!(Cli::try_parse_from(["mqtt-sn-gateway", "--serial-framing", "slip"]).is_err());
}

#[test]
fn discovery_settings() {
    let c = Config::parse("[discovery]\nadvertise_interval_secs = 60\nadvertise_addr = \"255.255.255.255:10000\"\n")
        .expect("parses");
    let s = c.validate_offline().expect("resolves");
    assert_eq!(s.engine.advertise_interval, Some(Duration::from_secs(60)));
    assert_eq!(
        s.engine.udp_broadcast,
        Some(SocketAddr::from(([255, 255, 255, 255], 10000)))
    );
    let off = Config::load_with_env(&cli(&["--advertise-interval", "0"]), no_env()).expect("loads");
    assert_eq!(
        off.validate_offline().expect("resolves").engine.advertise_interval,
        None
    );

    let too_long = Config::parse("[discovery]\nadvertise_interval_secs = 70000\n").expect("parses");
    assert!(too_long.validate_offline().unwrap_err().mentions("16 bits"));
    let v6 = Config::parse("[discovery]\nadvertise_addr = \"[ff02::1]:10000\"\n").expect("parses");
    assert!(v6.validate_offline().unwrap_err().mentions("family"));
}

// ---------------------------------------------------------------------------------------
// docs/configuration.md against the struct.
// ---------------------------------------------------------------------------------------

/// A configuration with every optional key set, so that serializing it names every key.
fn every_key() -> toml::Value {
    let mut c = Config::default();
    c.broker.url = Some("mqtt://127.0.0.1:1883".into());
    c.broker.username = Some("u".into());
    c.broker.password = Some("p".into());
    c.broker.ca_file = Some("ca.pem".into());
    c.broker.client_cert = Some("cert.pem".into());
    c.broker.client_key = Some("key.pem".into());
    c.discovery.advertise_addr = Some(SocketAddr::from(([255, 255, 255, 255], 10000)));
    c.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 9100)));
    c.metrics.udp_probe_request = Some("health?".into());
    c.metrics.udp_probe_reply = Some("ok".into());
    c.serial.push(SerialConfig {
        path: Some("/dev/ttyUSB0".into()),
        ..SerialConfig::default()
    });
    c.dtls.push(DtlsConfig {
        address: Some(SocketAddr::from(([0, 0, 0, 0], 10001))),
        cert: Some("dtls.pem".into()),
        key: Some("dtls.key".into()),
        client_ca: Some("devices-ca.pem".into()),
        ..DtlsConfig::default()
    });
    c.auth = AuthSection {
        mode: Some("registry".into()),
        devices_file: Some("devices.toml".into()),
        address_change: Some("deny".into()),
        mountpoint: Some("site/%c/".into()),
    };
    c.state.dir = Some("/var/lib/mqtt-sn-gateway".into());
    toml::Value::try_from(c).expect("the configuration serializes")
}

/// The keys documented under each `### `[section]`` heading: the backticked names in the
/// first column of its table, with the default column's text.
fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
    let doc = include_str!("../../../docs/configuration.md");
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(head) = line.strip_prefix("### `[") {
            let name = head.trim_start_matches('[').split(']').next().unwrap_or_default();
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        if line.starts_with("## ") {
            current = None;
        }
        let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0].trim_end_matches('`');
        let default = cells.get(1).copied().unwrap_or_default().trim().trim_matches('`');
        if let Some(keys) = sections.get_mut(section) {
            keys.insert(key.to_string(), default.to_string());
        }
    }
    sections
}

/// Whether the text in a default column says `want`.
fn says(text: &str, want: &toml::Value) -> bool {
    if let Ok(table) = toml::from_str::<toml::Table>(&format!("v = {text}")) {
        if let Some(v) = table.get("v") {
            let number = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
            return match (number(v), number(want)) {
                (Some(a), Some(b)) => a == b,
                _ => v == want,
            };
        }
    }
    want.as_str() == Some(text.trim_matches('"'))
}

#[test]
fn docs_describe_every_key_and_its_default() {
    let docs = documented();
    let keys = every_key();
    let defaults = toml::Value::try_from(Config::default()).expect("serializes");
    let table = keys.as_table().expect("a table");
    for (section, value) in table {
        let fields = match value {
            toml::Value::Table(t) => t.clone(),
            toml::Value::Array(a) => a.first().and_then(|v| v.as_table()).cloned().unwrap_or_default(),
            _ => continue,
        };
        let doc = docs
            .get(section)
            .unwrap_or_else(|| panic!("docs/configuration.md has no ### `[{section}]` section"));
        if section == "predefined" {
            continue; // Free-form ids, described in prose.
        }
        for key in fields.keys() {
            let shown = doc
                .get(key)
                .unwrap_or_else(|| panic!("docs/configuration.md does not document {section}.{key}"));
            if let Some(default) = lookup(&defaults, &format!("{section}.{key}")) {
                assert!(
                    says(shown, default),
                    "docs/configuration.md gives {section}.{key} the default {shown:?}, the code {default}"
                );
            }
        }
        for key in doc.keys() {
            assert!(
                fields.contains_key(key),
                "docs/configuration.md documents {section}.{key}, which is not a key"
            );
        }
    }
    for section in docs.keys() {
        assert!(
            table.contains_key(section),
            "docs/configuration.md documents a section [{section}] that does not exist"
        );
    }
}

#[test]
fn docs_list_every_flag() {
    let doc = include_str!("../../../docs/configuration.md");
    for arg in Cli::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                doc.contains(&format!("`--{long}")),
                "docs/configuration.md does not list --{long}"
            );
        }
    }
}

#[test]
fn metrics_flag_environment_and_file() {
    let (_dir, path) =
        file("[metrics]\nlisten = \"127.0.0.1:9100\"\nudp_probe_request = \"hc?\"\nudp_probe_reply = \"up\"\n");
    let path = path.to_string_lossy().into_owned();
    let from_file = Config::load_with_env(&cli(&["--config", &path]), env(&[]))
        .expect("loads")
        .validate_offline()
        .expect("validates");
    assert_eq!(from_file.metrics.listen, Some(SocketAddr::from(([127, 0, 0, 1], 9100))));
    assert_eq!(from_file.metrics.udp_probe.map(|p| p.reply), Some(b"up".to_vec()));
    let flagged = Config::load_with_env(
        &cli(&["--config", &path, "--metrics", "127.0.0.1:9200"]),
        env(&[("MQTT_SN_METRICS__LISTEN", "127.0.0.1:9300")]),
    )
    .expect("loads")
    .validate_offline()
    .expect("validates");
    assert_eq!(
        flagged.metrics.listen,
        Some(SocketAddr::from(([127, 0, 0, 1], 9200))),
        "flag beats environment"
    );
    let from_env = Config::load_with_env(&cli(&[]), env(&[("MQTT_SN_METRICS__LISTEN", "127.0.0.1:9300")]))
        .expect("loads")
        .validate_offline()
        .expect("validates");
    assert_eq!(from_env.metrics.listen, Some(SocketAddr::from(([127, 0, 0, 1], 9300))));
    assert!(Cli::try_parse_from(["mqtt-sn-gateway", "--metrics", "not-an-address"]).is_err());
}

// ---------------------------------------------------------------------------------------
// [log]
// ---------------------------------------------------------------------------------------

#[test]
fn log_format_and_level_from_file_environment_and_flags() {
    let d = Config::default().validate_offline().expect("defaults validate");
    assert_eq!(
        d.log,
        LogSettings {
            format: LogFormat::Text,
            level: "info".into()
        }
    );
    let (_dir, path) = file("[log]\nformat = \"json\"\nlevel = \"warn\"\n");
    let from_file = Config::load_with_env(&cli(&["--config", path.to_str().expect("utf-8")]), no_env())
        .expect("loads")
        .validate_offline()
        .expect("validates");
    assert_eq!(from_file.log.format, LogFormat::Json);
    assert_eq!(from_file.log.level, "warn");
    let from_env = Config::load_with_env(&Cli::default(), env(&[("MQTT_SN_LOG__LEVEL", "info,gateway=debug")]))
        .expect("loads")
        .validate_offline()
        .expect("validates");
    assert_eq!(from_env.log.level, "info,gateway=debug");
    let from_flags = Config::load_with_env(
        &cli(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--log-format",
            "text",
            "--log-level",
            "debug",
        ]),
        no_env(),
    )
    .expect("loads")
    .validate_offline()
    .expect("validates");
    assert_eq!(from_flags.log.format, LogFormat::Text);
    assert_eq!(from_flags.log.level, "debug");
}

#[test]
fn bad_log_format_and_level_name_their_key() {
    let bad_format = Config::parse("[log]\nformat = \"xml\"\n").expect("parses");
    let err = bad_format.validate_offline().unwrap_err();
    assert!(err.mentions("log.format") && err.mentions("xml"), "{err}");
    for level in ["loud", "gateway=loud", "", "info,,nonsense"] {
        let bad = Config::parse(&format!("[log]\nlevel = {level:?}\n")).expect("parses");
        let err = bad.validate_offline().unwrap_err();
        assert!(err.mentions("log.level"), "{level:?}: {err}");
    }
    for level in [
        "info",
        "WARN",
        "info,gateway=debug",
        "off",
        "error,gateway::runtime=trace",
    ] {
        let ok = Config::parse(&format!("[log]\nlevel = {level:?}\n")).expect("parses");
        assert!(ok.validate_offline().is_ok(), "{level:?}");
    }
}

#[test]
fn rust_log_overrides_the_level_and_the_embedded_broker_stays_quiet() {
    let s = Config::parse("[log]\nlevel = \"warn\"\n")
        .expect("parses")
        .validate_offline()
        .expect("validates");
    let (filter, problem) = s.log.filter(None);
    assert!(problem.is_none());
    assert_eq!(filter.max_level_hint(), Some(tracing::level_filters::LevelFilter::WARN));
    let (filter, problem) = s.log.filter(Some("debug"));
    assert!(problem.is_none());
    assert_eq!(
        filter.max_level_hint(),
        Some(tracing::level_filters::LevelFilter::DEBUG)
    );
    assert!(filter.to_string().contains("rumqttd=off"), "{filter}");
    let (filter, problem) = s.log.filter(Some("gateway=nonsense"));
    assert!(problem.is_some_and(|p| p.contains("RUST_LOG")));
    assert_eq!(filter.max_level_hint(), Some(tracing::level_filters::LevelFilter::WARN));
    let (filter, _) = s.log.filter(Some(" "));
    assert_eq!(filter.max_level_hint(), Some(tracing::level_filters::LevelFilter::WARN));
}

#[test]
fn auth_modes_and_defaults() {
    use crate::auth::AddressChange;
    let (dir, _) = file("");
    let devices = dir.path().join("devices.toml");
    std::fs::write(&devices, "[[device]]\nclient_id = \"a\"\n").expect("write");
    let devices = devices.display().to_string();
    // Open by default, allowing address changes.
    let s = Config::default().validate_offline().expect("valid");
    assert!(s.engine.auth.registry.is_none());
    assert_eq!(s.engine.auth.address_change, AddressChange::Allow);
    // --devices alone selects registry mode, which denies address changes by default.
    let c = Config::load_with_env(&cli(&["--devices", &devices]), Vec::new()).expect("loads");
    let s = c.validate_offline().expect("valid");
    assert_eq!(s.engine.auth.registry.as_ref().map(|r| r.len()), Some(1));
    assert_eq!(s.engine.auth.address_change, AddressChange::Deny);
    let c = Config::load_with_env(
        &cli(&[
            "--devices",
            &devices,
            "--address-change",
            "allow",
            "--mountpoint",
            "m/%c/",
        ]),
        Vec::new(),
    )
    .expect("loads");
    let s = c.validate_offline().expect("valid");
    assert_eq!(s.engine.auth.address_change, AddressChange::Allow);
    assert_eq!(s.engine.auth.mountpoint.as_deref(), Some("m/%c/"));
}

#[test]
fn auth_errors_name_the_key() {
    let (dir, _) = file("");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[device]]\nclient_id = \"a\"\npublish = [\"a/#/b\"]\n").expect("write");
    let check = |text: &str, needle: &str| {
        let e = Config::parse(text)
            .expect("parses")
            .validate_offline()
            .expect_err("invalid");
        assert!(e.mentions(needle), "{needle:?} not in {e}");
    };
    check("[auth]\nmode = \"registry\"\n", "auth.devices_file is required");
    check("[auth]\nmode = \"closed\"\n", "auth.mode must be");
    check(
        "[auth]\naddress_change = \"sometimes\"\n",
        "auth.address_change must be",
    );
    check("[auth]\nmountpoint = \"a/#\"\n", "auth.mountpoint:");
    check("[auth]\nmountpoint = \"a/%x/\"\n", "auth.mountpoint:");
    check(
        &format!(
            "[auth]\nmode = \"open\"\ndevices_file = {:?}\n",
            bad.display().to_string()
        ),
        "auth.mode is \"open\" but auth.devices_file is set",
    );
    check(
        &format!("[auth]\ndevices_file = {:?}\n", bad.display().to_string()),
        "[[device]] #1 (client_id \"a\"): publish: \"a/#/b\"",
    );
    check(
        "[auth]\ndevices_file = \"/nonexistent/devices.toml\"\n",
        "auth.devices_file: /nonexistent/devices.toml: cannot read",
    );
}

#[test]
fn state_keys_from_flags_and_their_errors() {
    let c = Config::load_with_env(&cli(&["--state-dir", "/tmp/gw-state", "--state-recover"]), env(&[])).unwrap();
    let s = c.validate_offline().unwrap();
    assert_eq!(s.state.dir.as_deref(), Some(std::path::Path::new("/tmp/gw-state")));
    assert!(s.state.recover);
    assert_eq!(
        Settings::default().state,
        StateSettings::default(),
        "none by default: in memory"
    );

    let e = Config::parse("[state]\nrecover = true\n")
        .unwrap()
        .validate_offline()
        .unwrap_err();
    assert!(e.mentions("state.recover needs state.dir"), "{e}");
    let file = std::env::temp_dir().join(format!("gw-state-file-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let e = Config::parse(&format!("[state]\ndir = {:?}\n", file.display().to_string()))
        .unwrap()
        .validate_offline()
        .unwrap_err();
    let _ = std::fs::remove_file(&file);
    assert!(e.mentions("state.dir") && e.mentions("is not a directory"), "{e}");
}

#[test]
fn broker_source_addresses_from_flags_file_and_environment() {
    let c = Config::load_with_env(
        &cli(&[
            "--broker-source-address",
            "127.0.0.2",
            "--broker-source-address",
            "127.0.0.3",
        ]),
        env(&[]),
    )
    .expect("loads");
    let s = c.validate_offline().expect("validates");
    assert_eq!(
        s.broker.source_addresses,
        [
            "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
            "127.0.0.3".parse().unwrap()
        ]
    );
    let c = Config::load_with_env(
        &Cli::default(),
        env(&[("MQTT_SN_BROKER__SOURCE_ADDRESSES", "127.0.0.4, 127.0.0.5")]),
    )
    .expect("loads");
    assert_eq!(
        c.validate_offline().expect("validates").broker.source_addresses.len(),
        2
    );
    assert!(Config::default()
        .validate_offline()
        .expect("defaults validate")
        .broker
        .source_addresses
        .is_empty());

    for (text, wants) in [
        (
            "[broker]\nsource_addresses = [\"127.0.0.2\", \"127.0.0.2\"]\n",
            "given twice",
        ),
        ("[broker]\nsource_addresses = [\"0.0.0.0\"]\n", "not a unicast address"),
        (
            "[broker]\nsource_addresses = [\"224.0.0.1\"]\n",
            "not a unicast address",
        ),
        (
            "[broker]\nurl = \"mqtt://127.0.0.1:1883\"\nsource_addresses = [\"::1\"]\n",
            "another address family",
        ),
    ] {
        let errors = Config::parse(text).expect("parses").validate_offline().unwrap_err();
        assert!(errors.mentions("broker.source_addresses"), "{text}: {errors}");
        assert!(errors.to_string().contains(wants), "{text}: {errors}");
    }
    assert!(Config::parse("[broker]\nsource_addresses = [\"not-an-ip\"]\n").is_err());
}
