//! Owner keys and peer ids: a node's owner key (the `[owner:ed25519:<hex>]`
//! marker that makes a subkey its own) is its libp2p identity key, so the two
//! name the same peer and each can be checked against the other.

use colony_schema::OwnerKey;
use libp2p::{PeerId, identity};

use crate::{error::ValidationError, node::GossipMessage};

/// The peer id of the node whose identity key is `owner`.
///
/// # Errors
///
/// [`ValidationError::BadOwnerKey`] if the 32 bytes are not an ed25519 point.
///
/// # Examples
///
/// ```
/// use colony_dht::{owner_key_from_secret, peer_id_of_owner};
///
/// let owner = owner_key_from_secret([7; 32]);
/// let peer = peer_id_of_owner(&owner).unwrap();
/// assert_eq!(peer, peer_id_of_owner(&owner).unwrap());
/// ```
pub fn peer_id_of_owner(owner: &OwnerKey) -> Result<PeerId, ValidationError> {
    let public = identity::ed25519::PublicKey::try_from_bytes(owner.as_bytes())
        .map_err(|_| ValidationError::BadOwnerKey)?;
    Ok(identity::PublicKey::from(public).to_peer_id())
}

/// Signs messages with a node's libp2p identity key (ed25519), so peers can
/// check them against its peer id alone (an ed25519 peer id embeds the
/// public key). Callers put a domain tag of their own first in every
/// message, so a signature made for one purpose never verifies for
/// another. See [`verify_peer_signature`].
#[derive(Clone)]
pub struct PeerSigner {
    key: ed25519_dalek::SigningKey,
    peer_id: PeerId,
}

impl std::fmt::Debug for PeerSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSigner")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl PeerSigner {
    /// The signer of the identity [`IdentitySource::Secret(secret)`](crate::IdentitySource::Secret).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        let public = identity::ed25519::PublicKey::try_from_bytes(&key.verifying_key().to_bytes())
            .map(identity::PublicKey::from);
        // Every ed25519 verifying key is a valid libp2p ed25519 key.
        let peer_id = public.map_or_else(|_| PeerId::random(), |p| p.to_peer_id());
        Self { key, peer_id }
    }

    /// The peer id whose key signs.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The 64-byte ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer;
        self.key.sign(message).to_bytes().to_vec()
    }
}

/// Whether `signature` over `message` was made by `peer`'s identity key.
/// Only peer ids that embed their public key (ed25519, the only kind Colony
/// nodes have) can be checked; any other id verifies nothing.
pub fn verify_peer_signature(peer: &PeerId, message: &[u8], signature: &[u8]) -> bool {
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // Code 0: the identity multihash, whose digest is the encoded public key.
    if hash.code() != 0 {
        return false;
    }
    identity::PublicKey::try_decode_protobuf(hash.digest())
        .is_ok_and(|key| key.verify(message, signature))
}

/// The owner key of the node started with
/// [`IdentitySource::Secret(secret)`](crate::IdentitySource::Secret): the
/// ed25519 public key of that secret. Lets tests and tools name an identity
/// without a running node.
pub fn owner_key_from_secret(secret: [u8; 32]) -> OwnerKey {
    let signing = ed25519_dalek::SigningKey::from_bytes(&secret);
    OwnerKey::from_bytes(signing.verifying_key().to_bytes())
}

impl GossipMessage {
    /// Whether this message was published (and signed) by the node whose
    /// identity key is `owner`: only then may it speak for that owner. A
    /// message without a source, or an owner key that is not an ed25519 point,
    /// owns nothing.
    pub fn is_from_owner(&self, owner: &OwnerKey) -> bool {
        match (&self.source, peer_id_of_owner(owner)) {
            (Some(source), Ok(peer)) => *source == peer,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(source: Option<PeerId>) -> GossipMessage {
        GossipMessage {
            topic: "t".into(),
            source,
            data: Vec::new(),
        }
    }

    #[test]
    fn owner_keys_map_to_the_libp2p_peer_id_of_the_same_key() {
        let secret = [3u8; 32];
        let mut bytes = secret;
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut bytes).unwrap();
        let owner = owner_key_from_secret(secret);
        assert_eq!(
            peer_id_of_owner(&owner).unwrap(),
            keypair.public().to_peer_id()
        );
        let ed = keypair.public().try_into_ed25519().unwrap().to_bytes();
        assert_eq!(owner.as_bytes(), &ed);
        // Not a point on the curve (y = 2 has no matching x).
        let mut bad = [0u8; 32];
        bad[0] = 2;
        assert!(matches!(
            peer_id_of_owner(&OwnerKey::from_bytes(bad)),
            Err(ValidationError::BadOwnerKey)
        ));
    }

    #[test]
    fn peer_signatures_verify_for_their_peer_only() {
        let a = PeerSigner::from_secret([5; 32]);
        let b = PeerSigner::from_secret([6; 32]);
        let mut bytes = [5u8; 32];
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut bytes).unwrap();
        assert_eq!(a.peer_id(), keypair.public().to_peer_id());
        let sig = a.sign(b"colony-test: hello");
        assert!(verify_peer_signature(
            &a.peer_id(),
            b"colony-test: hello",
            &sig
        ));
        assert!(!verify_peer_signature(
            &b.peer_id(),
            b"colony-test: hello",
            &sig
        ));
        assert!(!verify_peer_signature(
            &a.peer_id(),
            b"colony-test: hellO",
            &sig
        ));
        assert!(!verify_peer_signature(
            &a.peer_id(),
            b"colony-test: hello",
            &sig[..63]
        ));
        // A peer id that does not embed its key verifies nothing.
        assert!(!verify_peer_signature(&PeerId::random(), b"x", &sig));
    }

    #[test]
    fn gossip_speaks_only_for_its_source() {
        let owner = owner_key_from_secret([1; 32]);
        let peer = peer_id_of_owner(&owner).unwrap();
        let other = peer_id_of_owner(&owner_key_from_secret([2; 32])).unwrap();
        assert!(message(Some(peer)).is_from_owner(&owner));
        assert!(!message(Some(other)).is_from_owner(&owner));
        assert!(!message(None).is_from_owner(&owner));
    }
}
