//! `colony`: the command line for running a Colony swarm.

mod dht_cmd;

use clap::{Parser, Subcommand};

/// Train one model on many machines that do not trust each other.
#[derive(Debug, Parser)]
#[command(name = "colony", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// DHT node and debugging tools.
    #[command(subcommand)]
    Dht(dht_cmd::DhtCommand),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Dht(command) => dht_cmd::run(command),
    }
}
