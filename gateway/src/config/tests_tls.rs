//! The `[broker]` TLS keys: layering, checks, and the files read at validation.

use super::*;

use clap::FromArgMatches;

fn testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/broker/testdata")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["mqtt-sn-gateway"];
    all.extend_from_slice(args);
    let matches = Cli::command_with_defaults().get_matches_from(all);
    Cli::from_arg_matches(&matches).expect("flags parse")
}

fn errors(c: &Config) -> ConfigErrors {
    c.validate_offline().expect_err("invalid")
}

#[test]
fn flags_give_an_mqtts_broker_its_files() {
    let (ca, cert, key) = (testdata("ca.pem"), testdata("client.pem"), testdata("client.key"));
    let c = cli(&[
        "--broker",
        "mqtts://127.0.0.1",
        "--broker-ca",
        &ca,
        "--broker-cert",
        &cert,
        "--broker-key",
        &key,
    ]);
    let s = Config::load_with_env(&c, Vec::new())
        .expect("loads")
        .validate_offline()
        .expect("valid");
    assert_eq!((s.broker.host.as_str(), s.broker.port), ("127.0.0.1", 8883));
    let tls = s.broker.tls.clone().expect("TLS on");
    assert_eq!(tls.files().ca_file.as_deref(), Some(Path::new(&ca)));
    assert_eq!(tls.files().client_key.as_deref(), Some(Path::new(&key)));
    assert_eq!(s.broker.url().as_str(), "mqtts://127.0.0.1:8883");
}

#[test]
fn the_environment_and_the_file_set_them_too() {
    let ca = testdata("ca.pem");
    let env = vec![
        (
            "MQTT_SN_BROKER__URL".to_string(),
            "mqtts://broker.example:18883".to_string(),
        ),
        ("MQTT_SN_BROKER__CA_FILE".to_string(), ca.clone()),
    ];
    let s = Config::load_with_env(&Cli::default(), env)
        .expect("loads")
        .validate_offline()
        .expect("valid");
    let tls = s.broker.tls.clone().expect("TLS on");
    assert_eq!(tls.files().ca_file.as_deref(), Some(Path::new(&ca)));
    assert_eq!(s.broker.port, 18883);

    let c = Config::parse(&format!("[broker]\nurl = \"mqtts://[::1]\"\nca_file = {ca:?}\n")).expect("parses");
    let s = c.validate_offline().expect("valid");
    assert_eq!((s.broker.host.as_str(), s.broker.port), ("::1", 8883));
    assert_eq!(s.broker.url().as_str(), "mqtts://[::1]:8883");
}

#[test]
fn plain_urls_have_no_tls() {
    let s = Config::parse("[broker]\nurl = \"mqtt://127.0.0.1:1884\"\n")
        .expect("parses")
        .validate_offline()
        .expect("valid");
    assert!(s.broker.tls.is_none());
}

#[test]
fn tls_keys_without_mqtts_are_an_error() {
    let c = Config::parse(&format!(
        "[broker]\nurl = \"mqtt://127.0.0.1\"\nca_file = {:?}\nclient_cert = \"c.pem\"\n",
        testdata("ca.pem")
    ))
    .expect("parses");
    let e = errors(&c);
    assert!(
        e.mentions("broker.ca_file, broker.client_cert set, but the broker URL is not mqtts:// (TLS)"),
        "{e}"
    );
    // Without a URL (the default broker, plain TCP) as well.
    let mut c = Config::default();
    c.broker.ca_file = Some(testdata("ca.pem").into());
    assert!(errors(&c).mentions("not mqtts://"));
}

#[test]
fn bad_files_name_their_key_and_file_with_the_other_errors() {
    let mut c =
        Config::parse("[broker]\nurl = \"mqtts://127.0.0.1\"\nca_file = \"/nonexistent/ca.pem\"\n").expect("parses");
    c.broker.inflight = 0;
    let e = errors(&c);
    assert!(e.mentions("broker.ca_file: cannot read /nonexistent/ca.pem"), "{e}");
    assert!(e.mentions("broker.inflight"), "{e}");

    let c = Config::parse(&format!(
        "[broker]\nurl = \"mqtts://127.0.0.1\"\nca_file = {:?}\nclient_cert = {:?}\n",
        testdata("ca.pem"),
        testdata("client.pem")
    ))
    .expect("parses");
    assert!(
        errors(&c).mentions("broker.client_key is not set, but broker.client_cert is"),
        "{}",
        errors(&c)
    );

    let c = Config::parse(&format!(
        "[broker]\nurl = \"mqtts://127.0.0.1\"\nca_file = {:?}\n",
        testdata("README.md")
    ))
    .expect("parses");
    let e = errors(&c);
    assert!(
        e.mentions("broker.ca_file: ") && e.mentions("README.md: no PEM certificate"),
        "{e}"
    );
}

#[test]
fn a_host_that_cannot_be_a_server_name_is_an_error() {
    let c = Config::parse(&format!(
        "[broker]\nurl = \"mqtts://bad_host!\"\nca_file = {:?}\n",
        testdata("ca.pem")
    ))
    .expect("parses");
    let e = errors(&c);
    assert!(e.mentions("broker.url: \"bad_host!\" is neither a DNS name"), "{e}");
}
