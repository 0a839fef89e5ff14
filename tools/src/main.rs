//! `colony`: the command line for running a Colony swarm.

mod demo;
mod dht_cmd;
mod model;
mod monitor;
mod train;

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
    /// Start a local swarm of peers that train a digits classifier together (try this first).
    Demo(demo::DemoArgs),
    /// Run one peer of a collaborative run on the built-in digits classifier.
    Train(train::TrainArgs),
    /// Show a run's live state (peers, throughput, global step, ETA) without training.
    Monitor(monitor::MonitorArgs),
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
        Command::Demo(args) => {
            if !demo::run(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Train(args) => train::run(args),
        Command::Monitor(args) => monitor::run(args),
    }
}
