//! `mqtt-sn-gateway`: the command-line entry point.

use clap::Parser;
use gateway::config::{Cli, Settings};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::resolve(&cli).map_err(anyhow::Error::msg)?;
    let running = gateway::runtime::start(settings).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; stopping");
            running.shutdown().await;
        }
    }
    Ok(())
}
