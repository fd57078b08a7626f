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
    let running = gateway::runtime::start(settings).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; stopping");
            running.shutdown().await;
        }
    }
    Ok(())
}
