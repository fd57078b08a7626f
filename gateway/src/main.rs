//! `mqtt-sn-gateway`: the command-line entry point.

use std::io::IsTerminal;
use std::process::ExitCode;

use gateway::auth::Registry as DeviceRegistry;
use gateway::config::{Changes, Cli, Config, ConfigErrors};
use gateway::config::{LogFormat, LogSettings};
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Exit status for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if cli.print_config {
        print!("{}", config.to_toml_redacted());
        return ExitCode::SUCCESS;
    }
    let settings = match config.validate() {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let logging = init_logging(&settings.log);
    let format = settings.log.format;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fatal(format, &anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    let reload = Reload {
        cli,
        running: config,
        registry: settings.engine.auth.registry.clone(),
        logging,
    };
    match runtime.block_on(run(settings, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(format, &e),
    }
}

async fn run(settings: gateway::config::Settings, mut reload: Reload) -> anyhow::Result<()> {
    let probe = settings.embedded_broker.is_none().then(|| settings.broker.clone());
    let mut signals = Signals::new()?;
    let running = gateway::runtime::start(settings).await?;
    if let Some(broker) = probe {
        tokio::spawn(warn_if_unreachable(broker));
    }
    let which = loop {
        match signals.next().await {
            Signal::Reload => reload.run(&running).await,
            Signal::Stop(which) => break which,
        }
    };
    tracing::info!(
        signal = which,
        "stopping: devices are told, broker connections closed cleanly"
    );
    // A second signal means "now".
    tokio::select! {
        _ = running.shutdown() => {}
        which = signals.next_stop() => {
            tracing::warn!(signal = which, "second signal: exiting without finishing the stop");
            std::process::exit(1);
        }
    }
    Ok(())
}

/// A broker that does not answer at start is not fatal (each device's connection keeps
/// trying, and devices get CONNACK congestion meanwhile), but the operator should know.
async fn warn_if_unreachable(broker: gateway::broker::mqtt::BrokerConfig) {
    let wait = std::time::Duration::from_secs(broker.connect_timeout_secs.max(1));
    if let Err(reason) = gateway::ops::reach_broker(&broker, wait).await {
        tracing::warn!(broker = %broker.url(), %reason, "broker unreachable at start; devices get CONNACK congestion until it answers (the gateway keeps trying)");
    }
}

/// The log filter in force, and how to replace it.
struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` when it set the filter at start (it then keeps it: the environment of
    /// a running process does not change, so a reload finds it as the start did).
    rust_log: Option<String>,
}

/// Logs to stderr as `log` says (`RUST_LOG` overrides its level): text, in colour only
/// when stderr is a terminal, or one JSON object per line. The filter sits in a reload
/// layer, so that SIGHUP can change the level without a restart.
fn init_logging(log: &LogSettings) -> Logging {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, problem) = log.filter(rust_log.as_deref());
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let in_force = problem.is_none() && rust_log.as_deref().is_some_and(|v| !v.trim().is_empty());
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
    Logging {
        filter: handle,
        rust_log: rust_log.filter(|_| in_force),
    }
}

/// What SIGHUP needs: the command line to load the configuration again exactly as at
/// start (the same file, environment and flags, which keep their precedence), the
/// configuration in force, and the log filter.
struct Reload {
    cli: Cli,
    /// The configuration in force: the one loaded at start, with what reloads applied.
    running: Config,
    /// The device registry in force (registry mode).
    registry: Option<Arc<DeviceRegistry>>,
    logging: Logging,
}

impl Reload {
    /// Loads and validates the configuration again and applies what can change without
    /// a restart: `log.level` and `[predefined]`. Other changes are named in a warning
    /// and not applied. A configuration that does not load or validate changes nothing
    /// (an ERROR per problem, the text `--check-config` prints). Never ends the process.
    async fn run(&mut self, gateway: &gateway::runtime::Running) {
        let file = self.cli.config.as_ref().map(|p| p.display().to_string());
        tracing::info!(
            file = file.as_deref().unwrap_or("none"),
            "SIGHUP: reloading the configuration"
        );
        // Offline: the broker settings need a restart, so a name lookup of its host
        // (which start-up does) would only let a DNS hiccup refuse a reload.
        let loaded = Config::load(&self.cli).and_then(|c| c.validate_offline().map(|s| (c, s)));
        let (new, settings) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                for line in &e.0 {
                    tracing::error!("reload failed, running settings kept: {line}");
                }
                return;
            }
        };
        let changes = Changes::between(&self.running, &new);
        if !changes.needs_restart.is_empty() {
            tracing::warn!(
                "reload: {} changed: needs a restart, not applied",
                changes.needs_restart.join(", ")
            );
        }
        if let Some((old, level)) = &changes.log_level {
            if let Some(rust_log) = &self.logging.rust_log {
                tracing::warn!(
                    "reload: log.level {old} -> {level} not applied: RUST_LOG={rust_log} sets the level, as at start"
                );
                self.running.log.level.clone_from(&new.log.level);
            } else {
                let (filter, _) = settings.log.filter(None);
                match self.logging.filter.reload(filter) {
                    Ok(()) => {
                        // After the change, so that every line that follows is at the new level.
                        tracing::info!("reload: log.level {old} -> {level}");
                        self.running.log.level.clone_from(&new.log.level);
                    }
                    Err(e) => tracing::error!("reload: log.level not applied: {e}"),
                }
            }
        }
        if changes.predefined.is_empty() {
            // The same ids and names, perhaps written differently (" 7" and "7").
            self.running.predefined.clone_from(&new.predefined);
        } else {
            match gateway.set_predefined(settings.engine.predefined.clone()).await {
                Ok(()) => {
                    let p = &changes.predefined;
                    tracing::info!(added = ?p.added, removed = ?p.removed, renamed = ?p.changed, "reload: predefined {p}");
                    self.running.predefined.clone_from(&new.predefined);
                }
                Err(e) => tracing::error!("reload: predefined topics not applied: {e}"),
            }
        }
        let registry_changed = self.reload_registry(gateway, &new, settings.engine.auth.registry).await;
        // The certificate files are read again whatever changed in them (the paths are
        // the configuration; their contents are what rotates). A changed [[dtls]] table
        // needs a restart: nothing of it is applied.
        let mut certs_changed = false;
        if !changes
            .needs_restart
            .iter()
            .any(|k| k == "dtls" || k.starts_with("dtls."))
        {
            let certs = settings.dtls.iter().map(|d| d.certificates.clone()).collect();
            match gateway.set_dtls_certificates(certs).await {
                Ok(changed) => {
                    for i in changed {
                        certs_changed = true;
                        tracing::info!(
                            listener = i + 1,
                            "reload: the certificates of [[dtls]] #{} changed: handshakes from now on use them, established sessions keep going",
                            i + 1
                        );
                    }
                }
                Err(e) => tracing::error!("reload: DTLS certificates not applied: {e}"),
            }
        }
        if changes.is_empty() && !registry_changed && !certs_changed {
            tracing::info!("reload: nothing changed");
        }
    }

    /// Applies a new device registry (the devices file re-read, or another file named):
    /// logs what changed, by client id. Returns whether anything did. From open to
    /// registry mode or back needs a restart.
    async fn reload_registry(
        &mut self,
        gateway: &gateway::runtime::Running,
        new: &Config,
        loaded: Option<Arc<DeviceRegistry>>,
    ) -> bool {
        match (&self.registry, loaded) {
            (None, None) => false,
            (Some(_), None) | (None, Some(_)) => {
                tracing::warn!("reload: auth mode changed (open <-> registry): needs a restart, not applied");
                true
            }
            (Some(old), Some(loaded)) => {
                let diff = loaded.diff(old);
                if diff.is_empty() && new.auth.devices_file == self.running.auth.devices_file {
                    return false;
                }
                match gateway.set_registry(loaded.clone()).await {
                    Ok(()) => {
                        tracing::info!(
                            file = %loaded.origin,
                            devices = loaded.len(),
                            added = ?diff.added,
                            removed = ?diff.removed,
                            changed = ?diff.changed,
                            "reload: devices {diff}"
                        );
                        self.registry = Some(loaded);
                        self.running.auth.devices_file.clone_from(&new.auth.devices_file);
                    }
                    Err(e) => tracing::error!("reload: device registry not applied: {e}"),
                }
                true
            }
        }
    }
}

/// Every configuration error, one per line, then exit status 2.
fn config_error(e: &ConfigErrors) -> ExitCode {
    for line in &e.0 {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// A fatal error at start or while running: one line (with its causes), no backtrace;
/// `error: ...` in text, an ERROR event in a JSON log (which stays one object per line).
fn fatal(format: LogFormat, e: &anyhow::Error) -> ExitCode {
    match format {
        LogFormat::Text => eprintln!("error: {e:#}"),
        LogFormat::Json => tracing::error!("{e:#}"),
    }
    ExitCode::FAILURE
}

/// SIGTERM (systemd, Docker) and SIGINT (Ctrl-C) both ask for a graceful stop; SIGHUP
/// (`systemctl reload`) for a configuration reload.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

/// What a signal asks for.
enum Signal {
    /// Stop gracefully; the signal's name.
    Stop(&'static str),
    /// Reload the configuration.
    Reload,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal.
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.hup.recv() => Signal::Reload,
                _ = self.term.recv() => Signal::Stop("SIGTERM"),
                _ = self.int.recv() => Signal::Stop("SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            Signal::Stop(self.next_stop().await)
        }
    }

    /// Waits for the next stop signal; its name. (Once SIGHUP has a handler, it no
    /// longer ends the process; while stopping it is ignored.)
    async fn next_stop(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
