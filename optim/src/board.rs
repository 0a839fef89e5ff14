//! Where peers publish and read progress records: the [`ProgressBoard`] trait and its
//! implementation over `colony-dht` ([`DhtProgressBoard`]).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
};

use colony_dht::{Dht, DhtValue, SchemaRecordValidator};
use colony_schema::{Checked, OwnerKey, SchemaValidator, from_msgpack_strict, to_msgpack};
use tokio::sync::mpsc;
use validator::Validate;

use crate::{
    error::{OptimError, Result},
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

/// A place where peers publish their progress and read everyone's.
///
/// Implementations must be cheap to clone (handles) and authenticate records: a record
/// under a peer's key was written by that peer.
pub trait ProgressBoard: Clone + Send + Sync + 'static {
    /// This peer's subkey (its owner marker).
    fn self_key(&self) -> Vec<u8>;
    /// This peer's network id (put in its records for averaging and monitoring).
    fn peer_id(&self) -> String;
    /// The swarm's clock (Unix seconds).
    fn now(&self) -> f64;
    /// Publishes this peer's progress (`None`: a goodbye) until `expiration`.
    fn publish(
        &self,
        progress: Option<TrainingProgress>,
        expiration: f64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Reads every peer's latest record (own included).
    fn fetch(&self) -> impl Future<Output = Result<Vec<PeerRecord>>> + Send;
}

/// Records pushed over gossipsub, keyed by owner subkey: `(progress, expiration)`.
type PushedRecords = Arc<Mutex<BTreeMap<Vec<u8>, (Option<TrainingProgress>, f64)>>>;

/// [`ProgressBoard`] over a [`Dht`]: signed records under `{prefix}_progress` with this
/// node's owner subkey, checked against [`TrainingProgressSchema`] on every storing node
/// and reader; each publication is also pushed on the gossipsub topic
/// `{prefix}_progress` so that peers learn of it without waiting for their next poll.
///
/// A pushed record is accepted only if the gossip message was signed by the peer whose
/// owner key it claims (the libp2p identity key is the owner key), so nobody can push a
/// record for someone else.
#[derive(Debug, Clone)]
pub struct DhtProgressBoard {
    dht: Dht,
    key: String,
    pushed: PushedRecords,
    wake: Option<mpsc::Sender<()>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushedRecord {
    #[serde(with = "serde_bytes")]
    owner: Vec<u8>,
    progress: Option<TrainingProgress>,
    expiration: f64,
}

fn owner_of_source(owner: &[u8], source: Option<&colony_dht::PeerId>) -> Option<OwnerKey> {
    let bytes: [u8; 32] = owner.try_into().ok()?;
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(&bytes).ok()?;
    let peer = libp2p::identity::PublicKey::from(public).to_peer_id();
    (Some(&peer) == source).then(|| OwnerKey::from_bytes(bytes))
}

impl DhtProgressBoard {
    /// Installs the progress schema validator on `dht` for run `prefix` and subscribes to
    /// pushed records. `wake` (optional) is signalled whenever a pushed record arrives, so
    /// the optimizer can refresh its estimate at once.
    ///
    /// # Errors
    /// [`OptimError::Dht`] if the schema cannot be built or the subscription fails.
    pub async fn new(dht: Dht, prefix: &str, wake: Option<mpsc::Sender<()>>) -> Result<Self> {
        let schema =
            SchemaValidator::for_schema::<TrainingProgressSchema>(Some(prefix)).map_err(|e| {
                OptimError::Dht {
                    operation: "schema",
                    message: e.to_string(),
                }
            })?;
        dht.add_validator(Arc::new(SchemaRecordValidator::new(schema)));
        let key = format!("{prefix}_progress");
        let pushed: PushedRecords = Arc::default();
        let mut messages = dht.subscribe(&key).await.map_err(|e| OptimError::Dht {
            operation: "subscribe",
            message: e.to_string(),
        })?;
        let sink = Arc::downgrade(&pushed);
        let wake_task = wake.clone();
        tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                let Some(sink) = sink.upgrade() else { break };
                let Ok(record) = from_msgpack_strict::<PushedRecord>(&message.data) else {
                    tracing::debug!(source = ?message.source, "undecodable pushed progress");
                    continue;
                };
                let Some(owner) = owner_of_source(&record.owner, message.source.as_ref()) else {
                    tracing::warn!(source = ?message.source, "pushed progress for a foreign owner");
                    continue;
                };
                if record
                    .progress
                    .as_ref()
                    .is_some_and(|p| p.validate().is_err())
                {
                    tracing::warn!(source = ?message.source, "pushed progress fails validation");
                    continue;
                }
                {
                    let mut map = sink
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let entry = map
                        .entry(owner.marker())
                        .or_insert((None, f64::NEG_INFINITY));
                    if record.expiration > entry.1 {
                        *entry = (record.progress, record.expiration);
                    }
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
            wake,
        })
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
            Some(p) => to_msgpack(p).map_err(|e| OptimError::Dht {
                operation: "encode",
                message: e.to_string(),
            })?,
            None => vec![0xc0],
        };
        let subkey = self.self_key();
        self.dht
            .store(self.key.as_bytes(), Some(&subkey), value, expiration)
            .await
            .map_err(|e| OptimError::Dht {
                operation: "store progress",
                message: e.to_string(),
            })?;
        let push = PushedRecord {
            owner: self.dht.public_key().to_vec(),
            progress,
            expiration,
        };
        if let Ok(bytes) = to_msgpack(&push) {
            // Nobody subscribed yet (a lone peer) is not an error worth reporting.
            if let Err(e) = self.dht.publish(&self.key, bytes).await {
                tracing::debug!(error = %e, "progress push not delivered");
            }
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Vec<PeerRecord>> {
        let found = self
            .dht
            .get(self.key.as_bytes(), true)
            .await
            .map_err(|e| OptimError::Dht {
                operation: "get progress",
                message: e.to_string(),
            })?;
        let mut merged: BTreeMap<Vec<u8>, (Option<TrainingProgress>, f64)> = BTreeMap::new();
        if let Some(DhtValue::Dictionary(entries)) = found {
            for (subkey, entry) in entries {
                // The DHT already validated the schema; a value that still fails to decode
                // strictly counts as a goodbye.
                let progress =
                    from_msgpack_strict::<Option<Checked<TrainingProgress>>>(&entry.value)
                        .ok()
                        .flatten()
                        .map(Checked::into_inner);
                merged.insert(subkey, (progress, entry.expiration));
            }
        }
        {
            let now = self.now();
            let mut pushed = self
                .pushed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pushed.retain(|_, (_, exp)| *exp > now);
            for (subkey, (progress, expiration)) in pushed.iter() {
                let newer = merged.get(subkey).is_none_or(|(_, e)| expiration > e);
                if newer {
                    merged.insert(subkey.clone(), (progress.clone(), *expiration));
                }
            }
        }
        Ok(merged
            .into_iter()
            .map(|(key, (progress, expiration))| PeerRecord {
                key,
                progress,
                expiration,
            })
            .collect())
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

    #[test]
    fn pushed_records_must_come_from_their_owner() {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let ed = keypair.public().try_into_ed25519().unwrap().to_bytes();
        assert!(owner_of_source(&ed, Some(&peer)).is_some());
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert!(owner_of_source(&ed, Some(&other)).is_none());
        assert!(owner_of_source(&ed, None).is_none());
        assert!(owner_of_source(&ed[..5], Some(&peer)).is_none());
    }
}
