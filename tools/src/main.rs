//! `colony`: the command line for running a Colony swarm.

mod demo;
mod dht_cmd;
mod doctor;
mod identity_cmd;
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
// Parsed once per process; boxing the larger arguments buys nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Check whether the swarm can reach this host (DHT and data-plane ports,
    /// NAT) by asking peers to dial it back, and say what to change.
    Doctor(doctor::DoctorArgs),
    /// Create or inspect a node identity file (its peer id, before a node starts).
    #[command(subcommand)]
    Identity(identity_cmd::IdentityCommand),
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
        Command::Identity(command) => identity_cmd::run(command),
        Command::Doctor(args) => doctor::run(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every option of every subcommand also reads `COLONY_<LONG NAME>`, and
    /// repeatable options take a comma-separated list there.
    #[test]
    fn every_flag_reads_an_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version") {
                    continue;
                }
                let want = format!("COLONY_{}", long.replace('-', "_").to_uppercase());
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                if env.as_deref() != Some(want.as_str()) {
                    missing.push(format!("{path} --{long}: {env:?}, want {want}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "colony", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
        Cli::command().debug_assert();
    }
}
