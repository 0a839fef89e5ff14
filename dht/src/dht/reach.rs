//! Reaching peers behind NAT from the handle: the circuits a NATed node
//! listens through are published in the DHT under a key only it can sign
//! for, looked up when a peer is in no routing table, and dialed; a relayed
//! peer's hole punch is given a moment before a stream settles for the relay.

use std::time::Duration;

use colony_schema::OwnerKey;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use super::{Dht, LOCAL_TIMEOUT, REPLY_MARGIN, read};
use crate::{
    error::DhtError,
    node::{Command, PeerPath},
    owner::peer_id_of_owner,
    time::dht_time,
    value::DhtValue,
};

/// How long a published circuit list lives; it is refreshed well before.
pub(super) const RELAY_RECORD_TTL: f64 = 120.0;
/// The longest the publisher waits between refreshes.
const PUBLISH_REFRESH: Duration = Duration::from_secs(40);
/// At most this many circuit addresses are read from one peer's record.
const MAX_RELAY_ADDRS: usize = 8;

/// The DHT key under which `peer` publishes the relay circuits it can be
/// reached through (subkey: its owner marker, so only it can write there).
pub fn relay_addrs_key(peer: &PeerId) -> Vec<u8> {
    format!("_colony.relay_addrs.{peer}").into_bytes()
}

impl Dht {
    /// The relay circuits this node can be reached through, each ending in
    /// `/p2p-circuit/p2p/<own id>` (empty unless it is in client mode and a
    /// relay accepted its reservation).
    pub fn relay_addrs(&self) -> Vec<Multiaddr> {
        read(&self.inner.relay_addrs)
    }

    /// Waits until this node listens through a relay (a relay accepted its
    /// reservation), at most `within`; returns the circuits (empty: none).
    /// Only a client-mode node asks relays for reservations. Returns at once
    /// when no connected peer serves as a relay (identify told which do).
    pub async fn wait_for_relay(&self, within: Duration) -> Vec<Multiaddr> {
        let candidates = self
            .request("relay_candidates", LOCAL_TIMEOUT, |reply| {
                Command::RelayCandidates { reply }
            })
            .await
            .unwrap_or(0);
        if candidates == 0 {
            return self.relay_addrs();
        }
        let mut changed = self.inner.relay_addrs_changed.clone();
        let _ = tokio::time::timeout(within, async {
            while self.relay_addrs().is_empty() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.relay_addrs()
    }

    /// This node's own addresses that AutoNAT confirmed: a peer dialed each
    /// back on a fresh connection.
    pub fn confirmed_addrs(&self) -> Vec<Multiaddr> {
        read(&self.inner.confirmed_addrs)
    }

    /// Whether other peers can open connections to this node: it serves the
    /// DHT (so it is reachable), or it listens through a relay.
    pub fn is_dialable(&self) -> bool {
        !self.is_client() || !self.relay_addrs().is_empty()
    }

    /// Every peer this node has been connected to, with the best path it
    /// had to it (direct, hole-punched or relayed).
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn paths(&self) -> Result<Vec<(PeerId, PeerPath)>, DhtError> {
        self.request("paths", LOCAL_TIMEOUT, |reply| Command::Paths { reply })
            .await
    }

    /// How this node reaches `peer` now (`None`: not connected). When the
    /// only connection goes through a relay and its hole punch has not
    /// reported yet, waits for it (at most `hole_punch_wait`).
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn path_to(&self, peer: PeerId) -> Result<Option<PeerPath>, DhtError> {
        self.request("path_to", LOCAL_TIMEOUT, |reply| Command::PreparePath {
            peer,
            reply,
        })
        .await
    }

    /// Connects to `peer` through the relay circuits it published: the way
    /// to a peer behind NAT, which no routing table holds. Returns whether
    /// a connection is up.
    pub(super) async fn connect_through_relays(&self, peer: PeerId) -> Result<bool, DhtError> {
        let mut addrs = self.lookup_relay_addrs(peer).await?;
        if addrs.is_empty() {
            return Ok(false);
        }
        // Circuits through relays whose circuits failed lately only if no
        // other is published.
        let suspects = read(&self.inner.suspect_relays);
        let trusted =
            |a: &Multiaddr| !crate::node::relay_of(a).is_some_and(|r| suspects.contains(&r));
        if addrs.iter().any(trusted) {
            addrs.retain(trusted);
        }
        tracing::debug!(%peer, ?addrs, "dialing a peer through its relays");
        let timeout = self.inner.query_timeout + REPLY_MARGIN;
        self.request("dial", timeout, |reply| Command::Dial {
            peer,
            addrs,
            reply,
        })
        .await?;
        Ok(self.path_to(peer).await?.is_some())
    }

    /// The circuit addresses `peer` published, checked: signed by `peer`
    /// itself (the owner marker of the subkey is its key), each a circuit
    /// ending at `peer`.
    async fn lookup_relay_addrs(&self, peer: PeerId) -> Result<Vec<Multiaddr>, DhtError> {
        let budget = self.inner.query_timeout / 4;
        let Some(value) = self
            .get_within(&relay_addrs_key(&peer), false, budget)
            .await?
        else {
            return Ok(Vec::new());
        };
        let DhtValue::Dictionary(entries) = value else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (subkey, entry) in entries {
            let owner = OwnerKey::find_in(&subkey).ok().flatten();
            if owner.and_then(|o| peer_id_of_owner(&o).ok()) != Some(peer) {
                tracing::debug!(%peer, "ignoring relay addresses not signed by the peer itself");
                continue;
            }
            if entry.value == [0xc0] {
                // Withdrawn: the peer left.
                continue;
            }
            let Ok(list) = rmp_serde::from_slice::<Vec<String>>(&entry.value) else {
                tracing::warn!(%peer, "malformed relay address record");
                continue;
            };
            for text in list.into_iter().take(MAX_RELAY_ADDRS) {
                match text.parse::<Multiaddr>() {
                    Ok(addr) if is_circuit_to(&addr, peer) => out.push(addr),
                    _ => {
                        tracing::warn!(%peer, address = %text, "ignoring a published relay address that is not a circuit to this peer")
                    }
                }
            }
        }
        out.truncate(MAX_RELAY_ADDRS);
        Ok(out)
    }

    /// Withdraws this node's relay circuits on the way out, so that peers
    /// stop dialing circuits that lead nowhere. Bounded by `within`.
    pub(super) async fn withdraw_relay_addrs(&self, within: Duration) {
        if self.relay_addrs().is_empty() {
            return;
        }
        let key = relay_addrs_key(&self.peer_id());
        let expiration = dht_time() + RELAY_RECORD_TTL;
        let subkey = self.owner_subkey();
        let store = self.store(&key, Some(&subkey), vec![0xc0], expiration);
        let _ = tokio::time::timeout(within, store).await;
    }
}

/// `addr` is `…/p2p/<relay>/p2p-circuit/p2p/<peer>`.
fn is_circuit_to(addr: &Multiaddr, peer: PeerId) -> bool {
    let parts: Vec<Protocol<'_>> = addr.iter().collect();
    matches!(
        parts.as_slice(),
        [.., Protocol::P2p(relay), Protocol::P2pCircuit, Protocol::P2p(target)]
            if *target == peer && *relay != peer
    )
}

/// Keeps this node's relay circuits published while it has any; stops when
/// the node stops (`shutdown` withdraws them).
pub(super) fn publish_relay_addrs(
    dht: std::sync::Weak<super::Inner>,
    mut changed: tokio::sync::watch::Receiver<u64>,
) {
    tokio::spawn(async move {
        let mut published: Vec<Multiaddr> = Vec::new();
        let mut at = tokio::time::Instant::now();
        loop {
            // Wake on a change, or to refresh; a store that failed is
            // retried at the next refresh.
            if let Ok(Err(_)) = tokio::time::timeout(PUBLISH_REFRESH / 4, changed.changed()).await {
                return;
            }
            let Some(inner) = dht.upgrade() else { return };
            let dht = Dht { inner };
            if dht.inner.commands.is_closed() {
                return;
            }
            let addrs = dht.relay_addrs();
            let due = at.elapsed() >= PUBLISH_REFRESH;
            if addrs.is_empty() || (addrs == published && !due) {
                continue;
            }
            let value: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            let Ok(bytes) = rmp_serde::to_vec(&value) else {
                continue;
            };
            let key = relay_addrs_key(&dht.peer_id());
            let subkey = dht.owner_subkey();
            match dht
                .store(&key, Some(&subkey), bytes, dht_time() + RELAY_RECORD_TTL)
                .await
            {
                Ok(outcome) => {
                    tracing::debug!(replicas = outcome.replicas, "published relay addresses");
                    published = addrs;
                    at = tokio::time::Instant::now();
                }
                Err(error) => tracing::warn!(%error, "cannot publish relay addresses"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_circuits_to_the_peer_itself_are_accepted() {
        let peer = PeerId::random();
        let relay = PeerId::random();
        let ok: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{peer}")
            .parse()
            .unwrap();
        assert!(is_circuit_to(&ok, peer));
        for bad in [
            format!("/ip4/10.0.0.1/tcp/1/p2p/{peer}"),
            format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{relay}"),
            format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit"),
            format!("/ip4/10.0.0.1/tcp/1/p2p/{peer}/p2p-circuit/p2p/{peer}"),
        ] {
            assert!(!is_circuit_to(&bad.parse().unwrap(), peer), "{bad}");
        }
    }
}
