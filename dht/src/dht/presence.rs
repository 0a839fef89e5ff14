//! One identity, one node: every node publishes a presence record (a random
//! instance id, its start time and addresses) under a key only its identity
//! can sign, and reads it back before each refresh. Another instance that
//! keeps refreshing the same record is a second node running with the same
//! identity file, on another host (one host is covered by the file lock):
//! peers would mix the two up in routing tables and averaging groups. Both
//! sides learn of it; the one that started later is told it is the newer.

use std::{collections::HashMap, time::Duration};

use colony_schema::OwnerKey;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::Dht;
use crate::{owner::peer_id_of_owner, time::dht_time, value::DhtValue};

/// At most this many addresses are read from a presence record.
const MAX_PRESENCE_ADDRS: usize = 8;

/// The DHT key under which the node with identity `peer` publishes its
/// presence (subkey: its owner marker).
pub fn presence_key(peer: &PeerId) -> Vec<u8> {
    format!("_colony.presence.{peer}").into_bytes()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Presence {
    instance: u64,
    started: f64,
    addrs: Vec<String>,
}

/// Another node signs with this node's identity: two hosts were started
/// with the same identity file.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityConflict {
    /// The shared peer id.
    pub peer: PeerId,
    /// When the other node started (DHT time, seconds).
    pub other_started: f64,
    /// The addresses the other node advertises.
    pub other_addrs: Vec<Multiaddr>,
    /// This node started after the other one (ties broken by instance id):
    /// it is the one that should stop.
    pub this_is_newer: bool,
}

impl std::fmt::Display for IdentityConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<String> = self.other_addrs.iter().map(ToString::to_string).collect();
        write!(
            f,
            "another node is running with this identity (peer {}) at [{}]; give every node its own --identity file",
            self.peer,
            addrs.join(", ")
        )
    }
}

/// This process's presence, fixed at start.
pub(super) struct Own {
    pub(super) instance: u64,
    pub(super) started: f64,
}

impl Own {
    pub(super) fn new() -> Self {
        Self {
            instance: rand::random(),
            started: dht_time(),
        }
    }
}

impl Dht {
    /// A second node running with this node's identity, once one has been
    /// seen (checked every [`DhtConfig::identity_check_interval`](crate::DhtConfig::identity_check_interval)).
    pub fn identity_conflict(&self) -> Option<IdentityConflict> {
        self.inner.identity_conflict.borrow().clone()
    }

    /// Waits until a second node with this identity is seen; never returns
    /// while there is none (or after the node stopped).
    pub async fn identity_conflict_seen(&self) -> IdentityConflict {
        let mut rx = self.inner.identity_conflict.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The presence entries under this identity's key other than ours.
    async fn foreign_presences(&self) -> Vec<(Presence, f64)> {
        let key = presence_key(&self.peer_id());
        let budget = self.inner.query_timeout / 2;
        // The latest, not the first found: that would be this node's own
        // copy in its local storage.
        let Ok(Some(DhtValue::Dictionary(entries))) = self.get_within(&key, true, budget).await
        else {
            return Vec::new();
        };
        let me = self.peer_id();
        let mut out = Vec::new();
        for (subkey, entry) in entries {
            let owner = OwnerKey::find_in(&subkey).ok().flatten();
            if owner.and_then(|o| peer_id_of_owner(&o).ok()) != Some(me) {
                continue;
            }
            match rmp_serde::from_slice::<Presence>(&entry.value) {
                Ok(p) if p.instance != self.inner.own.instance => out.push((p, entry.expiration)),
                Ok(_) => {}
                // Withdrawn (nil) or not a presence record.
                Err(_) => {}
            }
        }
        out
    }

    async fn store_presence(&self, ttl: f64) {
        let value = Presence {
            instance: self.inner.own.instance,
            started: self.inner.own.started,
            addrs: self
                .advertised_addrs()
                .iter()
                .chain(self.relay_addrs().iter())
                .take(MAX_PRESENCE_ADDRS)
                .map(ToString::to_string)
                .collect(),
        };
        let Ok(bytes) = rmp_serde::to_vec(&value) else {
            return;
        };
        let key = presence_key(&self.peer_id());
        if let Err(error) = self
            .store(&key, Some(&self.owner_subkey()), bytes, dht_time() + ttl)
            .await
        {
            tracing::debug!(%error, "cannot publish this node's presence");
        }
    }
}

/// Whether a foreign presence is a live node: it started after this one
/// (so it is not a predecessor that crashed with its record still alive),
/// or it refreshed its record since it was last seen.
fn is_live(own_started: f64, p: &Presence, expiration: f64, seen: Option<f64>) -> bool {
    p.started > own_started || seen.is_some_and(|before| expiration > before)
}

/// Publishes this node's presence every `interval` (jittered) and reads the
/// record back before each refresh; reports a second live instance through
/// the handle's conflict watch. Stops when the node stops.
pub(super) fn watch_presence(dht: std::sync::Weak<super::Inner>, interval: Duration, seed: u64) {
    tokio::spawn(async move {
        // Instance id -> the expiration its record had when last seen.
        let mut seen: HashMap<u64, f64> = HashMap::new();
        let mut jitter = seed | 1;
        let ttl = 3.0 * interval.as_secs_f64();
        let mut first = true;
        loop {
            // xorshift: the first check after 0.1x to 1x the interval (nodes
            // started together do not all look up at once), later ones
            // after 0.75x to 1.25x (two instances do not refresh in lockstep).
            jitter ^= jitter << 13;
            jitter ^= jitter >> 7;
            jitter ^= jitter << 17;
            let u = (jitter % 1000) as f64 / 1000.0;
            let f = if first { 0.1 + 0.9 * u } else { 0.75 + 0.5 * u };
            first = false;
            tokio::time::sleep(interval.mul_f64(f)).await;
            let Some(inner) = dht.upgrade() else { return };
            let dht = Dht { inner };
            if dht.inner.commands.is_closed() {
                return;
            }
            // Read before storing: what is there now was stored since this
            // node's last refresh.
            for (p, expiration) in dht.foreign_presences().await {
                let before = seen.insert(p.instance, expiration);
                if !is_live(dht.inner.own.started, &p, expiration, before) {
                    continue;
                }
                let conflict = IdentityConflict {
                    peer: dht.peer_id(),
                    other_started: p.started,
                    other_addrs: p
                        .addrs
                        .iter()
                        .take(MAX_PRESENCE_ADDRS)
                        .filter_map(|a| a.parse().ok())
                        .collect(),
                    this_is_newer: (dht.inner.own.started, dht.inner.own.instance)
                        > (p.started, p.instance),
                };
                let changed = dht.inner.identity_conflict.send_if_modified(|c| {
                    let new = c.as_ref() != Some(&conflict);
                    *c = Some(conflict.clone());
                    new
                });
                if changed {
                    tracing::error!(
                        peer = %conflict.peer,
                        other_addrs = ?conflict.other_addrs,
                        this_is_newer = conflict.this_is_newer,
                        "{conflict}"
                    );
                }
            }
            dht.store_presence(ttl).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_predecessor_is_live_only_once_it_refreshes() {
        let old = Presence {
            instance: 1,
            started: 100.0,
            addrs: vec![],
        };
        // Started before us, first sighting: may be a crashed predecessor.
        assert!(!is_live(200.0, &old, 150.0, None));
        // Same expiration again: nobody refreshed it.
        assert!(!is_live(200.0, &old, 150.0, Some(150.0)));
        // Refreshed: alive.
        assert!(is_live(200.0, &old, 160.0, Some(150.0)));
        // Started after us: alive at first sight.
        let new = Presence {
            started: 300.0,
            ..old
        };
        assert!(is_live(200.0, &new, 150.0, None));
    }
}
