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

/// Reads a closed run's allow list: one peer id per line; blank lines and
/// `#` comments (whole-line or trailing) are skipped.
///
/// # Errors
/// An unreadable file, a line that is not a peer id, or an empty list.
pub(crate) fn read_allow_list(path: &std::path::Path) -> anyhow::Result<Vec<colony_dht::PeerId>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the allow list {}", path.display()))?;
    let peers = parse_allow_list(&text).with_context(|| format!("in {}", path.display()))?;
    anyhow::ensure!(
        !peers.is_empty(),
        "the allow list {} names no peer",
        path.display()
    );
    Ok(peers)
}

fn parse_allow_list(text: &str) -> anyhow::Result<Vec<colony_dht::PeerId>> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.split('#').next().unwrap_or("").trim();
            (!line.is_empty()).then_some((i + 1, line))
        })
        .map(|(n, line)| {
            line.parse()
                .with_context(|| format!("line {n}: {line:?} is not a peer id"))
        })
        .collect()
}

#[cfg(test)]
mod allow_list_tests {
    use super::*;

    #[test]
    fn allow_lists_skip_comments_and_name_bad_lines() {
        let a = colony_dht::PeerSigner::from_secret([1; 32]).peer_id();
        let b = colony_dht::PeerSigner::from_secret([2; 32]).peer_id();
        let text = format!("# members\n{a}\n\n  {b}  # the bootstrap\n");
        assert_eq!(parse_allow_list(&text).unwrap(), vec![a, b]);
        let err = parse_allow_list(&format!("{a}\nnot-a-peer\n")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
