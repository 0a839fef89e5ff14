//! Inbound puts are decoded and their signatures checked on a worker thread,
//! not on the swarm task: the swarm task also answers lookups, and a flood of
//! large puts with forged signatures (each entry's ed25519 check hashes the
//! whole value) would otherwise queue every lookup behind it.
//!
//! One worker takes puts first in, first out, so results come back in the
//! order the puts arrived and a later put of an entry is stored after an
//! earlier one. The queue is bounded; a put that finds it full is dropped
//! unread and counted, as a put over its sender's rate is.

use std::sync::{Arc, RwLock, mpsc as std_mpsc};

use libp2p::PeerId;
use tokio::sync::mpsc;

use crate::{
    error::ValidationError,
    record::DhtRecord,
    time::dht_time,
    validation::{CompositeValidator, RecordLimits},
};

/// Puts waiting for the worker, at most (each at most one record's size).
pub(crate) const VERIFY_QUEUE: usize = 64;

/// A received put, for the worker.
struct Job {
    seq: u64,
    source: PeerId,
    key: Vec<u8>,
    bytes: Vec<u8>,
    /// The node's validator generation when the put arrived.
    generation: u64,
}

/// What the worker made of one put.
pub(crate) struct Verified {
    /// The put's place in arrival order.
    pub(crate) seq: u64,
    pub(crate) source: PeerId,
    pub(crate) key: Vec<u8>,
    /// Entries that passed the limits and the validators, still signed.
    pub(crate) accepted: Vec<DhtRecord>,
    /// Entries refused (a malformed record counts as one).
    pub(crate) rejected: u64,
    /// The validator generation the put was enqueued under: if a validator
    /// was added since, the node checks `accepted` again before storing.
    pub(crate) generation: u64,
}

/// The node's handle on its verification worker. Dropping it stops the
/// worker once the queue is drained.
pub(crate) struct Verifier {
    jobs: std_mpsc::SyncSender<Job>,
}

/// Why a put was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// [`VERIFY_QUEUE`] puts are already waiting.
    Full,
    /// The worker is gone (the node is shutting down).
    Stopped,
}

impl Verifier {
    /// Starts the worker thread; results arrive on the returned receiver.
    pub(crate) fn start(
        validators: Arc<RwLock<CompositeValidator>>,
        limits: RecordLimits,
    ) -> std::io::Result<(Self, mpsc::Receiver<Verified>)> {
        let (jobs, queue) = std_mpsc::sync_channel::<Job>(VERIFY_QUEUE);
        // One result per job at most in flight beyond the queue's own.
        let (results, verified) = mpsc::channel(VERIFY_QUEUE + 1);
        std::thread::Builder::new()
            .name("colony-dht-verify".into())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    let done = verify(&validators, limits, job);
                    if results.blocking_send(done).is_err() {
                        break;
                    }
                }
            })?;
        Ok((Self { jobs }, verified))
    }

    /// Queues a put without waiting.
    pub(crate) fn submit(
        &self,
        seq: u64,
        source: PeerId,
        key: Vec<u8>,
        bytes: Vec<u8>,
        generation: u64,
    ) -> Result<(), Refused> {
        let job = Job {
            seq,
            source,
            key,
            bytes,
            generation,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => Refused::Full,
            std_mpsc::TrySendError::Disconnected(_) => Refused::Stopped,
        })
    }
}

fn verify(validators: &RwLock<CompositeValidator>, limits: RecordLimits, job: Job) -> Verified {
    let validators = validators
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut rejected = 0;
    let source = job.source;
    let checked = limits.check_wire(&validators, &job.key, &job.bytes, dht_time(), |r, e| {
        rejected += 1;
        log_rejection(source, r, e, true);
    });
    let accepted = checked.unwrap_or_else(|error| {
        tracing::warn!(%source, key = %hex::encode(&job.key), %error, inbound = true, "dropping malformed record");
        rejected += 1;
        Vec::new()
    });
    Verified {
        seq: job.seq,
        source,
        key: job.key,
        accepted,
        rejected,
        generation: job.generation,
    }
}

pub(crate) fn log_rejection(
    source: PeerId,
    record: &DhtRecord,
    error: &ValidationError,
    inbound: bool,
) {
    tracing::warn!(
        %source,
        key = %String::from_utf8_lossy(&record.key),
        subkey = ?record.subkey.as_deref().map(String::from_utf8_lossy),
        %error,
        inbound,
        "rejected record"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;
    use crate::{RecordValidator, config::DhtConfig, record::WireEntry, record::encode_wire};

    /// Holds every check until opened.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn open(&self) {
            *self.open.lock().expect("gate") = true;
            self.opened.notify_all();
        }
    }

    struct Gated(Arc<Gate>);

    impl RecordValidator for Gated {
        fn validate(&self, _: &DhtRecord) -> Result<(), ValidationError> {
            let open = self.0.open.lock().expect("gate");
            let (_open, waited) = self
                .0
                .opened
                .wait_timeout_while(open, std::time::Duration::from_secs(30), |o| !*o)
                .expect("gate");
            assert!(!waited.timed_out(), "gate never opened");
            Ok(())
        }

        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn put(i: u8) -> Vec<u8> {
        encode_wire(&[WireEntry {
            subkey: None,
            value: serde_bytes::ByteBuf::from(vec![0xc0]),
            expiration: dht_time() + 60.0 + f64::from(i),
        }])
    }

    #[test]
    fn a_full_queue_refuses_and_results_come_back_in_arrival_order() {
        let gate = Arc::new(Gate::default());
        let mut validators = CompositeValidator::new();
        validators.extend(Arc::new(Gated(gate.clone())));
        let limits = RecordLimits::from_config(&DhtConfig::default());
        let (verifier, mut verified) =
            Verifier::start(Arc::new(RwLock::new(validators)), limits).expect("worker");
        let source = PeerId::random();
        // The worker takes the first and blocks on it; the queue then holds
        // VERIFY_QUEUE more, and the next is refused.
        let mut queued = 0u64;
        let mut refused = 0;
        for i in 0..VERIFY_QUEUE + 8 {
            match verifier.submit(queued, source, b"k".to_vec(), put(i as u8), 0) {
                Ok(()) => queued += 1,
                Err(Refused::Full) => refused += 1,
                Err(Refused::Stopped) => panic!("worker stopped"),
            }
        }
        assert!(refused >= 7, "refused {refused}");
        assert!(queued <= VERIFY_QUEUE as u64 + 1, "queued {queued}");
        gate.open();
        for seq in 0..queued {
            let done = verified.blocking_recv().expect("result");
            assert_eq!(done.seq, seq);
            assert_eq!(done.accepted.len(), 1);
            assert_eq!(done.rejected, 0);
        }
        drop(verifier);
        assert!(
            verified.blocking_recv().is_none(),
            "worker stops with its handle"
        );
    }
}
