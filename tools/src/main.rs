//! `colony`: the command line for running a Colony swarm.

use clap::Parser;

/// Train one model on many machines that do not trust each other.
#[derive(Debug, Parser)]
#[command(name = "colony", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
