//! Loading, generating and saving the node identity.
//!
//! An identity file holds one ed25519 key pair in libp2p's protobuf encoding,
//! created with mode 0600. A running node holds an advisory lock on its file,
//! so a second node started on the same host with the same file fails with a
//! clear [`DhtError::Identity`] instead of joining the swarm under a peer id
//! that is already taken (two nodes with one id fight over every connection
//! and record).

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use libp2p::{PeerId, identity::Keypair};

use crate::{config::IdentitySource, error::DhtError};

/// A loaded key pair, its 32-byte ed25519 secret, and (for file identities)
/// the locked file, held for as long as the node runs.
pub(crate) struct LoadedIdentity {
    pub(crate) keypair: Keypair,
    pub(crate) secret: [u8; 32],
    pub(crate) lock: Option<IdentityLock>,
}

/// An identity file locked by this process; the lock goes with the value.
#[derive(Debug)]
pub(crate) struct IdentityLock {
    _file: File,
    path: PathBuf,
}

impl Drop for IdentityLock {
    fn drop(&mut self) {
        tracing::debug!(path = %self.path.display(), "identity file released");
    }
}

/// Loads the identity `source` names; for a file, creates it when missing and
/// locks it.
pub(crate) fn load_identity(source: &IdentitySource) -> Result<LoadedIdentity, DhtError> {
    match source {
        IdentitySource::Random => from_secret(rand::random::<[u8; 32]>(), None),
        IdentitySource::Secret(secret) => from_secret(*secret, None),
        IdentitySource::File(path) => {
            let (keypair, secret) = match read_keypair(path) {
                Ok(found) => found,
                Err(ReadError::Missing) => create_keypair(path)?,
                Err(ReadError::Bad(e)) => return Err(e),
            };
            let lock = lock_file(path)?;
            tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "identity");
            Ok(LoadedIdentity {
                keypair,
                secret,
                lock: Some(lock),
            })
        }
    }
}

/// Creates a new identity file at `path` (mode 0600) and returns its peer id.
///
/// # Errors
///
/// [`DhtError::Identity`] if the file already exists (an identity is never
/// overwritten) or cannot be written.
pub fn create_identity_file(path: &Path) -> Result<PeerId, DhtError> {
    let (keypair, _) = create_keypair(path)?;
    Ok(keypair.public().to_peer_id())
}

/// The peer id of the identity file at `path`, without starting a node.
///
/// # Errors
///
/// [`DhtError::Identity`] if the file is missing, unreadable, or not an
/// ed25519 key pair in libp2p's protobuf encoding.
pub fn read_identity_file(path: &Path) -> Result<PeerId, DhtError> {
    match read_keypair(path) {
        Ok((keypair, _)) => Ok(keypair.public().to_peer_id()),
        Err(ReadError::Missing) => Err(identity_err(path, "no such file")),
        Err(ReadError::Bad(e)) => Err(e),
    }
}

fn identity_err(path: &Path, reason: impl std::fmt::Display) -> DhtError {
    DhtError::Identity {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn keypair_from_secret(secret: [u8; 32], path: &Path) -> Result<Keypair, DhtError> {
    let mut bytes = secret;
    Keypair::ed25519_from_bytes(&mut bytes).map_err(|e| identity_err(path, e))
}

fn from_secret(secret: [u8; 32], path: Option<&Path>) -> Result<LoadedIdentity, DhtError> {
    let keypair = keypair_from_secret(secret, path.unwrap_or(Path::new("<memory>")))?;
    Ok(LoadedIdentity {
        keypair,
        secret,
        lock: None,
    })
}

enum ReadError {
    Missing,
    Bad(DhtError),
}

fn read_keypair(path: &Path) -> Result<(Keypair, [u8; 32]), ReadError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(ReadError::Bad(identity_err(path, e))),
    };
    let keypair = Keypair::from_protobuf_encoding(&bytes)
        .map_err(|e| ReadError::Bad(identity_err(path, e)))?;
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| ReadError::Bad(identity_err(path, "not an ed25519 key")))?;
    let full = ed.to_bytes();
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&full[..32]);
    Ok((keypair, secret))
}

fn create_keypair(path: &Path) -> Result<(Keypair, [u8; 32]), DhtError> {
    let secret = rand::random::<[u8; 32]>();
    let keypair = keypair_from_secret(secret, path)?;
    let encoded = keypair
        .to_protobuf_encoding()
        .map_err(|e| identity_err(path, e))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            identity_err(path, "already exists (an identity is never overwritten)")
        } else {
            identity_err(path, e)
        }
    })?;
    file.write_all(&encoded)
        .map_err(|e| identity_err(path, e))?;
    file.sync_all().map_err(|e| identity_err(path, e))?;
    tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "generated identity");
    Ok((keypair, secret))
}

fn lock_file(path: &Path) -> Result<IdentityLock, DhtError> {
    let file = File::open(path).map_err(|e| identity_err(path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(IdentityLock {
            _file: file,
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::WouldBlock) => Err(identity_err(
            path,
            "another node on this host is running with this identity file; \
             give every node its own identity file",
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(identity_err(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let a = load_identity(&IdentitySource::File(path.clone())).unwrap();
        let a_id = a.keypair.public().to_peer_id();
        drop(a);
        let b = load_identity(&IdentitySource::File(path.clone())).unwrap();
        assert_eq!(a_id, b.keypair.public().to_peer_id());
        assert_eq!(read_identity_file(&path).unwrap(), a_id);
        drop(b);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_identity(&IdentitySource::File(path.clone())),
            Err(DhtError::Identity { .. })
        ));
        assert!(read_identity_file(&path).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn created_file_is_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let id = create_identity_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = create_identity_file(&path).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(read_identity_file(&path).unwrap(), id);
        assert!(read_identity_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn second_node_with_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let first = load_identity(&IdentitySource::File(path.clone())).unwrap();
        let err = match load_identity(&IdentitySource::File(path.clone())) {
            Ok(_) => panic!("a second node loaded a locked identity"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("another node"), "{err}");
        drop(first);
        load_identity(&IdentitySource::File(path)).unwrap();
    }
}
