//! Progress records pushed over gossipsub
//! (`colony_optim::fuzzing::pushed_progress`: strict decoding, the owner
//! check against the message's signer, validation and the peer-id check).
//!
//! Caps: an accepted record's owner is the message's source, its progress
//! (if any) meets its constraints and names its owner's peer id.
#![no_main]

use std::sync::OnceLock;

use colony_dht::{PeerId, PeerSigner, peer_id_of_owner};
use colony_fuzz::Input;
use colony_optim::fuzzing::pushed_progress;
use libfuzzer_sys::fuzz_target;
use validator::Validate;

fn peers() -> &'static [PeerId; 2] {
    static P: OnceLock<[PeerId; 2]> = OnceLock::new();
    P.get_or_init(|| {
        [
            PeerSigner::from_secret([3; 32]).peer_id(),
            PeerSigner::from_secret([4; 32]).peer_id(),
        ]
    })
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::optim_pushed),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let source = match input.u8() % 3 {
            0 => None,
            i => Some(peers()[usize::from(i) - 1]),
        };
        let Some((owner, progress, _)) = pushed_progress(source, input.rest()) else {
            return;
        };
        let owner_peer = peer_id_of_owner(&owner).expect("an accepted owner is a peer");
        assert_eq!(Some(owner_peer), source);
        if let Some(p) = progress {
            assert!(p.validate().is_ok());
            assert_eq!(p.peer_id, owner_peer.to_base58());
        }
    }
);
