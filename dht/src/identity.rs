//! Loading, generating and saving the node identity.

use std::{io::Write, path::Path};

use libp2p::identity::Keypair;

use crate::{config::IdentitySource, error::DhtError};

/// The libp2p key pair and its 32-byte ed25519 secret.
pub(crate) fn load_identity(source: &IdentitySource) -> Result<(Keypair, [u8; 32]), DhtError> {
    match source {
        IdentitySource::Random => from_secret(rand::random::<[u8; 32]>(), None),
        IdentitySource::Secret(secret) => from_secret(*secret, None),
        IdentitySource::File(path) => load_or_create(path),
    }
}

fn identity_err(path: &Path, reason: impl std::fmt::Display) -> DhtError {
    DhtError::Identity {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn from_secret(secret: [u8; 32], path: Option<&Path>) -> Result<(Keypair, [u8; 32]), DhtError> {
    let mut bytes = secret;
    Keypair::ed25519_from_bytes(&mut bytes)
        .map(|k| (k, secret))
        .map_err(|e| identity_err(path.unwrap_or(Path::new("<memory>")), e))
}

fn load_or_create(path: &Path) -> Result<(Keypair, [u8; 32]), DhtError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| identity_err(path, e))?;
            let ed = keypair
                .clone()
                .try_into_ed25519()
                .map_err(|_| identity_err(path, "not an ed25519 key"))?;
            let full = ed.to_bytes();
            let mut secret = [0u8; 32];
            secret.copy_from_slice(&full[..32]);
            tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "loaded identity");
            Ok((keypair, secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (keypair, secret) = from_secret(rand::random::<[u8; 32]>(), Some(path))?;
            let encoded = keypair
                .to_protobuf_encoding()
                .map_err(|e| identity_err(path, e))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| identity_err(path, e))?;
            file.write_all(&encoded)
                .map_err(|e| identity_err(path, e))?;
            file.sync_all().map_err(|e| identity_err(path, e))?;
            tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "generated identity");
            Ok((keypair, secret))
        }
        Err(e) => Err(identity_err(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let (a, sa) = load_identity(&IdentitySource::File(path.clone())).unwrap();
        let (b, sb) = load_identity(&IdentitySource::File(path.clone())).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(sa, sb);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_identity(&IdentitySource::File(path)),
            Err(DhtError::Identity { .. })
        ));
    }
}
