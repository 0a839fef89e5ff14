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
    fn gossip_speaks_only_for_its_source() {
        let owner = owner_key_from_secret([1; 32]);
        let peer = peer_id_of_owner(&owner).unwrap();
        let other = peer_id_of_owner(&owner_key_from_secret([2; 32])).unwrap();
        assert!(message(Some(peer)).is_from_owner(&owner));
        assert!(!message(Some(other)).is_from_owner(&owner));
        assert!(!message(None).is_from_owner(&owner));
    }
}
