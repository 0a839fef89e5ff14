//! Closed runs: only the peers on [`DhtConfig::allowed_peers`](crate::DhtConfig::allowed_peers)
//! may connect, and no record signed by anyone else is stored or read (a
//! node outside the list that still holds such records, a bootstrap node
//! left open, cannot hand them to members).

use std::{any::Any, collections::HashSet};

use colony_schema::OwnerKey;
use libp2p::PeerId;

use crate::{
    error::ValidationError, owner::peer_id_of_owner, record::DhtRecord, validation::RecordValidator,
};

/// Refuses records whose owner (the owner marker in the key or subkey) is
/// not an allowed peer; records naming no owner pass.
#[derive(Debug, Clone)]
pub(crate) struct AllowedOwners {
    peers: HashSet<PeerId>,
}

impl AllowedOwners {
    pub(crate) fn new(peers: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            peers: peers.into_iter().collect(),
        }
    }
}

impl RecordValidator for AllowedOwners {
    fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        let owners = [
            OwnerKey::find_in(&record.key)?,
            match &record.subkey {
                Some(s) => OwnerKey::find_in(s)?,
                None => None,
            },
        ];
        for owner in owners.into_iter().flatten() {
            let peer = peer_id_of_owner(&owner)?;
            if !self.peers.contains(&peer) {
                return Err(ValidationError::Custom {
                    validator: "allowed peers",
                    reason: format!("{peer} is not a member of this closed run"),
                });
            }
        }
        Ok(())
    }

    fn priority(&self) -> i32 {
        // Before the signature check: an outsider's record costs no
        // signature verification.
        crate::SIGNATURE_PRIORITY + 1
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
