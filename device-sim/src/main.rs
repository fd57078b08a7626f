//! `mqtt-sn-sim`: simulated MQTT-SN devices (fleets, and one-shot pub/sub tools).

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use device_sim::conformance;
use device_sim::dtls::{CertAuth, Credentials};
use device_sim::fleet::{self, FleetOptions};
use device_sim::gateway_metrics::MetricsUrl;
use device_sim::keys::{KeyOptions, NamePattern, RegistrySpec};
use device_sim::scenario::{parse_duration, Scenario};
use device_sim::tools::{self, Common, PubArgs, SubArgs, TopicArg};
use device_sim::verifier::BrokerUrl;
use sn_codec::QoS;

#[derive(Debug, Parser)]
#[command(
    name = "mqtt-sn-sim",
    version,
    about = "Simulated MQTT-SN v1.2 devices: fleets of sleepy sensors over a lossy radio, and pub/sub tools",
    after_help = "Examples:\n  mqtt-sn-sim pub --gateway 127.0.0.1:10000 -t sensors/t1 -m 21.5 -q 1\n  mqtt-sn-sim sub --gateway 127.0.0.1:10000 -t 'sensors/#' -q 1 -v -C 10\n  mqtt-sn-sim run --gateway 127.0.0.1:10000 --broker mqtt://127.0.0.1:1883 --devices 1000 --duration 60s\n\nLogging: RUST_LOG=debug. Documentation: docs/simulator.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one message (like mosquitto_pub).
    Pub(PubCmd),
    /// Subscribe and print messages (like mosquitto_sub).
    Sub(SubCmd),
    /// Run a fleet of simulated devices and report what reached the broker.
    Run(RunCmd),
    /// Run protocol conformance checks against a gateway (any MQTT-SN gateway).
    Conformance(ConformanceCmd),
    /// Write a gateway device registry for a fleet with derived keys (as `run
    /// --client-id --psk-identity --psk-derive` computes them).
    Registry(RegistryCmd),
}

#[derive(Debug, Args)]
struct ConformanceCmd {
    /// The gateway's UDP address, HOST:PORT.
    #[arg(long, short = 'g', value_name = "ADDR", default_value = "127.0.0.1:10000")]
    gateway: String,
    /// The broker the gateway uses, mqtt://HOST:PORT (or mqtts://HOST:PORT for TLS).
    /// Without it, the checks that verify at the broker are skipped (and say so).
    #[arg(long, short = 'b', value_name = "URL")]
    broker: Option<String>,
    /// With mqtts://: PEM file of the CA(s) the broker's certificate must chain to [default: the system's trusted roots].
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// A predefined topic the gateway is configured with, ID=TOPIC.
    #[arg(long, value_name = "ID=TOPIC")]
    predefined: Option<String>,
    /// Where the gateway hears SEARCHGW by broadcast or multicast, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    discovery_addr: Option<String>,
    /// How long to wait for each expected answer.
    #[arg(long, value_parser = parse_dur, default_value = "5s")]
    timeout: Duration,
    /// The gateway's retransmission interval (Tretry): how long the retransmission check
    /// waits, beyond --timeout, for a PUBLISH to be sent again.
    #[arg(long, value_parser = parse_dur, default_value = "15s")]
    gateway_retry: Duration,
    /// The largest datagram the gateway accepts, in octets (the large-payload check).
    #[arg(long, default_value_t = conformance::DEFAULT_MAX_DATAGRAM)]
    max_datagram: usize,
    /// Run only this check (repeatable; exact names, see --list).
    #[arg(long, value_name = "CHECK")]
    only: Vec<String>,
    /// Do not run this check (repeatable); it is reported as skipped.
    #[arg(long, value_name = "CHECK")]
    skip: Vec<String>,
    /// The gateway is known not to support this check's feature (repeatable): a failure
    /// is reported as not supported.
    #[arg(long, value_name = "CHECK")]
    expect_unsupported: Vec<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// List the checks (name, specification section, needs) and exit.
    #[arg(long)]
    list: bool,
}

async fn run_conformance(cmd: ConformanceCmd) -> anyhow::Result<ExitCode> {
    let select = conformance::Selection {
        only: cmd.only,
        skip: cmd.skip,
        expect_unsupported: cmd.expect_unsupported,
    };
    select.validate()?;
    if cmd.list {
        print!("{}", conformance::list());
        return Ok(ExitCode::SUCCESS);
    }
    let predefined = match &cmd.predefined {
        Some(p) => {
            let (id, name) = p
                .split_once('=')
                .with_context(|| format!("--predefined {p:?}: expected ID=TOPIC"))?;
            let id = id
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|id| *id != 0 && *id != 0xFFFF)
                .with_context(|| format!("--predefined {p:?}: the id is 1 to 65534"))?;
            if name.is_empty() {
                bail!("--predefined {p:?}: no topic name");
            }
            Some((id, name.to_string()))
        }
        None => None,
    };
    let broker = match &cmd.broker {
        Some(b) => Some(BrokerUrl::parse_with_ca(b, cmd.broker_ca.as_deref()).map_err(anyhow::Error::msg)?),
        None => {
            if cmd.broker_ca.is_some() {
                anyhow::bail!("--broker-ca needs --broker mqtts://HOST:PORT");
            }
            None
        }
    };
    let discovery = match &cmd.discovery_addr {
        Some(a) => Some(resolve(a)?),
        None => None,
    };
    let reports = conformance::run(conformance::ConformanceOptions {
        gateway: resolve(&cmd.gateway)?,
        broker,
        predefined,
        discovery,
        timeout: cmd.timeout,
        gateway_retry: cmd.gateway_retry,
        max_datagram: cmd.max_datagram,
        select,
    })
    .await?;
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", conformance::table(&reports));
    }
    let failed = reports.iter().any(|r| r.outcome == conformance::Outcome::Fail);
    Ok(if failed { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn check_writable(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(());
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {}: {} is not a directory", path.display(), dir.display());
    }
    Ok(())
}

fn parse_metrics_url(s: &str) -> Result<MetricsUrl, String> {
    s.parse()
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn parse_qos(s: &str) -> Result<QoS, String> {
    match s {
        "-1" => Ok(QoS::MinusOne),
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err(format!("{s:?}: QoS is -1, 0, 1 or 2")),
    }
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("{addr:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// The gateway's UDP address, HOST:PORT.
    #[arg(long, short = 'g', value_name = "ADDR", default_value = "127.0.0.1:10000")]
    gateway: String,
    /// Client id (default: mqtt-sn-sim-PID).
    #[arg(short = 'i', long = "id", value_name = "ID")]
    client_id: Option<String>,
    /// Keep-alive in seconds.
    #[arg(short = 'k', long, default_value_t = 60)]
    keep_alive: u16,
    /// How long to wait for each answer from the gateway (e.g. 10s).
    #[arg(long, value_parser = parse_dur, default_value = "10s")]
    timeout: Duration,
    /// Tretry: time before a request is sent again.
    #[arg(long, value_parser = parse_dur, default_value = "2s")]
    retry: Duration,
    /// Nretry: retransmissions before giving up.
    #[arg(long, default_value_t = 4)]
    retries: u8,
    /// Topic name (registered; wildcards allowed for sub).
    #[arg(short = 't', long, value_name = "TOPIC")]
    topic: Option<String>,
    /// Predefined topic id instead of a name.
    #[arg(short = 'p', long, value_name = "ID")]
    predefined: Option<u16>,
    /// Two-character short topic name instead of a name.
    #[arg(long, value_name = "XY")]
    short: Option<String>,
    /// DTLS 1.2 with a pre-shared key (the gateway's `--dtls` listener): the PSK identity.
    #[arg(long, value_name = "ID", requires = "psk", conflicts_with = "cert")]
    psk_identity: Option<String>,
    /// The pre-shared key, in hex.
    #[arg(long, value_name = "HEX", requires = "psk_identity")]
    psk: Option<String>,
    /// DTLS 1.2 with a client certificate instead (ECDSA P-256 or P-384, PEM; the first
    /// certificate of the file is the device's).
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The certificate's private key (PEM, PKCS#8 or SEC1).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// With --cert: PEM file of the CA(s) the gateway's certificate must chain to
    /// [default: the system's trusted roots].
    #[arg(long, value_name = "FILE", requires = "cert")]
    ca: Option<PathBuf>,
    /// With --cert: the name the gateway's certificate must carry (a DNS name or an IP
    /// address in its subject alternative names) [default: the host of --gateway].
    #[arg(long, value_name = "NAME", requires = "cert")]
    server_name: Option<String>,
}

impl CommonArgs {
    fn common(&self, tool: &str) -> anyhow::Result<(Common, TopicArg)> {
        let gateway = resolve(&self.gateway)?;
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("mqtt-sn-{tool}-{}", std::process::id()));
        if client_id.is_empty() || client_id.len() > 23 {
            bail!("client id {client_id:?}: MQTT-SN client ids have 1 to 23 characters");
        }
        let topic = TopicArg::from_options(self.topic.clone(), self.predefined, self.short.clone())?;
        Ok((
            Common {
                gateway,
                client_id,
                keep_alive: self.keep_alive,
                timeout: self.timeout,
                t_retry_ms: u32::try_from(self.retry.as_millis()).unwrap_or(u32::MAX).max(1),
                n_retry: self.retries,
                dtls: self.credentials()?,
            },
            topic,
        ))
    }

    fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        if let (Some(id), Some(key)) = (&self.psk_identity, &self.psk) {
            let psk = device_sim::dtls::Psk::from_hex(id, key).map_err(anyhow::Error::msg)?;
            return Ok(Some(Credentials::Psk(psk)));
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        // The gateway's host as written (a name stays a name; HOST:PORT or [V6]:PORT).
        let host = || {
            let g = self.gateway.as_str();
            let host = g.rsplit_once(':').map_or(g, |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']').to_string()
        };
        let name = self.server_name.clone().unwrap_or_else(host);
        let auth = CertAuth::load(cert, key, self.ca.as_deref(), &name).map_err(anyhow::Error::msg)?;
        Ok(Some(Credentials::Certificate(std::sync::Arc::new(auth))))
    }
}

#[derive(Debug, Args)]
struct PubCmd {
    #[command(flatten)]
    common: CommonArgs,
    /// The message.
    #[arg(short = 'm', long, value_name = "MSG")]
    message: String,
    /// QoS: -1, 0, 1 or 2.
    #[arg(short = 'q', long, value_parser = parse_qos, default_value = "0", allow_hyphen_values = true)]
    qos: QoS,
    /// Retain the message.
    #[arg(short = 'r', long)]
    retain: bool,
}

#[derive(Debug, Args)]
struct SubCmd {
    #[command(flatten)]
    common: CommonArgs,
    /// QoS: 0, 1 or 2.
    #[arg(short = 'q', long, value_parser = parse_qos, default_value = "0")]
    qos: QoS,
    /// Exit after this many messages.
    #[arg(short = 'C', long, value_name = "COUNT")]
    count: Option<u64>,
    /// Exit after this long (an error if COUNT messages did not arrive by then).
    #[arg(short = 'W', long, value_parser = parse_dur, value_name = "DURATION")]
    wait: Option<Duration>,
    /// Print `topic payload` instead of the payload alone.
    #[arg(short = 'v', long)]
    verbose: bool,
}

#[derive(Debug, Args)]
struct RunCmd {
    /// The gateway's UDP address, HOST:PORT.
    #[arg(long, short = 'g', value_name = "ADDR", default_value = "127.0.0.1:10000")]
    gateway: String,
    /// The broker the gateway uses, mqtt://HOST:PORT or mqtts://HOST:PORT (the verifier subscribes there).
    #[arg(long, short = 'b', value_name = "URL", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// With mqtts://: PEM file of the CA(s) the broker's certificate must chain to [default: the system's trusted roots].
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// Number of devices (scales the scenario's groups; default 10 without a scenario).
    #[arg(long, short = 'n', value_name = "N")]
    devices: Option<usize>,
    /// How long devices publish (e.g. 60s, 5m).
    #[arg(long, short = 'd', value_parser = parse_dur)]
    duration: Option<Duration>,
    /// Scenario file (TOML): device groups, radio, QoS mix, sleep cycles.
    #[arg(long, short = 's', value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Seed of every random choice (same seed, same choices).
    #[arg(long)]
    seed: Option<u64>,
    /// Time after publishing stops for outstanding exchanges and late arrivals.
    #[arg(long, value_parser = parse_dur)]
    drain: Option<Duration>,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Write the run over time as CSV to this file: one row per second (see
    /// docs/simulator.md for the columns).
    #[arg(long, value_name = "FILE.csv")]
    timeseries: Option<PathBuf>,
    /// Write a self-contained HTML page with charts and the summary table to this file.
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,
    /// The gateway's Prometheus endpoint, http://HOST:PORT[/PATH] (path /metrics by
    /// default): its counters over the run go into the report.
    #[arg(long, value_name = "URL", value_parser = parse_metrics_url)]
    gateway_metrics: Option<MetricsUrl>,
    /// The devices' client ids: `%n` is the device number (0, 1, ...) [default:
    /// sim-RUN-N, unique to the run].
    #[arg(long, value_name = "PATTERN")]
    client_id: Option<String>,
    /// Every device over DTLS 1.2 with a pre-shared key (a gateway `--dtls` listener):
    /// with --psk, the one identity (a registry glob entry binds it to the devices'
    /// client ids); with --psk-derive, each device's identity, `%n` the device number.
    #[arg(long, value_name = "PATTERN")]
    psk_identity: Option<String>,
    /// One pre-shared key for every device, in hex.
    #[arg(long, value_name = "HEX", conflicts_with_all = ["psk_derive", "psk_registry"])]
    psk: Option<String>,
    /// A key per device: HMAC-SHA256(SECRET, the device's identity), its first 16 octets
    /// (what `mqtt-sn-sim registry` writes for the gateway).
    #[arg(long, value_name = "SECRET", conflicts_with = "psk_registry")]
    psk_derive: Option<String>,
    /// Each device's identity and key from the gateway's device registry (TOML), by
    /// its client id (see --client-id).
    #[arg(long, value_name = "FILE")]
    psk_registry: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short = 'Q')]
    quiet: bool,
    /// No gateway, no broker: run the devices against a lossless in-process echo gateway
    /// over an in-memory network (measures the simulator alone; nothing is verified).
    #[arg(long)]
    echo: bool,
    /// Spread the devices over N worker processes [default: as many as the open-file
    /// limit requires, one socket per device]; 1 keeps them in this process.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    workers: Option<u32>,
    /// Run as a worker of a spread run (set by the parent process).
    #[arg(long, hide = true, value_name = "SPEC", value_parser = device_sim::workers::WorkerSpec::parse)]
    worker: Option<device_sim::workers::WorkerSpec>,
}

/// The fleet's keys: from the command line if it gives any key option, else from the
/// scenario's `[run]`.
fn fleet_keys(cmd: &RunCmd, scenario: &Scenario) -> anyhow::Result<Option<device_sim::keys::FleetKeys>> {
    let given = KeyOptions {
        psk_identity: cmd.psk_identity.clone(),
        psk: cmd.psk.clone(),
        psk_derive: cmd.psk_derive.clone(),
        psk_registry: cmd.psk_registry.clone(),
    };
    let opts = if given.any() {
        given
    } else {
        let r = &scenario.run;
        KeyOptions {
            psk_identity: r.psk_identity.clone(),
            psk: r.psk.clone(),
            psk_derive: r.psk_derive.clone(),
            psk_registry: r.psk_registry.clone(),
        }
    };
    opts.resolve().map_err(anyhow::Error::msg)
}

#[derive(Debug, Args)]
struct RegistryCmd {
    /// Number of devices.
    #[arg(long, short = 'n', value_name = "N")]
    devices: usize,
    /// The devices' client ids, `%n` the device number (as `run --client-id`).
    #[arg(long, value_name = "PATTERN")]
    client_id: String,
    /// The devices' PSK identities, `%n` the device number.
    #[arg(long, value_name = "PATTERN")]
    psk_identity: String,
    /// The fleet secret: each key is HMAC-SHA256(SECRET, identity), its first 16 octets.
    #[arg(long, value_name = "SECRET")]
    psk_derive: String,
    /// Every entry with `dtls_only = true` (the client ids connect over DTLS only).
    #[arg(long)]
    dtls_only: bool,
    /// Topic filter pattern each device may publish to (repeatable) [default: sim/#].
    #[arg(long, value_name = "PATTERN")]
    publish: Vec<String>,
    /// Topic filter pattern each device may subscribe to (repeatable) [default: sim/#].
    #[arg(long, value_name = "PATTERN")]
    subscribe: Vec<String>,
    /// Write the registry to this file (created readable by its owner alone) [default:
    /// standard output].
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
}

fn write_registry(cmd: RegistryCmd) -> anyhow::Result<ExitCode> {
    let or_default = |v: Vec<String>| if v.is_empty() { vec!["sim/#".to_string()] } else { v };
    let spec = RegistrySpec {
        devices: cmd.devices,
        client_id: NamePattern::parse(&cmd.client_id, "--client-id").map_err(anyhow::Error::msg)?,
        psk_identity: NamePattern::parse(&cmd.psk_identity, "--psk-identity").map_err(anyhow::Error::msg)?,
        secret: cmd.psk_derive.into_bytes(),
        dtls_only: cmd.dtls_only,
        publish: or_default(cmd.publish),
        subscribe: or_default(cmd.subscribe),
    };
    spec.check().map_err(anyhow::Error::msg)?;
    let text = device_sim::keys::registry_toml(&spec);
    match &cmd.output {
        Some(path) => {
            use std::io::Write as _;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            let mut file = options
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.write_all(text.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_fleet(cmd: RunCmd) -> anyhow::Result<ExitCode> {
    let mut scenario = match &cmd.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario::single(cmd.devices.unwrap_or(10)),
    };
    if let Some(n) = cmd.devices {
        scenario.scale_to(n);
    }
    scenario.validate()?;
    let dtls = fleet_keys(&cmd, &scenario)?;
    let opts = FleetOptions {
        gateway: resolve(&cmd.gateway)?,
        broker: BrokerUrl::parse_with_ca(&cmd.broker, cmd.broker_ca.as_deref()).map_err(anyhow::Error::msg)?,
        duration: cmd
            .duration
            .or(scenario.run.duration.map(|d| d.0))
            .unwrap_or(Duration::from_secs(60)),
        seed: cmd.seed.or(scenario.run.seed).unwrap_or(0),
        drain: cmd
            .drain
            .or(scenario.run.drain.map(|d| d.0))
            .unwrap_or(Duration::from_secs(5)),
        topic_prefix: scenario.run.topic_prefix.clone().unwrap_or_else(|| "sim".into()),
        progress: !cmd.quiet && std::io::stderr().is_terminal(),
        echo: cmd.echo,
        gateway_metrics: cmd.gateway_metrics,
        client_id: match cmd.client_id.as_deref().or(scenario.run.client_id.as_deref()) {
            Some(p) => Some(NamePattern::parse(p, "--client-id").map_err(anyhow::Error::msg)?),
            None => None,
        },
        dtls,
        scenario,
    };
    if let Some(spec) = cmd.worker {
        // A worker: its parent has the terminal, the outputs and the report.
        let opts = FleetOptions {
            progress: false,
            ..opts
        };
        fleet::run_worker(opts, spec).await?;
        return Ok(ExitCode::SUCCESS);
    }
    // Refuse an output that cannot be written before the run rather than lose the run
    // after it.
    for path in [&cmd.report, &cmd.timeseries, &cmd.html].into_iter().flatten() {
        check_writable(path)?;
    }
    let workers = match cmd.workers {
        Some(n) => n as usize,
        None if opts.echo => 1,
        None => {
            let limit = device_sim::workers::open_file_limit();
            let n = device_sim::workers::workers_needed(opts.scenario.devices(), limit);
            if n > 1 {
                tracing::warn!(
                    devices = opts.scenario.devices(),
                    open_file_limit = limit,
                    workers = n,
                    "more devices than this process may open sockets: spreading the fleet over worker processes"
                );
            }
            n
        }
    };
    let recorded = if workers > 1 {
        let exe = std::env::current_exe().context("cannot find this program to start its workers")?;
        // The workers get this run's own arguments (scenario, gateway, seed, PSK...); the
        // hidden --worker flag added to them makes them workers.
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        fleet::run_spread(opts, workers, &exe, &args).await?
    } else {
        fleet::run_recorded(opts).await?
    };
    let fleet::Recorded { report, timeseries } = recorded;
    print!("{}", report.table());
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    if let Some(path) = &cmd.report {
        write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    if let Some(path) = &cmd.timeseries {
        write(path, timeseries.to_csv())?;
    }
    if let Some(path) = &cmd.html {
        write(path, device_sim::html::page(&report, &timeseries))?;
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pub(cmd) => {
            let (common, topic) = cmd.common.common("pub")?;
            let args = PubArgs {
                common,
                topic,
                message: cmd.message.into_bytes(),
                qos: cmd.qos,
                retain: cmd.retain,
            };
            tools::publish(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sub(cmd) => {
            let (common, topic) = cmd.common.common("sub")?;
            if cmd.qos == QoS::MinusOne {
                bail!("QoS -1 is for publishing only");
            }
            let args = SubArgs {
                common,
                topic,
                qos: cmd.qos,
                count: cmd.count,
                wait: cmd.wait,
                verbose: cmd.verbose,
            };
            let mut out = std::io::stdout();
            tokio::select! {
                r = tools::subscribe(&args, &mut out) => { r?; }
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(cmd) => run_fleet(cmd).await,
        Command::Conformance(cmd) => run_conformance(cmd).await,
        Command::Registry(cmd) => write_registry(cmd),
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(code) => code,
        // One line, the causes joined: a user error is not a crash (no backtrace, even
        // with RUST_BACKTRACE set, which anyhow's Debug output would print).
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
