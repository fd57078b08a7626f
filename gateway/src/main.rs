//! `mqtt-sn-gateway`: the command-line entry point.

use std::io::IsTerminal;
use std::process::ExitCode;

use gateway::config::{Cli, Config, ConfigErrors};
use gateway::config::{LogFormat, LogSettings};

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
    init_logging(&settings.log);
    let format = settings.log.format;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fatal(format, &anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(format, &e),
    }
}

async fn run(settings: gateway::config::Settings) -> anyhow::Result<()> {
    // Each device holds a broker connection (a file descriptor): take the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let probe = settings.embedded_broker.is_none().then(|| settings.broker.clone());
    let mut signals = Signals::new()?;
    let running = gateway::runtime::start(settings).await?;
    if let Some(broker) = probe {
        tokio::spawn(warn_if_unreachable(broker));
    }
    let which = signals.next().await;
    tracing::info!(
        signal = which,
        "stopping: devices are told, broker connections closed cleanly"
    );
    // A second signal means "now".
    tokio::select! {
        _ = running.shutdown() => {}
        which = signals.next() => {
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
    if let Err(reason) = gateway::ops::reach_broker(&broker.host, broker.port, wait).await {
        let addr = format!("{}:{}", broker.host, broker.port);
        tracing::warn!(broker = %addr, %reason, "broker unreachable at start; devices get CONNACK congestion until it answers (the gateway keeps trying)");
    }
}

/// Logs to stderr as `log` says (`RUST_LOG` overrides its level): text, in colour only
/// when stderr is a terminal, or one JSON object per line.
fn init_logging(log: &LogSettings) {
    let (filter, problem) = log.filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
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

/// SIGTERM (systemd, Docker) and SIGINT (Ctrl-C) both ask for a graceful stop.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal; its name.
    async fn next(&mut self) -> &'static str {
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
