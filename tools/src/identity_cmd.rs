//! `colony identity new|show`: a node's identity file and its peer id, before
//! any node starts (so a bootstrap address can be written down in advance).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

/// Identity commands.
#[derive(Debug, Subcommand)]
pub(crate) enum IdentityCommand {
    /// Create a new identity file (mode 0600; never overwrites) and print its peer id.
    New {
        /// Where to write it.
        path: PathBuf,
    },
    /// Print the peer id of an identity file.
    Show {
        /// The identity file.
        path: PathBuf,
    },
}

/// Runs a `colony identity` command.
pub(crate) fn run(command: IdentityCommand) -> anyhow::Result<()> {
    let peer = match &command {
        IdentityCommand::New { path } => colony_dht::create_identity_file(path)
            .with_context(|| format!("creating {}", path.display()))?,
        IdentityCommand::Show { path } => colony_dht::read_identity_file(path)
            .with_context(|| format!("reading {}", path.display()))?,
    };
    println!("{peer}");
    Ok(())
}
