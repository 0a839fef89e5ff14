//! [`DhtProgressBoard`]: the [`ProgressBoard`] over `colony-dht`, and the schema of its
//! records ([`TrainingProgressSchema`]).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use colony_dht::{Dht, DhtValue, GossipMessage, LatestPerOwner, SchemaRecordValidator};
use colony_schema::{Checked, OwnerKey, SchemaValidator, from_msgpack_strict, to_msgpack};
use tokio::sync::mpsc;
use validator::Validate;

use crate::{
    error::{ErrorChain, OptimError, Result},
    ports::ProgressBoard,
    progress::TrainingProgress,
    tracker::PeerRecord,
};

/// The schema of this crate's DHT records: one dictionary `{prefix}_progress` mapping
/// an owner subkey to a peer's [`TrainingProgress`] (or nil, a goodbye).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize, Validate)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingProgressSchema {
    /// Progress per peer, keyed by the peer's owner key.
    pub progress: BTreeMap<OwnerKey, Option<Checked<TrainingProgress>>>,
}

/// Records pushed over gossipsub: the latest per owner, later expiration wins, at most
/// [`MAX_PUSHED_OWNERS`] owners.
type PushedRecords = Arc<Mutex<LatestPerOwner<Option<TrainingProgress>>>>;

/// Owners whose pushed record is kept at once. Identities are free: a flood of pushes
/// from distinct ones replaces the records that expire first and never grows the map.
/// Pushes only speed up what the next fetch of the DHT dictionary (bounded by the
/// record size) brings anyway.
pub(crate) const MAX_PUSHED_OWNERS: usize = 1024;

/// A pushed record may live at most this long from now (s) unless
/// [`DhtProgressBoard::with_push_ttl`] says otherwise; honest records live
/// `metadata_expiration`.
pub(crate) const DEFAULT_PUSH_TTL: f64 = 90.0;

/// [`ProgressBoard`] over a [`Dht`]: signed records under `{prefix}_progress` with this
/// node's owner subkey, checked against [`TrainingProgressSchema`] on every storing node
/// and reader; each publication is also pushed on the gossipsub topic
/// `{prefix}_progress` so that peers learn of it without waiting for their next poll.
///
/// A pushed record is accepted only if the gossip message was signed by the peer whose
/// owner key it claims (the libp2p identity key is the owner key), so nobody can push a
/// record for someone else. A record, fetched or pushed, whose `peer_id` is not the peer
/// id of its owner key is dropped with a warning, so nobody can claim another's identity.
#[derive(Debug, Clone)]
pub struct DhtProgressBoard {
    dht: Dht,
    key: String,
    pushed: PushedRecords,
    /// Longest lifetime a pushed record may claim (s, as `f64` bits).
    push_ttl: Arc<std::sync::atomic::AtomicU64>,
    wake: Option<mpsc::Sender<()>>,
    fetch_budget: Duration,
    /// Set once a fetch returned another peer's record: from then on, no
    /// connection at all means this peer lost the swarm.
    saw_others: Arc<std::sync::atomic::AtomicBool>,
}

/// How long a fetch waits for replicas by default (see
/// `DhtProgressBoard::with_fetch_budget`).
pub(crate) const DEFAULT_FETCH_BUDGET: Duration = Duration::from_secs(2);

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushedRecord {
    #[serde(with = "serde_bytes")]
    owner: Vec<u8>,
    progress: Option<TrainingProgress>,
    expiration: f64,
}

/// Whether `progress` (if any: a goodbye names nobody) was made by `owner`: its
/// `peer_id` must be the peer id of the owner key. A record that lies about it is
/// dropped, so nobody can point averaging or monitoring at another peer.
fn names_its_owner(owner: &OwnerKey, progress: Option<&TrainingProgress>) -> bool {
    let Some(progress) = progress else {
        return true;
    };
    let matches =
        colony_dht::peer_id_of_owner(owner).is_ok_and(|peer| peer.to_base58() == progress.peer_id);
    if !matches {
        tracing::warn!(
            %owner,
            claimed = %progress.peer_id,
            "progress record names a peer id that is not its owner's; dropped"
        );
    }
    matches
}

/// Decodes a pushed record and keeps it only if the message's source owns it, it
/// validates, it names its owner's peer id and it expires no later than
/// `max_expiration`.
pub(crate) fn accept_pushed(
    message: &GossipMessage,
    max_expiration: f64,
) -> Option<(OwnerKey, Option<TrainingProgress>, f64)> {
    let Ok(record) = from_msgpack_strict::<PushedRecord>(&message.data) else {
        tracing::debug!(source = ?message.source, "undecodable pushed progress");
        return None;
    };
    let owner = <[u8; 32]>::try_from(record.owner.as_slice())
        .ok()
        .map(OwnerKey::from_bytes)
        .filter(|owner| message.is_from_owner(owner));
    let Some(owner) = owner else {
        tracing::warn!(source = ?message.source, "pushed progress for a foreign owner");
        return None;
    };
    if record
        .progress
        .as_ref()
        .is_some_and(|p| p.validate().is_err())
    {
        tracing::warn!(source = ?message.source, "pushed progress fails validation");
        return None;
    }
    if record.expiration.is_nan() || record.expiration > max_expiration {
        tracing::warn!(
            source = ?message.source,
            expiration = record.expiration,
            max_expiration,
            "pushed progress claims a lifetime longer than records live"
        );
        return None;
    }
    names_its_owner(&owner, record.progress.as_ref()).then_some((
        owner,
        record.progress,
        record.expiration,
    ))
}

/// Offers a pushed message's record to the map if it is acceptable; whether it was
/// kept (a newer record of its owner, or one that outlives the earliest held).
fn take_push(
    map: &mut LatestPerOwner<Option<TrainingProgress>>,
    message: &GossipMessage,
    max_expiration: f64,
) -> bool {
    accept_pushed(message, max_expiration)
        .is_some_and(|(owner, progress, expiration)| map.offer(owner, progress, expiration))
}

impl DhtProgressBoard {
    /// Installs the progress schema validator on `dht` for run `prefix` and subscribes to
    /// pushed records. `wake` (optional) is signalled whenever a pushed record arrives, so
    /// the optimizer can refresh its estimate at once.
    ///
    /// # Errors
    /// [`OptimError::Schema`] if the schema cannot be built, [`OptimError::Dht`] if the
    /// subscription fails.
    pub async fn new(dht: Dht, prefix: &str, wake: Option<mpsc::Sender<()>>) -> Result<Self> {
        let schema = SchemaValidator::for_schema::<TrainingProgressSchema>(Some(prefix)).map_err(
            |source| OptimError::Schema {
                op: "build the progress schema",
                source,
            },
        )?;
        dht.add_validator(Arc::new(SchemaRecordValidator::new(schema)));
        let key = format!("{prefix}_progress");
        let pushed: PushedRecords =
            Arc::new(Mutex::new(LatestPerOwner::with_limit(MAX_PUSHED_OWNERS)));
        let push_ttl = Arc::new(std::sync::atomic::AtomicU64::new(
            DEFAULT_PUSH_TTL.to_bits(),
        ));
        let max_expiration = {
            let push_ttl = push_ttl.clone();
            move || {
                colony_dht::dht_time()
                    + f64::from_bits(push_ttl.load(std::sync::atomic::Ordering::Relaxed))
            }
        };
        let validate = max_expiration.clone();
        // Checked on the node before delivery or forwarding: a peer that pushes
        // records that fail here loses gossip score and is soon ignored.
        let validator: colony_dht::GossipValidator =
            Arc::new(move |message| accept_pushed(message, validate()).is_some());
        let mut messages = dht
            .subscribe_validated(&key, validator)
            .await
            .map_err(OptimError::dht("subscribe to progress pushes"))?;
        let sink = Arc::downgrade(&pushed);
        let wake_task = wake.clone();
        tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                let Some(sink) = sink.upgrade() else { break };
                let Ok(mut map) = sink.lock() else {
                    tracing::error!("pushed-progress map poisoned; no longer accepting pushes");
                    break;
                };
                let kept = take_push(&mut map, &message, max_expiration());
                drop(map);
                if !kept {
                    continue;
                }
                if let Some(wake) = &wake_task {
                    // A full channel already holds a wake-up; dropping this one is fine.
                    let _ = wake.try_send(());
                }
            }
        });
        Ok(Self {
            dht,
            key,
            pushed,
            push_ttl,
            wake,
            fetch_budget: DEFAULT_FETCH_BUDGET,
            saw_others: Arc::default(),
        })
    }

    /// A fetch answers within `budget` with the replicas that answered by then
    /// (merged with pushed records), instead of waiting out the DHT's query
    /// timeout for a replica that vanished mid-run. Default 2 s.
    #[must_use]
    pub fn with_fetch_budget(mut self, budget: Duration) -> Self {
        self.fetch_budget = budget;
        self
    }

    /// Pushed records claiming to live longer than `ttl` seconds from now are refused
    /// (and cost the pushing peer gossip score). Set it to the run's
    /// `metadata_expiration` plus the clock skew allowed; default 90 s.
    #[must_use]
    pub fn with_push_ttl(self, ttl: f64) -> Self {
        self.push_ttl
            .store(ttl.to_bits(), std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// How many owners have a pushed record held right now (at most
    /// [`MAX_PUSHED_OWNERS`]).
    pub fn pushed_owners(&self) -> usize {
        self.pushed.lock().map_or(0, |m| m.len())
    }

    /// The DHT handle.
    pub fn dht(&self) -> &Dht {
        &self.dht
    }
}

impl ProgressBoard for DhtProgressBoard {
    fn self_key(&self) -> Vec<u8> {
        self.dht.owner_subkey()
    }

    fn peer_id(&self) -> String {
        self.dht.peer_id().to_base58()
    }

    fn now(&self) -> f64 {
        colony_dht::dht_time()
    }

    async fn publish(&self, progress: Option<TrainingProgress>, expiration: f64) -> Result<()> {
        let value = match &progress {
            Some(p) => to_msgpack(p).map_err(|source| OptimError::Schema {
                op: "encode a progress record",
                source,
            })?,
            None => vec![0xc0],
        };
        let subkey = self.self_key();
        self.dht
            .store(self.key.as_bytes(), Some(&subkey), value, expiration)
            .await
            .map_err(OptimError::dht("store progress"))?;
        let push = PushedRecord {
            owner: self.dht.public_key().to_vec(),
            progress,
            expiration,
        };
        if let Ok(bytes) = to_msgpack(&push) {
            // Nobody subscribed yet (a lone peer) is not an error worth reporting.
            if let Err(e) = self.dht.publish(&self.key, bytes).await {
                tracing::debug!(error = %ErrorChain(&e), "progress push not delivered");
            }
        }
        Ok(())
    }

    async fn is_isolated(&self) -> bool {
        if !self.saw_others.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        matches!(self.dht.stats().await, Ok(stats) if stats.connected_peers == 0)
    }

    async fn fetch(&self) -> Result<Vec<PeerRecord>> {
        let found = self
            .dht
            .get_within(self.key.as_bytes(), true, self.fetch_budget)
            .await
            .map_err(OptimError::dht("get progress"))?;
        let mut merged = LatestPerOwner::new();
        if let Some(DhtValue::Dictionary(entries)) = found {
            for (subkey, entry) in entries {
                // The schema validator requires an owner marker in every subkey.
                let Ok(owner) = OwnerKey::require_in(&subkey) else {
                    continue;
                };
                // The DHT already validated the schema; a value that still fails to decode
                // strictly counts as a goodbye.
                let progress =
                    from_msgpack_strict::<Option<Checked<TrainingProgress>>>(&entry.value)
                        .ok()
                        .flatten()
                        .map(Checked::into_inner);
                if names_its_owner(&owner, progress.as_ref()) {
                    merged.offer(owner, progress, entry.expiration);
                }
            }
        }
        {
            let mut pushed = self.pushed.lock().map_err(|_| OptimError::Internal {
                what: "the pushed-progress map was poisoned by a panic",
            })?;
            pushed.prune(self.now());
            for (owner, progress, expiration) in pushed.iter() {
                merged.offer(*owner, progress.clone(), expiration);
            }
        }
        let records: Vec<PeerRecord> = merged
            .into_iter()
            .map(|(owner, progress, expiration)| PeerRecord {
                key: owner.marker(),
                progress,
                expiration,
            })
            .collect();
        let me = self.self_key();
        if records.iter().any(|r| r.key != me && r.progress.is_some()) {
            self.saw_others
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(records)
    }
}

impl DhtProgressBoard {
    /// Asks the optimizer that owns the wake channel to refresh (used after shutdown of a
    /// peer is noticed); a no-op without a channel.
    pub fn wake(&self) {
        if let Some(w) = &self.wake {
            let _ = w.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrainingProgress {
        TrainingProgress {
            peer_id: "p".into(),
            step: 1,
            samples_accumulated: 2,
            samples_per_second: 3.0,
            time: 4.0,
            client_mode: false,
        }
    }

    #[test]
    fn schema_accepts_records_and_goodbyes_and_rejects_absurd_values() {
        let v = SchemaValidator::for_schema::<TrainingProgressSchema>(Some("run")).unwrap();
        let subkey = OwnerKey::from_bytes([7; 32]).marker();
        let good = to_msgpack(&sample()).unwrap();
        v.validate(b"run_progress", Some(&subkey), &good).unwrap();
        v.validate(b"run_progress", Some(&subkey), &[0xc0]).unwrap();
        let bad = to_msgpack(&TrainingProgress {
            samples_per_second: 1e12,
            ..sample()
        })
        .unwrap();
        assert!(v.validate(b"run_progress", Some(&subkey), &bad).is_err());
        // Negative step: encode by hand as the struct cannot hold one.
        #[derive(serde::Serialize)]
        struct Negative {
            peer_id: String,
            step: i64,
            samples_accumulated: u64,
            samples_per_second: f64,
            time: f64,
            client_mode: bool,
        }
        let neg = to_msgpack(&Negative {
            peer_id: "p".into(),
            step: -1,
            samples_accumulated: 0,
            samples_per_second: 0.0,
            time: 1.0,
            client_mode: false,
        })
        .unwrap();
        assert!(v.validate(b"run_progress", Some(&subkey), &neg).is_err());
        // A subkey without an owner marker is refused.
        assert!(v.validate(b"run_progress", Some(b"anyone"), &good).is_err());
    }

    fn pushed(secret: u8, source: Option<u8>, progress: Option<TrainingProgress>) -> GossipMessage {
        let owner = colony_dht::owner_key_from_secret([secret; 32]);
        let data = to_msgpack(&PushedRecord {
            owner: owner.as_bytes().to_vec(),
            progress,
            expiration: 100.0,
        })
        .unwrap();
        GossipMessage {
            topic: "run_progress".into(),
            source: source.map(peer_of),
            data,
        }
    }

    fn peer_of(secret: u8) -> colony_dht::PeerId {
        colony_dht::peer_id_of_owner(&colony_dht::owner_key_from_secret([secret; 32])).unwrap()
    }

    fn honest(secret: u8) -> TrainingProgress {
        TrainingProgress {
            peer_id: peer_of(secret).to_base58(),
            ..sample()
        }
    }

    fn accept_pushed_at(
        message: &GossipMessage,
    ) -> Option<(OwnerKey, Option<TrainingProgress>, f64)> {
        accept_pushed(message, 1000.0)
    }

    #[test]
    fn a_pushed_record_that_outlives_records_is_refused() {
        let message = pushed(1, Some(1), Some(honest(1)));
        assert!(accept_pushed(&message, 100.0).is_some());
        assert!(accept_pushed(&message, 99.0).is_none());
        let mut nan = message.clone();
        nan.data = to_msgpack(&PushedRecord {
            owner: colony_dht::owner_key_from_secret([1; 32])
                .as_bytes()
                .to_vec(),
            progress: None,
            expiration: f64::NAN,
        })
        .unwrap();
        assert!(accept_pushed(&nan, 1e300).is_none());
    }

    #[test]
    fn a_hundred_thousand_pushes_from_distinct_identities_keep_the_map_bounded() {
        let mut map = LatestPerOwner::with_limit(MAX_PUSHED_OWNERS);
        // An honest record that lives longer than the flood's records.
        let mut honest_push = pushed(1, Some(1), Some(honest(1)));
        honest_push.data = to_msgpack(&PushedRecord {
            owner: colony_dht::owner_key_from_secret([1; 32])
                .as_bytes()
                .to_vec(),
            progress: Some(honest(1)),
            expiration: 200.0,
        })
        .unwrap();
        assert!(take_push(&mut map, &honest_push, 1000.0));
        let started = std::time::Instant::now();
        let mut kept = 0;
        for i in 0..100_000u32 {
            let mut secret = [9u8; 32];
            secret[..4].copy_from_slice(&i.to_le_bytes());
            let owner = colony_dht::owner_key_from_secret(secret);
            let peer = colony_dht::peer_id_of_owner(&owner).unwrap();
            let message = GossipMessage {
                topic: "run_progress".into(),
                source: Some(peer),
                data: to_msgpack(&PushedRecord {
                    owner: owner.as_bytes().to_vec(),
                    progress: Some(TrainingProgress {
                        peer_id: peer.to_base58(),
                        ..sample()
                    }),
                    // Later and later expirations, up to the lifetime allowed.
                    expiration: 100.0 + f64::from(i % 100),
                })
                .unwrap(),
            };
            kept += usize::from(take_push(&mut map, &message, 1000.0));
            assert!(map.len() <= MAX_PUSHED_OWNERS);
        }
        eprintln!(
            "100000 pushes from distinct identities: {kept} kept at some point, map holds {} \
             (limit {MAX_PUSHED_OWNERS}), {:.2} s",
            map.len(),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(map.len(), MAX_PUSHED_OWNERS);
        // The honest record outlives every flood record, so it was never evicted.
        let honest_owner = colony_dht::owner_key_from_secret([1; 32]);
        assert_eq!(map.get(&honest_owner).map(|(_, e)| e), Some(200.0));
    }

    #[test]
    fn pushed_records_must_come_from_their_owner() {
        let (owner, progress, expiration) =
            accept_pushed_at(&pushed(1, Some(1), Some(honest(1)))).unwrap();
        assert_eq!(owner, colony_dht::owner_key_from_secret([1; 32]));
        assert_eq!((progress, expiration), (Some(honest(1)), 100.0));
        // Signed by someone else, or by nobody: refused.
        assert!(accept_pushed_at(&pushed(1, Some(2), Some(honest(1)))).is_none());
        assert!(accept_pushed_at(&pushed(1, None, Some(honest(1)))).is_none());
        // A goodbye from its owner is accepted; a truncated owner key is not.
        assert!(accept_pushed_at(&pushed(1, Some(1), None)).is_some());
        let mut short = pushed(1, Some(1), None);
        short.data = to_msgpack(&PushedRecord {
            owner: vec![1; 5],
            progress: None,
            expiration: 100.0,
        })
        .unwrap();
        assert!(accept_pushed_at(&short).is_none());
    }

    #[test]
    fn a_record_that_lies_about_its_peer_id_is_dropped() {
        // Peer 1 signs its own record but claims to be peer 2 (or someone made up).
        let lie = TrainingProgress {
            peer_id: peer_of(2).to_base58(),
            ..sample()
        };
        assert!(accept_pushed_at(&pushed(1, Some(1), Some(lie.clone()))).is_none());
        let owner = colony_dht::owner_key_from_secret([1; 32]);
        assert!(!names_its_owner(&owner, Some(&lie)));
        assert!(!names_its_owner(&owner, Some(&sample())));
        assert!(names_its_owner(&owner, Some(&honest(1))));
        assert!(names_its_owner(&owner, None), "a goodbye names nobody");
    }
}
