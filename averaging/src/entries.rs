//! Signed group entries: each member signs its own entry with its libp2p
//! identity key; leaders check joiners' entries, followers check every
//! entry of the group their leader sends. A leader therefore cannot swap a
//! member's round key or address (a man in the middle), change its mode or
//! bandwidth, replay an entry from another run, group key or schema, or
//! list a member that never asked to join.

use colony_dht::{PeerId, PeerSigner, verify_peer_signature};

use crate::group::{AssembledGroup, EntryContext, EntrySignature, GroupMember};

/// How far past its expiration (DHT time) an entry is still taken: clocks
/// and the round's own start differ a little between members.
pub(crate) const EXPIRY_SLACK_S: f64 = 5.0;

/// Sign `member` (as declared: its data address is the one it announces)
/// valid until `expires`.
pub(crate) fn sign_member(
    signer: &PeerSigner,
    member: &mut GroupMember,
    ctx: &EntryContext<'_>,
    expires: f64,
) {
    let declared_addr = member.data_addr;
    let message = member.signed_message(ctx, declared_addr, expires);
    member.signed = Some(Box::new(EntrySignature {
        declared_addr,
        expires,
        signature: signer.sign(&message),
    }));
}

/// Check one entry: signed by its peer, for this context, not expired at
/// `now` (DHT time), and with its data address the declared one or none.
///
/// # Errors
/// What is wrong, for the log.
pub(crate) fn verify_member(
    member: &GroupMember,
    ctx: &EntryContext<'_>,
    now: f64,
) -> Result<(), &'static str> {
    let Some(s) = &member.signed else {
        return Err("entry is not signed");
    };
    let Ok(peer) = PeerId::from_bytes(&member.peer_id) else {
        return Err("entry's peer id is not a libp2p peer id");
    };
    if member.data_addr.is_some() && member.data_addr != s.declared_addr {
        return Err("entry's data address is not the one its member declared");
    }
    if !s.expires.is_finite() || s.expires + EXPIRY_SLACK_S < now {
        return Err("entry expired");
    }
    let message = member.signed_message(ctx, s.declared_addr, s.expires);
    if !verify_peer_signature(&peer, &message, &s.signature) {
        return Err("entry's signature does not verify for its peer id");
    }
    Ok(())
}

/// Check every entry of `group`; on failure, the position of the first bad
/// entry and what is wrong.
///
/// # Errors
/// `(position, reason)` of the first entry that does not verify.
pub(crate) fn verify_group(
    group: &AssembledGroup,
    ctx: &EntryContext<'_>,
    now: f64,
) -> Result<(), (usize, &'static str)> {
    for (i, m) in group.members.iter().enumerate() {
        verify_member(m, ctx, now).map_err(|why| (i, why))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::group::AveragingMode;

    const SCHEMA: [u8; 32] = [7; 32];

    fn ctx() -> EntryContext<'static> {
        EntryContext {
            prefix: "run",
            group_key: "run.0b01",
            schema_hash: &SCHEMA,
        }
    }

    fn signed(i: u8, expires: f64) -> GroupMember {
        let signer = PeerSigner::from_secret([i; 32]);
        let mut m = GroupMember {
            peer_id: signer.peer_id().to_bytes(),
            data_addr: Some(SocketAddr::from(([10, 0, 0, i], 4000))),
            mode: AveragingMode::Node,
            bandwidth: Some(100.0),
            round_public_key: [i; 32],
            signed: None,
        };
        sign_member(&signer, &mut m, &ctx(), expires);
        m
    }

    #[test]
    fn a_leader_can_drop_an_address_but_change_nothing_else() {
        let m = signed(1, 100.0);
        assert_eq!(verify_member(&m, &ctx(), 90.0), Ok(()));
        // Dropped address: reached over libp2p, still the member's entry.
        let mut dropped = m.clone();
        dropped.data_addr = None;
        assert_eq!(verify_member(&dropped, &ctx(), 90.0), Ok(()));
        type Tamper = (&'static str, fn(&mut GroupMember));
        let tamper: [Tamper; 6] = [
            ("round key", |m| m.round_public_key = [0xee; 32]),
            ("address", |m| {
                m.data_addr = Some(SocketAddr::from(([10, 9, 9, 9], 1)));
            }),
            ("declared address and address", |m| {
                let a = Some(SocketAddr::from(([10, 9, 9, 9], 1)));
                m.data_addr = a;
                m.signed.as_mut().unwrap().declared_addr = a;
            }),
            ("mode", |m| m.mode = AveragingMode::Aux),
            ("bandwidth", |m| m.bandwidth = Some(1e308)),
            ("expiration", |m| m.signed.as_mut().unwrap().expires = 1e9),
        ];
        for (what, f) in tamper {
            let mut t = m.clone();
            f(&mut t);
            assert!(
                verify_member(&t, &ctx(), 90.0).is_err(),
                "{what} changed and verified"
            );
        }
        // Another member's signature on this entry.
        let mut stolen = m.clone();
        stolen.signed = signed(2, 100.0).signed;
        assert!(verify_member(&stolen, &ctx(), 90.0).is_err());
        // Another run, group key or schema.
        for other in [
            EntryContext {
                prefix: "other",
                ..ctx()
            },
            EntryContext {
                group_key: "run.0b10",
                ..ctx()
            },
            EntryContext {
                schema_hash: &[8; 32],
                ..ctx()
            },
        ] {
            assert!(verify_member(&m, &other, 90.0).is_err());
        }
        // Expired, unsigned.
        assert!(verify_member(&m, &ctx(), 100.0 + EXPIRY_SLACK_S + 1.0).is_err());
        let mut bare = m.clone();
        bare.signed = None;
        assert!(verify_member(&bare, &ctx(), 90.0).is_err());
    }

    #[test]
    fn a_group_with_one_forged_entry_names_it() {
        let mut group = AssembledGroup {
            group_id: [1; 32],
            members: (1..=4).map(|i| signed(i, 100.0)).collect(),
        };
        assert_eq!(verify_group(&group, &ctx(), 90.0), Ok(()));
        group.members[2].round_public_key = [0; 32];
        assert_eq!(verify_group(&group, &ctx(), 90.0).map_err(|e| e.0), Err(2));
    }
}
