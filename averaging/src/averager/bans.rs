//! Bans that outlive a round: a peer caught in a provable fault is kept out
//! of this averager's groups for a while, longer each time it offends again
//! (as the reference's DHT blacklist backs off).
//!
//! Only faults the peer itself must have committed count: they come in
//! frames that opened under its round key (a NaN part, a wrong size or
//! order, another schema, a bad weight, a broken protocol, NaN averages
//! from a reducer). Silence, slowness and dropped connections do not: an
//! honest peer on a bad link shows them too, and a third party can cause
//! them.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use crate::error::PeerFault;

/// First ban; each further offence doubles it, up to [`MAX_BAN`].
pub(crate) const FIRST_BAN: Duration = Duration::from_secs(60);
/// Longest ban.
pub(crate) const MAX_BAN: Duration = Duration::from_secs(3600);
/// Peers remembered at once (the soonest to expire are forgotten first).
const MAX_ENTRIES: usize = 4096;

/// One banned peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Ban {
    /// The peer id.
    pub peer: Vec<u8>,
    /// The fault that earned the latest ban.
    pub reason: PeerFault,
    /// Offences so far.
    pub strikes: u32,
    /// How long the latest ban lasts.
    pub duration: Duration,
    /// When it ends.
    pub until: Instant,
}

/// Whether `fault` proves misbehaviour by the peer itself.
pub(crate) fn provable(fault: &PeerFault) -> bool {
    matches!(
        fault,
        PeerFault::NonFinite { .. }
            | PeerFault::WrongPartSize { .. }
            | PeerFault::UnexpectedPart { .. }
            | PeerFault::BadSchemaHash
            | PeerFault::BadWeight { .. }
            | PeerFault::ProtocolViolation { .. }
    )
}

/// The bans of one averager.
#[derive(Debug, Default)]
pub(crate) struct BanList {
    entries: HashMap<Vec<u8>, Ban>,
}

impl BanList {
    /// Ban `peer` for `reason` (a longer ban if it was banned before);
    /// returns the ban.
    pub(crate) fn ban(&mut self, peer: &[u8], reason: PeerFault, now: Instant) -> Ban {
        if !self.entries.contains_key(peer)
            && self.entries.len() >= MAX_ENTRIES
            && let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, b)| b.until)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&k);
        }
        let strikes = self.entries.get(peer).map_or(0, |b| b.strikes) + 1;
        let duration = FIRST_BAN
            .saturating_mul(1u32 << (strikes - 1).min(16))
            .min(MAX_BAN);
        let ban = Ban {
            peer: peer.to_vec(),
            reason,
            strikes,
            duration,
            until: now + duration,
        };
        self.entries.insert(peer.to_vec(), ban.clone());
        ban
    }

    /// The peers banned at `now`. Entries stay (for the strike count) a
    /// [`MAX_BAN`] past their end, then go.
    pub(crate) fn banned(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.entries.retain(|_, b| b.until + MAX_BAN > now);
        self.entries
            .values()
            .filter(|b| b.until > now)
            .map(|b| b.peer.clone())
            .collect()
    }

    /// Every ban still in force.
    pub(crate) fn active(&self, now: Instant) -> Vec<Ban> {
        self.entries
            .values()
            .filter(|b| b.until > now)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provable_faults_ban_with_backoff_and_bans_end() {
        let mut list = BanList::default();
        let t0 = Instant::now();
        let fault = PeerFault::NonFinite { part: 0 };
        assert!(provable(&fault));
        assert!(!provable(&PeerFault::Stalled {
            timeout: Duration::from_secs(1)
        }));
        assert!(!provable(&PeerFault::TooSlow {
            delivered: 0,
            parts: 1,
            budget: Duration::from_secs(1)
        }));
        let first = list.ban(b"liar", fault.clone(), t0);
        assert_eq!((first.strikes, first.duration), (1, FIRST_BAN));
        assert_eq!(
            list.banned(t0 + Duration::from_secs(1)),
            vec![b"liar".to_vec()]
        );
        // Over after a minute, remembered for the next offence.
        let later = t0 + FIRST_BAN + Duration::from_secs(1);
        assert!(list.banned(later).is_empty());
        let second = list.ban(b"liar", fault.clone(), later);
        assert_eq!((second.strikes, second.duration), (2, 2 * FIRST_BAN));
        for _ in 0..20 {
            list.ban(b"liar", fault.clone(), later);
        }
        assert_eq!(list.active(later)[0].duration, MAX_BAN);
        // Forgotten a MAX_BAN after the last ban ends.
        assert!(
            list.banned(later + 2 * MAX_BAN + Duration::from_secs(1))
                .is_empty()
        );
        assert!(list.entries.is_empty());
    }
}
