//! `mqtt-sn-gateway`: the command-line entry point.

use clap::Parser;
use gateway::config::{Cli, Settings};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // rumqttd (the embedded broker) logs every client disconnect as an error: its own
        // log is off unless RUST_LOG asks for it (e.g. RUST_LOG=info,rumqttd=info).
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off")))
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::resolve(&cli).map_err(anyhow::Error::msg)?;
    // Each device holds a broker connection (a file descriptor): take the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let mut signals = Signals::new()?;
    let running = gateway::runtime::start(settings).await?;
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
