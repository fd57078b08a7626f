//! The simulator's tools over DTLS 1.2 with a pre-shared key, against the real gateway's
//! DTLS listener (in-process) and a real mosquitto: `pub --psk-identity --psk` gets its
//! QoS 1 message to the broker; a wrong key gets no session and a clear error.

use std::net::SocketAddr;
use std::time::Duration;

use device_sim::dtls::{Credentials, Psk};
use device_sim::fleet::{self, FleetOptions};
use device_sim::keys::{FleetKeys, NamePattern};
use device_sim::scenario::{Group, Scenario};
use device_sim::tools::{self, Common, PubArgs, TopicArg};
use device_sim::verifier::BrokerUrl;
use e2e::{Harness, Mosquitto};
use sn_codec::QoS;

const DEVICES: &str = r##"
[[device]]
client_id = "sim-dtls-7"
psk_identity = "id-7"
psk = "00112233445566778899aabbccddeeff"
publish = ["sim-dtls/#"]

# Every fleet device under one identity.
[[device]]
client_id = "sim-*"
psk_identity = "fleet"
psk = "0f0e0d0c0b0a09080706050403020100"
publish = ["simdtls/#"]
"##;

async fn start() -> Option<Harness> {
    Harness::start_dtls(Some(Mosquitto::start()?), DEVICES).await
}

fn common(gateway: SocketAddr, psk: Option<Psk>) -> Common {
    Common {
        gateway,
        client_id: "sim-dtls-7".into(),
        keep_alive: 30,
        timeout: Duration::from_secs(5),
        t_retry_ms: 1_000,
        n_retry: 3,
        dtls: psk.map(Credentials::Psk),
    }
}

fn publish(common: Common, message: &[u8]) -> PubArgs {
    PubArgs {
        common,
        topic: TopicArg::Name("sim-dtls/up".into()),
        message: message.to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_over_dtls_reaches_the_broker_and_a_wrong_key_does_not() {
    let Some(h) = start().await else { return };
    let dtls = *h.dtls.first().expect("a DTLS listener");
    let mut watch = h.observe("sim-dtls/#").await;

    let right = Psk::from_hex("id-7", "00112233445566778899aabbccddeeff").expect("valid");
    tools::publish(&publish(common(dtls, Some(right)), b"over dtls"))
        .await
        .expect("published over DTLS");
    watch.expect_msg_eq("sim-dtls/up", b"over dtls").await;
    h.wait_stats("a DTLS handshake counted", |s| s.dtls.handshakes_ok >= 1)
        .await;

    let wrong = Psk::from_hex("id-7", "ffeeddccbbaa99887766554433221100").expect("valid");
    let err = tools::publish(&publish(common(dtls, Some(wrong)), b"never"))
        .await
        .expect_err("a wrong key gets no session");
    assert!(err.to_string().contains("DTLS"), "{err}");
    h.wait_stats("the failed handshake counted", |s| s.dtls.handshakes_failed >= 1)
        .await;

    // Plain MQTT-SN to the DTLS port is never answered.
    let err = tools::publish(&publish(common(dtls, None), b"plain"))
        .await
        .expect_err("plain UDP to a DTLS listener");
    assert!(err.to_string().contains("answer"), "{err}");
    h.wait_stats("the plain datagrams dropped", |s| s.dtls.plaintext_dropped >= 1)
        .await;
    watch.expect_none().await;
    h.shutdown().await;
}

/// A fleet of `count` devices in group `group` through the harness's DTLS listener, for
/// `secs` seconds (and as long to drain), every device with `psk`.
fn fleet_over(h: &Harness, group: &str, count: usize, secs: u64, psk: Psk) -> FleetOptions {
    FleetOptions {
        gateway: *h.dtls.first().expect("a DTLS listener"),
        broker: BrokerUrl {
            host: h.broker.ip().to_string(),
            port: h.broker.port(),
            tls: None,
        },
        scenario: Scenario {
            groups: vec![Group {
                name: group.into(),
                count,
                ..Group::default()
            }],
            ..Scenario::default()
        },
        duration: Duration::from_secs(secs),
        seed: 3,
        drain: Duration::from_secs(secs),
        topic_prefix: "simdtls".into(),
        progress: false,
        echo: false,
        gateway_metrics: None,
        client_id: None,
        dtls: Some(FleetKeys::One(psk)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_dtls_keeps_its_guarantees() {
    let Some(h) = start().await else { return };
    let key = Psk::from_hex("fleet", "0f0e0d0c0b0a09080706050403020100").expect("valid");
    let report = fleet::run(fleet_over(&h, "d", 10, 3, key))
        .await
        .expect("the fleet runs");
    println!("{}", report.table());
    let t = &report.total.counts;
    assert!(report.ok(), "broken guarantees: {:#?}", report.violations);
    assert_eq!((t.devices, t.connected, t.dtls_failed), (10, 10, 0));
    assert!(t.published > 0 && t.arrived > 0, "{t:?}");
    let s = h
        .wait_stats("ten DTLS handshakes", |s| s.dtls.handshakes_ok >= 10)
        .await;
    assert_eq!(s.metrics.connects_refused, 0);

    // The wrong key: every device fails its handshake, counted as such.
    let wrong = Psk::from_hex("fleet", "ffff").expect("valid");
    let report = fleet::run(fleet_over(&h, "bad", 3, 1, wrong))
        .await
        .expect("the fleet runs");
    let t = &report.total.counts;
    assert_eq!((t.devices, t.connected, t.dtls_failed, t.socket_errors), (3, 0, 3, 0));
    h.shutdown().await;
}

/// A temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("device-sim-dtls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `mqtt-sn-sim` with `args`.
async fn sim(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-sn-sim"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
    })
    .await
    .expect("the thread")
    .expect("mqtt-sn-sim runs")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The fleet secret of the derived-key tests.
const SECRET: &str = "the fleet secret";

/// `mqtt-sn-sim registry` for `devices` devices `dk-%n` with identities `key-%n` and keys
/// derived from [`SECRET`], into `dir/devices.toml`; returns its text.
async fn write_registry(dir: &TempDir, devices: usize) -> String {
    let path = dir.path("devices.toml");
    let out = sim(strings(&[
        "registry",
        "--devices",
        &devices.to_string(),
        "--client-id",
        "dk-%n",
        "--psk-identity",
        "key-%n",
        "--psk-derive",
        SECRET,
        "--dtls-only",
        "--publish",
        "simdtls/#",
        "-o",
        &path.display().to_string(),
    ]))
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The gateway takes it as it is: one entry per device, every identity its own.
    let registry = gateway::auth::Registry::load(&path).expect("the gateway accepts the registry");
    assert_eq!(registry.len(), devices);
    let entry = registry.lookup("dk-7").expect("an entry for dk-7");
    assert!(entry.dtls_only && entry.binds_dtls("dk-7", "key-7"));
    std::fs::read_to_string(&path).expect("the registry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_derived_keys_handshakes_with_a_registry_the_simulator_wrote() {
    let Some(mosquitto) = Mosquitto::start() else { return };
    let dir = TempDir::new("derived");
    let text = write_registry(&dir, 50).await;
    let h = Harness::start_dtls(Some(mosquitto), &text)
        .await
        .expect("the gateway starts");
    let derived = |secret: &str| FleetKeys::Derived {
        identity: NamePattern::parse("key-%n", "--psk-identity").expect("valid"),
        secret: secret.as_bytes().to_vec(),
    };
    let mut opts = fleet_over(&h, "derived", 50, 3, Psk::from_hex("unused", "00").expect("valid"));
    opts.client_id = Some(NamePattern::parse("dk-%n", "--client-id").expect("valid"));
    opts.dtls = Some(derived(SECRET));
    let report = fleet::run(opts.clone()).await.expect("the fleet runs");
    println!("{}", report.table());
    let t = &report.total.counts;
    assert!(report.ok(), "broken guarantees: {:#?}", report.violations);
    assert_eq!((t.devices, t.connected, t.dtls_failed, t.socket_errors), (50, 50, 0, 0));
    assert!(t.published > 0 && t.arrived == t.published, "{t:?}");
    let s = h.stats();
    assert_eq!(
        (
            s.dtls.handshakes_ok,
            s.dtls.handshakes_failed,
            s.metrics.connects_refused
        ),
        (50, 0, 0),
        "one handshake per device, each with its own key"
    );

    // Two devices whose keys come from another secret: their handshakes fail, counted
    // in the report, and nothing else happens.
    opts.scenario.groups[0].count = 2;
    opts.dtls = Some(derived("another secret"));
    let report = fleet::run(opts.clone()).await.expect("the fleet runs");
    let t = &report.total.counts;
    assert_eq!((t.devices, t.connected, t.dtls_failed, t.socket_errors), (2, 0, 2, 0));
    let s = h
        .wait_stats("the failed handshakes counted", |s| s.dtls.handshakes_failed >= 2)
        .await;
    assert_eq!(s.dtls.handshakes_ok, 50);

    // The right keys under client ids the registry does not know: the handshakes
    // succeed, every CONNECT is refused, and the devices end their DTLS sessions when
    // the run ends (the gateway holds none until its idle timeout).
    opts.client_id = Some(NamePattern::parse("stranger-%n", "--client-id").expect("valid"));
    opts.dtls = Some(derived(SECRET));
    let report = fleet::run(opts).await.expect("the fleet runs");
    let t = &report.total.counts;
    assert_eq!((t.devices, t.connected, t.dtls_failed), (2, 0, 0));
    let s = h
        .wait_stats("the refused devices' sessions closed", |s| {
            s.dtls.handshakes_ok == 52 && s.dtls.sessions == 0
        })
        .await;
    assert!(s.metrics.connects_refused >= 2, "{:?}", s.metrics.connects_refused);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_spread_over_workers_reads_its_keys_from_the_registry() {
    let Some(mosquitto) = Mosquitto::start() else { return };
    let dir = TempDir::new("workers");
    let text = write_registry(&dir, 20).await;
    let h = Harness::start_dtls(Some(mosquitto), &text)
        .await
        .expect("the gateway starts");
    let registry = dir.path("devices.toml").display().to_string();
    let json = dir.path("report.json").display().to_string();
    let run = |devices: &str| {
        strings(&[
            "run",
            "-Q",
            "--gateway",
            &h.dtls[0].to_string(),
            "--broker",
            &format!("mqtt://{}", h.broker),
            "--scenario",
            &dir.path("scenario.toml").display().to_string(),
            "--devices",
            devices,
            "--workers",
            "2",
            "--client-id",
            "dk-%n",
            "--report",
            &json,
        ])
    };
    // The keys come from the scenario's [run] (the registry relative to the scenario).
    std::fs::write(
        dir.path("scenario.toml"),
        "[run]\nduration = \"2s\"\ndrain = \"2s\"\ntopic_prefix = \"simdtls\"\npsk_registry = \"devices.toml\"\n\n\
         [[group]]\nname = \"w\"\ncount = 20\npublish_interval = \"500ms\"\nramp = \"500ms\"\n",
    )
    .expect("scenario");
    let out = sim(run("20")).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the report")).expect("JSON");
    let total = |k: &str| v["total"]["counts"][k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        (total("devices"), total("connected"), total("dtls_failed")),
        (20, 20, 0),
        "{v}"
    );
    assert_eq!(h.stats().dtls.handshakes_ok, 20);

    // A device the registry does not know: refused before anything starts, named.
    std::fs::remove_file(&json).expect("removed");
    let mut args = run("21");
    args.extend(strings(&["--psk-registry", &registry]));
    let out = sim(args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("\"dk-20\"") && err.contains("devices.toml"), "{err}");
    assert!(!std::path::Path::new(&json).exists(), "no run, no report");
    assert_eq!(h.stats().dtls.handshakes_ok, 20, "no device started");
    h.shutdown().await;
}

/// In `dir`: CAs `ca` and `other-ca` (P-256, self-signed), and `NAME.pem` / `NAME.key`
/// signed by `ca` for each of `certs` (NAME, CN, extensions).
fn make_pki(dir: &TempDir, certs: &[(&str, &str, &str)]) {
    let openssl = e2e::tls::Openssl::find().expect("openssl");
    for ca in ["ca", "other-ca"] {
        openssl.ca(&dir.0, ca);
    }
    for (name, cn, ext) in certs {
        openssl.leaf(&dir.0, name, cn, "ca", "3", ext);
    }
}

const CERT_DEVICES: &str = r##"
[[device]]
client_id = "cert-7"
cert_identity = "dev-7"
publish = ["simcert/#"]

[[device]]
client_id = "cert-8"
cert_identity = "dev-8"
subscribe = ["simcert/#"]
"##;

/// A device's certificate `name` of the PKI in `dir`, checking the gateway's against
/// `ca` for the name 127.0.0.1.
fn cert_credentials(dir: &TempDir, name: &str, ca: &str) -> Result<Credentials, String> {
    device_sim::dtls::CertAuth::load(
        &dir.path(&format!("{name}.pem")),
        &dir.path(&format!("{name}.key")),
        Some(&dir.path(&format!("{ca}.pem"))),
        "127.0.0.1",
    )
    .map(|a| Credentials::Certificate(std::sync::Arc::new(a)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_with_certificates_reach_mosquitto_and_check_the_gateways_certificate() {
    if !e2e::openssl::have_openssl() {
        return;
    }
    let Some(mosquitto) = Mosquitto::start() else { return };
    let dir = TempDir::new("cert");
    let client = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n";
    make_pki(
        &dir,
        &[
            (
                "server",
                "gateway",
                "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n\
                 subjectAltName = IP:127.0.0.1, DNS:gateway.test\n",
            ),
            ("dev-7", "dev-7", client),
            ("dev-8", "dev-8", client),
        ],
    );
    // The gateway reads its listener's certificates and the registry as at start.
    std::fs::write(dir.path("devices.toml"), CERT_DEVICES).expect("registry");
    let text = format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:1883\"\n[udp]\nlisten = []\n[auth]\ndevices_file = {:?}\n\n\
         [[dtls]]\naddress = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        dir.path("devices.toml").display().to_string(),
        dir.path("server.pem").display().to_string(),
        dir.path("server.key").display().to_string(),
        dir.path("ca.pem").display().to_string(),
    );
    let settings = gateway::config::Config::parse(&text)
        .expect("the configuration parses")
        .validate_offline()
        .expect("the configuration validates");
    let listener = settings.dtls[0].clone();
    let registry = settings.engine.auth.registry.clone().expect("registry mode");
    let h = Harness::start_custom(Some(mosquitto), move |s| {
        s.engine.auth = gateway::auth::AuthConfig {
            registry: Some(registry),
            ..gateway::auth::AuthConfig::default()
        };
        s.dtls = vec![listener];
    })
    .await
    .expect("the gateway starts");
    let dtls = h.dtls[0];
    let mut watch = h.observe("simcert/#").await;
    let tool = |client_id: &str, credentials: Credentials| Common {
        client_id: client_id.into(),
        dtls: Some(credentials),
        ..common(dtls, None)
    };

    // cert-8 subscribes over DTLS with its certificate; once subscribed, cert-7
    // publishes with its own; the message reaches mosquitto and cert-8.
    let sub = tools::SubArgs {
        common: tool("cert-8", cert_credentials(&dir, "dev-8", "ca").expect("dev-8")),
        topic: TopicArg::Name("simcert/t".into()),
        qos: QoS::AtLeastOnce,
        count: Some(1),
        wait: Some(Duration::from_secs(30)),
        verbose: true,
    };
    let (subscribed, on_sub) = tokio::sync::oneshot::channel();
    let subscriber = tokio::spawn(async move {
        let mut out = Vec::new();
        let r = tools::subscribe_then(&sub, &mut out, move || {
            let _ = subscribed.send(());
        })
        .await;
        (r, out)
    });
    tokio::time::timeout(Duration::from_secs(20), on_sub)
        .await
        .expect("subscribed in time")
        .expect("the subscriber runs");
    let mut publish_args = publish(
        tool("cert-7", cert_credentials(&dir, "dev-7", "ca").expect("dev-7")),
        b"signed",
    );
    publish_args.topic = TopicArg::Name("simcert/t".into());
    tools::publish(&publish_args).await.expect("pub with a certificate");
    watch.expect_msg_eq("simcert/t", b"signed").await;
    let (r, out) = subscriber.await.expect("the subscriber's task");
    assert_eq!(r.expect("sub with a certificate"), 1);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "simcert/t signed");
    let s = h
        .wait_stats("two certificate handshakes", |s| s.dtls.handshakes_ok >= 2)
        .await;
    assert_eq!((s.dtls.handshakes_ok, s.dtls.certs_rejected), (2, 0));

    // The gateway's certificate checked against another CA, or for another name: the
    // tool refuses it and says why.
    let stranger = cert_credentials(&dir, "dev-7", "other-ca").expect("loads");
    let err = tools::publish(&publish(tool("cert-7", stranger), b"never"))
        .await
        .expect_err("a gateway certificate from an unknown CA");
    assert!(err.to_string().contains("not trusted"), "{err}");
    let wrong_name = device_sim::dtls::CertAuth::load(
        &dir.path("dev-7.pem"),
        &dir.path("dev-7.key"),
        Some(&dir.path("ca.pem")),
        "other.test",
    )
    .expect("loads");
    let err = tools::publish(&publish(
        tool("cert-7", Credentials::Certificate(std::sync::Arc::new(wrong_name))),
        b"never",
    ))
    .await
    .expect_err("a gateway certificate for another name");
    assert!(err.to_string().contains("not trusted"), "{err}");
    // A key that is not a key: a clear error before any handshake.
    let err = device_sim::dtls::CertAuth::load(
        &dir.path("dev-7.pem"),
        &dir.path("ca.pem"),
        Some(&dir.path("ca.pem")),
        "127.0.0.1",
    )
    .expect_err("a certificate given as the key");
    assert!(err.starts_with("--key:"), "{err}");

    // The command line: the gateway's certificate must name the host of --gateway.
    let path = |f: &str| dir.path(f).display().to_string();
    let out = sim(strings(&[
        "pub",
        "--gateway",
        &dtls.to_string(),
        "-i",
        "cert-7",
        "--cert",
        &path("dev-7.pem"),
        "--key",
        &path("dev-7.key"),
        "--ca",
        &path("ca.pem"),
        "-t",
        "simcert/cli",
        "-m",
        "from the command line",
        "-q",
        "1",
    ]))
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    watch.expect_msg_eq("simcert/cli", b"from the command line").await;
    let out = sim(strings(&[
        "pub",
        "--gateway",
        &dtls.to_string(),
        "-i",
        "cert-7",
        "--cert",
        &path("dev-7.pem"),
        "--key",
        &path("dev-7.key"),
        "--ca",
        &path("ca.pem"),
        "--server-name",
        "elsewhere.test",
        "-t",
        "simcert/cli",
        "-m",
        "never",
        "-q",
        "1",
    ]))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not trusted"), "{err}");
    h.shutdown().await;
}
