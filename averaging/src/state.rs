//! State sharing among strangers: content-addressed, vouched for by several
//! donors, downloaded from all of them at once.
//!
//! A donor turns its state into a [`ServedState`] once, when it declares
//! it: the tensors' bytes (concatenated, little-endian `f32`) are cut into
//! chunks, each chunk is hashed, and the [`StateDescriptor`] (metadata,
//! tensor lengths, chunk size, chunk hashes) is hashed into the state's
//! *root*. The donor publishes the root in its signed DHT declaration; peers
//! that hold the same state (every member of a successful round does, bit
//! for bit) publish the same root, and a joiner installs a state only when
//! enough distinct donors vouch for its root (the averager decides how
//! many). Nothing a single donor says about its own state is believed: the
//! descriptor must hash to the vouched root and every chunk to its hash.
//!
//! The joiner fetches the descriptor from one donor, then chunks from every
//! donor vouching for the root in parallel ([`download_vouched`]): each
//! donor's connection takes the next missing chunk when it delivered the
//! last one, so fast donors carry more. A donor that disconnects, stalls,
//! serves below the minimum rate or sends a chunk that does not match its
//! hash is dropped, and its chunk goes back to the others; chunks already
//! verified are kept.
//!
//! # Wire
//! One stream carries any number of requests, answered in order:
//! - request: `tag: u8` (1 descriptor, 2 chunk), `root: [u8; 32]`,
//!   `index: u32` little-endian (0 for a descriptor);
//! - answer: `status: u8` (0 served, 1 not serving this root, 2 bad index),
//!   then for a served descriptor `len: u32` LE and the encoded descriptor
//!   (MessagePack), for a served chunk the chunk's bytes (length known from
//!   the descriptor).
//!
//! The codec runs over any byte stream; the averager runs it over libp2p
//! streams, which are already authenticated and encrypted by noise.

use std::{
    collections::VecDeque,
    future::Future,
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    compression::all_finite,
    error::{AveragingError, PeerFault, Result},
};

/// Largest encoded descriptor accepted (bytes).
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Largest metadata a descriptor may hold (bytes).
pub const MAX_METADATA_BYTES: usize = 64 << 10;
/// Smallest chunk a donor cuts (bytes); larger states get larger chunks so
/// that a descriptor holds at most [`MAX_CHUNKS`] hashes.
pub const STATE_CHUNK_BYTES: usize = 1 << 20;
/// Most chunks in one state (their hashes fill half a megabyte).
pub const MAX_CHUNKS: usize = 16 << 10;
/// Largest chunk accepted (bytes).
pub const MAX_CHUNK_BYTES: usize = 64 << 20;
const REQUEST_LEN: usize = 1 + 32 + 4;
const TAG_DESCRIPTOR: u8 = 1;
const TAG_CHUNK: u8 = 2;
const SERVED: u8 = 0;
const UNKNOWN_ROOT: u8 = 1;
const BAD_INDEX: u8 = 2;
const ROOT_DOMAIN: &[u8] = b"colony-averaging/state-root/v1";

/// A snapshot of averager state.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedState {
    /// Opaque metadata (the optimizer's step, group bits, ...), MessagePack.
    pub metadata: Vec<u8>,
    /// The tensors.
    pub tensors: Vec<Vec<f32>>,
}

/// What a state is: its metadata, its layout and the hash of every chunk.
/// Its hash is the state's root (see [`StateDescriptor::root_of`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDescriptor {
    /// The donor's metadata.
    #[serde(with = "serde_bytes")]
    pub metadata: Vec<u8>,
    /// Values per tensor.
    pub lengths: Vec<u64>,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_bytes: u32,
    /// SHA-256 of each chunk, concatenated.
    #[serde(with = "serde_bytes")]
    pub chunk_hashes: Vec<u8>,
}

impl StateDescriptor {
    /// Bytes of all tensors together.
    pub fn total_bytes(&self) -> u64 {
        self.lengths
            .iter()
            .fold(0u64, |acc, &l| acc.saturating_add(l.saturating_mul(4)))
    }

    /// How many chunks the state has.
    pub fn chunk_count(&self) -> usize {
        self.chunk_hashes.len() / 32
    }

    /// The byte range of chunk `i` within the concatenated tensors.
    pub fn chunk_range(&self, i: usize) -> Range<usize> {
        let size = self.chunk_bytes as usize;
        let total = usize::try_from(self.total_bytes()).unwrap_or(usize::MAX);
        let start = i.saturating_mul(size).min(total);
        start..start.saturating_add(size).min(total)
    }

    fn chunk_hash(&self, i: usize) -> &[u8] {
        &self.chunk_hashes[32 * i..32 * (i + 1)]
    }

    /// The root of an encoded descriptor: what donors vouch for.
    pub fn root_of(encoded: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(ROOT_DOMAIN);
        h.update(encoded);
        h.finalize().into()
    }

    /// Decodes a descriptor a donor sent and checks its invariants: bounded
    /// metadata, tensor count and chunk size, one hash per chunk.
    ///
    /// # Errors
    /// [`PeerFault::Garbage`] or [`PeerFault::ProtocolViolation`].
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, PeerFault> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(PeerFault::ProtocolViolation {
                reason: "state descriptor too large",
            });
        }
        let d: Self = rmp_serde::from_slice(bytes).map_err(|_| PeerFault::Garbage {
            reason: "undecodable state descriptor",
        })?;
        let violation = |reason| Err(PeerFault::ProtocolViolation { reason });
        if d.metadata.len() > MAX_METADATA_BYTES {
            return violation("state metadata too large");
        }
        let size = d.chunk_bytes as usize;
        if size == 0 || !size.is_multiple_of(4) || size > MAX_CHUNK_BYTES {
            return violation("state chunk size out of range");
        }
        if !d.chunk_hashes.len().is_multiple_of(32) {
            return violation("state chunk hashes are not 32 bytes each");
        }
        let chunks = d.total_bytes().div_ceil(size as u64);
        if chunks > MAX_CHUNKS as u64 || chunks != d.chunk_count() as u64 {
            return violation("state chunk count does not match its size");
        }
        Ok(d)
    }

    /// The descriptor encoded (MessagePack).
    ///
    /// # Errors
    /// [`AveragingError::Decode`] if it cannot be encoded.
    pub fn encode(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec(self).map_err(|_| AveragingError::Decode {
            reason: "cannot encode state descriptor",
        })
    }
}

/// The chunk size for a state of `total` bytes.
fn chunk_bytes_for(total: usize) -> usize {
    let min = total.div_ceil(MAX_CHUNKS).next_multiple_of(4096);
    min.max(STATE_CHUNK_BYTES)
}

/// The byte pieces of `range` within `tensors` laid end to end.
fn pieces(tensors: &[Vec<f32>], range: Range<usize>) -> impl Iterator<Item = &[u8]> {
    let mut offset = 0usize;
    tensors.iter().filter_map(move |t| {
        let bytes = bytemuck::cast_slice::<f32, u8>(t);
        let (start, end) = (offset, offset + bytes.len());
        offset = end;
        let (a, b) = (range.start.max(start), range.end.min(end));
        (a < b).then(|| &bytes[a - start..b - start])
    })
}

/// Writes `data` at byte `at` of `tensors` laid end to end.
fn write_at(tensors: &mut [Vec<f32>], at: usize, data: &[u8]) {
    let mut offset = 0usize;
    for t in tensors {
        let bytes = bytemuck::cast_slice_mut::<f32, u8>(t);
        let (start, end) = (offset, offset + bytes.len());
        offset = end;
        let (a, b) = (at.max(start), (at + data.len()).min(end));
        if a < b {
            bytes[a - start..b - start].copy_from_slice(&data[a - at..b - at]);
        }
    }
}

/// A state as its donor serves it: immutable, its chunks hashed once.
#[derive(Debug)]
pub struct ServedState {
    state: SharedState,
    descriptor: StateDescriptor,
    encoded: Vec<u8>,
    root: [u8; 32],
}

impl ServedState {
    /// Cuts and hashes `state` (SHA-256 over all of it: run it off the
    /// async runtime for large states).
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] for metadata over
    /// [`MAX_METADATA_BYTES`] or a state of more than [`MAX_CHUNKS`] largest chunks.
    pub fn new(state: SharedState) -> Result<Self> {
        if state.metadata.len() > MAX_METADATA_BYTES {
            return Err(AveragingError::InvalidConfig {
                field: "state metadata",
                reason: format!(
                    "{} bytes, at most {MAX_METADATA_BYTES}",
                    state.metadata.len()
                ),
            });
        }
        let total: usize = state.tensors.iter().map(|t| 4 * t.len()).sum();
        let size = chunk_bytes_for(total);
        if size > MAX_CHUNK_BYTES {
            return Err(AveragingError::InvalidConfig {
                field: "state",
                reason: format!("{total} bytes is more than a descriptor can describe"),
            });
        }
        let mut chunk_hashes = Vec::with_capacity(32 * total.div_ceil(size));
        for start in (0..total).step_by(size) {
            let mut h = Sha256::new();
            for piece in pieces(&state.tensors, start..(start + size).min(total)) {
                h.update(piece);
            }
            chunk_hashes.extend_from_slice(&h.finalize());
        }
        let descriptor = StateDescriptor {
            metadata: state.metadata.clone(),
            lengths: state.tensors.iter().map(|t| t.len() as u64).collect(),
            chunk_bytes: u32::try_from(size).unwrap_or(u32::MAX),
            chunk_hashes,
        };
        let encoded = descriptor.encode()?;
        let root = StateDescriptor::root_of(&encoded);
        Ok(Self {
            state,
            descriptor,
            encoded,
            root,
        })
    }

    /// The root donors vouch for.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }

    /// The state itself.
    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// Its descriptor.
    pub fn descriptor(&self) -> &StateDescriptor {
        &self.descriptor
    }
}

/// What a donor serves: the state it declared last, and the ones it
/// declared before for as long as some request still reads them (a joiner
/// that began on the previous root finishes on it; no copy is kept for
/// anyone else).
#[derive(Debug, Default)]
pub(crate) struct ServedStates {
    current: Option<Arc<ServedState>>,
    retired: Vec<std::sync::Weak<ServedState>>,
}

impl ServedStates {
    /// Serves `state` from now on.
    pub(crate) fn declare(&mut self, state: Arc<ServedState>) {
        self.withdraw();
        self.current = Some(state);
    }

    /// Serves nothing new; states still being read stay readable.
    pub(crate) fn withdraw(&mut self) {
        if let Some(old) = self.current.take() {
            self.retired.push(Arc::downgrade(&old));
        }
        self.retired.retain(|w| w.strong_count() > 0);
    }

    /// The state whose root is `root`, if this donor still serves it.
    pub(crate) fn find(&self, root: &[u8; 32]) -> Option<Arc<ServedState>> {
        self.current
            .iter()
            .cloned()
            .chain(self.retired.iter().filter_map(std::sync::Weak::upgrade))
            .find(|s| &s.root == root)
    }
}

fn serve_io(source: std::io::Error) -> AveragingError {
    AveragingError::Io {
        context: "serving state",
        source,
    }
}

async fn write_timeout<W: AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<()> {
    match tokio::time::timeout(timeout, stream.write_all(bytes)).await {
        Ok(r) => r.map_err(serve_io),
        Err(_) => Err(serve_io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Answers state requests on `stream` until the joiner closes it or stays
/// idle for `idle_timeout` (donor side). `find(root)` is the state this
/// donor serves under `root`, if any (otherwise the answer is "not
/// serving"); the stream holds on to the last state it served, so a
/// re-declaration mid-download does not cut it off. Each write must make
/// progress within `write_timeout_per_chunk`.
///
/// # Errors
/// [`AveragingError::Io`] on a failed or stalled write; a garbled request
/// ends the stream with [`AveragingError::Peer`].
pub async fn serve_requests<S, F>(
    stream: &mut S,
    find: F,
    idle_timeout: Duration,
    write_timeout_per_chunk: Duration,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&[u8; 32]) -> Option<Arc<ServedState>>,
{
    let fault = |fault| AveragingError::Peer { peer: 0, fault };
    let mut request = [0u8; REQUEST_LEN];
    let mut held: Option<Arc<ServedState>> = None;
    loop {
        match tokio::time::timeout(idle_timeout, stream.read_exact(&mut request)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => {
                return Err(fault(PeerFault::Disconnected {
                    reason: e.to_string(),
                }));
            }
            Ok(Ok(_)) => {}
        }
        let root: [u8; 32] = request[1..33].try_into().unwrap_or([0; 32]);
        let index = u32::from_le_bytes([request[33], request[34], request[35], request[36]]);
        let served = match &held {
            Some(h) if h.root == root => Some(h.clone()),
            _ => find(&root),
        };
        if served.is_some() {
            held.clone_from(&served);
        }
        match (request[0], served) {
            (TAG_DESCRIPTOR | TAG_CHUNK, None) => {
                write_timeout(stream, &[UNKNOWN_ROOT], write_timeout_per_chunk).await?;
            }
            (TAG_DESCRIPTOR, Some(s)) => {
                let mut out = Vec::with_capacity(5 + s.encoded.len());
                out.push(SERVED);
                out.extend_from_slice(&(s.encoded.len() as u32).to_le_bytes());
                out.extend_from_slice(&s.encoded);
                write_timeout(stream, &out, write_timeout_per_chunk).await?;
            }
            (TAG_CHUNK, Some(s)) if (index as usize) < s.descriptor.chunk_count() => {
                write_timeout(stream, &[SERVED], write_timeout_per_chunk).await?;
                let range = s.descriptor.chunk_range(index as usize);
                for piece in pieces(&s.state.tensors, range) {
                    write_timeout(stream, piece, write_timeout_per_chunk).await?;
                }
            }
            (TAG_CHUNK, Some(_)) => {
                write_timeout(stream, &[BAD_INDEX], write_timeout_per_chunk).await?;
            }
            _ => {
                return Err(fault(PeerFault::ProtocolViolation {
                    reason: "unknown state request",
                }));
            }
        }
        match tokio::time::timeout(write_timeout_per_chunk, stream.flush()).await {
            Ok(r) => r.map_err(serve_io)?,
            Err(_) => return Err(serve_io(std::io::ErrorKind::TimedOut.into())),
        }
    }
}

/// Time limits of a download.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DownloadLimits {
    /// Longest wait for a connection, a descriptor or a chunk's first byte.
    pub request_timeout: Duration,
    /// Slowest a donor may serve (bytes/s): a chunk of `n` bytes must arrive
    /// within `request_timeout + n / min_rate`, or the donor is dropped and
    /// its chunk goes to the others.
    pub min_rate: f64,
}

impl DownloadLimits {
    fn chunk_deadline(&self, bytes: usize) -> Duration {
        let rate = self.min_rate.max(1.0);
        self.request_timeout + Duration::from_secs_f64((bytes as f64 / rate).min(86_400.0))
    }
}

/// What a download did, per donor (indices as passed to [`download_vouched`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DownloadReport {
    /// Verified chunks each donor delivered.
    pub chunks: Vec<usize>,
    /// The donors dropped, with why.
    pub dropped: Vec<(usize, PeerFault)>,
}

async fn read_within<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
    timeout: Duration,
) -> std::result::Result<(), PeerFault> {
    match tokio::time::timeout(timeout, stream.read_exact(buf)).await {
        Err(_) => Err(PeerFault::Stalled { timeout }),
        Ok(Err(e)) => Err(PeerFault::Disconnected {
            reason: e.to_string(),
        }),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn send_request<W: AsyncWrite + Unpin>(
    stream: &mut W,
    tag: u8,
    root: &[u8; 32],
    index: u32,
    timeout: Duration,
) -> std::result::Result<(), PeerFault> {
    let mut request = [0u8; REQUEST_LEN];
    request[0] = tag;
    request[1..33].copy_from_slice(root);
    request[33..].copy_from_slice(&index.to_le_bytes());
    let send = async {
        stream.write_all(&request).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, send).await {
        Err(_) => Err(PeerFault::Stalled { timeout }),
        Ok(Err(e)) => Err(PeerFault::Disconnected {
            reason: e.to_string(),
        }),
        Ok(Ok(())) => Ok(()),
    }
}

async fn read_status<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> std::result::Result<(), PeerFault> {
    let mut status = [0u8; 1];
    read_within(stream, &mut status, timeout).await?;
    match status[0] {
        SERVED => Ok(()),
        UNKNOWN_ROOT => Err(PeerFault::ProtocolViolation {
            reason: "the donor no longer serves the vouched state",
        }),
        _ => Err(PeerFault::ProtocolViolation {
            reason: "the donor refused a chunk request",
        }),
    }
}

/// Fetches the descriptor of `root` from one donor stream and checks it:
/// it must hash to `root` and describe `expected_lengths`.
///
/// # Errors
/// The [`PeerFault`] of the donor.
pub async fn fetch_descriptor<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    root: &[u8; 32],
    expected_lengths: &[usize],
    timeout: Duration,
) -> std::result::Result<StateDescriptor, PeerFault> {
    send_request(stream, TAG_DESCRIPTOR, root, 0, timeout).await?;
    read_status(stream, timeout).await?;
    let mut len = [0u8; 4];
    read_within(stream, &mut len, timeout).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(PeerFault::ProtocolViolation {
            reason: "state descriptor too large",
        });
    }
    let mut encoded = vec![0u8; len];
    read_within(stream, &mut encoded, timeout).await?;
    if &StateDescriptor::root_of(&encoded) != root {
        return Err(PeerFault::Garbage {
            reason: "the state descriptor does not hash to the vouched root",
        });
    }
    let descriptor = StateDescriptor::decode(&encoded)?;
    if descriptor.lengths.len() != expected_lengths.len()
        || descriptor
            .lengths
            .iter()
            .zip(expected_lengths)
            .any(|(&a, &b)| a != b as u64)
    {
        return Err(PeerFault::BadSchemaHash);
    }
    Ok(descriptor)
}

/// The download's shared progress.
struct Progress {
    queue: VecDeque<usize>,
    remaining: usize,
    tensors: Vec<Vec<f32>>,
    report: DownloadReport,
}

/// Downloads the state whose root is `root` from `donors` donors (all of
/// which vouched for it) in parallel, verifying the descriptor against the
/// root and every chunk against its hash; `connect(i)` opens a stream to
/// donor `i`. The tensors must have `expected_lengths` (they are allocated
/// from it, never from what a donor claims). Bound the whole download with
/// a timeout of your own.
///
/// # Errors
/// [`AveragingError::NoStateDonor`] when no donor serves a valid descriptor
/// or every donor was dropped before the last chunk;
/// [`AveragingError::Peer`] (donor 0) for a state that is not finite.
pub async fn download_vouched<S, F, Fut>(
    donors: usize,
    connect: F,
    root: [u8; 32],
    expected_lengths: &[usize],
    limits: DownloadLimits,
) -> Result<(SharedState, DownloadReport)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<S>>,
{
    let mut report = DownloadReport {
        chunks: vec![0; donors],
        dropped: Vec::new(),
    };
    let connect_within = |i: usize| {
        let opened = connect(i);
        async move {
            match tokio::time::timeout(limits.request_timeout, opened).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(PeerFault::Disconnected {
                    reason: e.to_string(),
                }),
                Err(_) => Err(PeerFault::Stalled {
                    timeout: limits.request_timeout,
                }),
            }
        }
    };
    // The descriptor, from the first donor that serves one matching the root.
    let mut first = None;
    for i in 0..donors {
        let attempt = async {
            let mut s = connect_within(i).await?;
            let d =
                fetch_descriptor(&mut s, &root, expected_lengths, limits.request_timeout).await?;
            Ok::<_, PeerFault>((s, d))
        };
        match attempt.await {
            Ok((s, d)) => {
                first = Some((i, s, d));
                break;
            }
            Err(fault) => {
                tracing::warn!(donor = i, %fault, "no valid state descriptor from this donor");
                report.dropped.push((i, fault));
            }
        }
    }
    let Some((first_donor, first_stream, descriptor)) = first else {
        return Err(AveragingError::NoStateDonor { tried: donors });
    };
    let chunks = descriptor.chunk_count();
    let progress = Mutex::new(Progress {
        queue: (0..chunks).collect(),
        remaining: chunks,
        tensors: expected_lengths.iter().map(|&n| vec![0.0; n]).collect(),
        report,
    });
    let wake = tokio::sync::Notify::new();
    let lock = || {
        progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut first_stream = Some(first_stream);
    let workers = (0..donors)
        .filter(|&i| i == first_donor || !lock().report.dropped.iter().any(|(d, _)| *d == i))
        .map(|i| {
            let stream = if i == first_donor {
                first_stream.take()
            } else {
                None
            };
            let (descriptor, lock, wake, connect_within) =
                (&descriptor, &lock, &wake, &connect_within);
            async move {
                let result = async {
                    let mut stream = match stream {
                        Some(s) => s,
                        None => connect_within(i).await?,
                    };
                    let mut buf = Vec::new();
                    loop {
                        let next = {
                            let mut p = lock();
                            if p.remaining == 0 {
                                return Ok(());
                            }
                            p.queue.pop_front()
                        };
                        let Some(index) = next else {
                            // Nothing queued, chunks in flight elsewhere: wait
                            // until one lands or fails back into the queue.
                            let notified = wake.notified();
                            tokio::pin!(notified);
                            notified.as_mut().enable();
                            {
                                let p = lock();
                                if p.remaining == 0 || !p.queue.is_empty() {
                                    continue;
                                }
                            }
                            notified.await;
                            continue;
                        };
                        let range = descriptor.chunk_range(index);
                        let fetched = async {
                            send_request(
                                &mut stream,
                                TAG_CHUNK,
                                &root,
                                index as u32,
                                limits.request_timeout,
                            )
                            .await?;
                            let deadline = limits.chunk_deadline(range.len());
                            let read = async {
                                read_status(&mut stream, limits.request_timeout).await?;
                                buf.resize(range.len(), 0);
                                read_within(&mut stream, &mut buf, deadline).await
                            };
                            match tokio::time::timeout(deadline, read).await {
                                Ok(r) => r?,
                                Err(_) => {
                                    return Err(PeerFault::Stalled { timeout: deadline });
                                }
                            }
                            if Sha256::digest(&buf).as_slice() != descriptor.chunk_hash(index) {
                                return Err(PeerFault::Garbage {
                                    reason: "a state chunk does not match its hash",
                                });
                            }
                            Ok(())
                        }
                        .await;
                        match fetched {
                            Ok(()) => {
                                let mut p = lock();
                                write_at(&mut p.tensors, range.start, &buf);
                                p.remaining -= 1;
                                p.report.chunks[i] += 1;
                                if p.remaining == 0 {
                                    wake.notify_waiters();
                                }
                            }
                            Err(fault) => {
                                lock().queue.push_back(index);
                                wake.notify_waiters();
                                return Err(fault);
                            }
                        }
                    }
                }
                .await;
                if let Err(fault) = result {
                    tracing::warn!(donor = i, %fault, "dropping a state donor; its chunks go to the others");
                    lock().report.dropped.push((i, fault));
                    wake.notify_waiters();
                }
            }
        })
        .collect::<Vec<_>>();
    futures::future::join_all(workers).await;
    let Progress {
        remaining,
        tensors,
        report,
        ..
    } = progress
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if remaining > 0 {
        tracing::warn!(
            remaining,
            chunks,
            "every state donor dropped before the last chunk"
        );
        return Err(AveragingError::NoStateDonor { tried: donors });
    }
    if !tensors.iter().all(|t| all_finite(t)) {
        // Unreachable with honest vouchers: they vouched for these bytes.
        return Err(AveragingError::Peer {
            peer: first_donor,
            fault: PeerFault::Garbage {
                reason: "the vouched state holds NaN or infinity",
            },
        });
    }
    Ok((
        SharedState {
            metadata: descriptor.metadata,
            tensors,
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;

    const LENGTHS: [usize; 2] = [1_500_000, 7];

    fn state(seed: f32) -> SharedState {
        SharedState {
            metadata: rmp_serde::to_vec(&42u64).unwrap(),
            tensors: LENGTHS
                .iter()
                .map(|&n| (0..n).map(|i| i as f32 * 0.5 + seed).collect())
                .collect(),
        }
    }

    fn limits() -> DownloadLimits {
        DownloadLimits {
            request_timeout: Duration::from_millis(500),
            min_rate: 4.0 * 1048576.0,
        }
    }

    /// How a test donor behaves.
    #[derive(Clone, Copy)]
    enum Donor {
        Honest,
        /// Serves this many requests (the descriptor counts), then leaves.
        LeavesAfter(usize),
        /// Forwards its answers at about this many bytes per second.
        Slow(usize),
    }

    impl ServedState {
        fn find(self: &Arc<Self>, root: &[u8; 32]) -> Option<Arc<Self>> {
            (self.root == *root).then(|| self.clone())
        }
    }

    /// An honest donor serving `served` on a fresh pipe; returns the joiner's end.
    fn spawn_honest(served: Arc<ServedState>) -> DuplexStream {
        let (joiner, mut donor) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let t = Duration::from_secs(5);
            let _ = serve_requests(&mut donor, |r| served.find(r), t, t).await;
        });
        joiner
    }

    fn spawn_donor(served: Arc<ServedState>, behaviour: Donor) -> DuplexStream {
        if let Donor::Honest = behaviour {
            return spawn_honest(served);
        }
        let (joiner, mut donor) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            // A relay in front of an honest donor, misbehaving as told.
            let mut inner_joiner = spawn_honest(served.clone());
            match behaviour {
                Donor::Honest => {}
                Donor::LeavesAfter(n) => {
                    // Passes `n` requests, then drops both ends.
                    let mut request = [0u8; REQUEST_LEN];
                    for _ in 0..n {
                        if donor.read_exact(&mut request).await.is_err() {
                            return;
                        }
                        inner_joiner.write_all(&request).await.unwrap();
                        let answer_len = {
                            let mut status = [0u8; 1];
                            inner_joiner.read_exact(&mut status).await.unwrap();
                            donor.write_all(&status).await.unwrap();
                            if request[0] == TAG_DESCRIPTOR {
                                let mut len = [0u8; 4];
                                inner_joiner.read_exact(&mut len).await.unwrap();
                                donor.write_all(&len).await.unwrap();
                                u32::from_le_bytes(len) as usize
                            } else {
                                let index = u32::from_le_bytes(request[33..].try_into().unwrap());
                                served.descriptor().chunk_range(index as usize).len()
                            }
                        };
                        let mut answer = vec![0u8; answer_len];
                        inner_joiner.read_exact(&mut answer).await.unwrap();
                        donor.write_all(&answer).await.unwrap();
                    }
                }
                Donor::Slow(rate) => {
                    let (mut from_joiner, mut to_joiner) = tokio::io::split(donor);
                    let (mut from_donor, mut to_donor) = tokio::io::split(inner_joiner);
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_joiner, &mut to_donor).await;
                    });
                    let mut buf = vec![0u8; rate / 20];
                    loop {
                        let Ok(n) = from_donor.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 || to_joiner.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        joiner
    }

    async fn download(
        donors: Vec<(Arc<ServedState>, Donor)>,
        root: [u8; 32],
        lengths: &[usize],
    ) -> Result<(SharedState, DownloadReport)> {
        let donors = &donors;
        download_vouched(
            donors.len(),
            |i| async move { Ok(spawn_donor(donors[i].0.clone(), donors[i].1)) },
            root,
            lengths,
            limits(),
        )
        .await
    }

    fn same_bits(a: &SharedState, b: &SharedState) -> bool {
        a.metadata == b.metadata
            && a.tensors.len() == b.tensors.len()
            && a.tensors.iter().zip(&b.tensors).all(|(x, y)| {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
            })
    }

    #[tokio::test]
    async fn three_donors_share_the_download_bit_for_bit() {
        let good = Arc::new(ServedState::new(state(0.0)).unwrap());
        let chunks = good.descriptor().chunk_count();
        assert_eq!(chunks, 6, "6 MB in 1 MiB chunks");
        let (got, report) = download(
            vec![(good.clone(), Donor::Honest); 3],
            good.root(),
            &LENGTHS,
        )
        .await
        .unwrap();
        assert!(same_bits(&got, good.state()));
        assert_eq!(report.chunks.iter().sum::<usize>(), chunks);
        assert!(report.dropped.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_donor_that_leaves_halfway_loses_its_chunks_to_the_others() {
        let good = Arc::new(ServedState::new(state(0.0)).unwrap());
        // The leaver serves the descriptor and two chunks, then goes.
        let (got, report) = download(
            vec![
                (good.clone(), Donor::LeavesAfter(3)),
                (good.clone(), Donor::Honest),
            ],
            good.root(),
            &LENGTHS,
        )
        .await
        .unwrap();
        assert!(same_bits(&got, good.state()));
        assert!(report.chunks[0] <= 2, "{report:?}");
        assert_eq!(report.chunks.iter().sum::<usize>(), 6);
        assert!(
            matches!(report.dropped[..], [(0, PeerFault::Disconnected { .. })]),
            "{report:?}"
        );
        // Alone, the leaver cannot finish: a typed error, not a hang.
        let res = download(
            vec![(good.clone(), Donor::LeavesAfter(3))],
            good.root(),
            &LENGTHS,
        )
        .await;
        assert!(matches!(
            res,
            Err(AveragingError::NoStateDonor { tried: 1 })
        ));
    }

    #[tokio::test]
    async fn a_donor_slower_than_the_minimum_rate_is_dropped() {
        let good = Arc::new(ServedState::new(state(0.0)).unwrap());
        // 256 KiB/s against a 4 MiB/s minimum: a 1 MiB chunk would take 4 s,
        // its deadline is 0.75 s.
        let started = std::time::Instant::now();
        let (got, report) = download(
            vec![
                (good.clone(), Donor::Slow(256 << 10)),
                (good.clone(), Donor::Honest),
            ],
            good.root(),
            &LENGTHS,
        )
        .await
        .unwrap();
        assert!(same_bits(&got, good.state()));
        assert!(
            matches!(report.dropped[..], [(0, PeerFault::Stalled { .. })]),
            "{report:?}"
        );
        assert_eq!(report.chunks[0], 0);
        // One chunk deadline lost, then the honest donor's pace.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn corrupt_chunks_wrong_roots_and_wrong_layouts_are_caught() {
        let good = Arc::new(ServedState::new(state(0.0)).unwrap());
        // A donor with the right descriptor and one flipped byte in its data.
        let mut bad_tensors = good.state().clone();
        bad_tensors.tensors[0][700_000] = 123.0;
        let corrupt = Arc::new(ServedState {
            state: bad_tensors,
            descriptor: good.descriptor.clone(),
            encoded: good.encoded.clone(),
            root: good.root,
        });
        // A donor serving another state entirely (its root differs).
        let other = Arc::new(ServedState::new(state(1.0)).unwrap());
        let (got, report) = download(
            vec![
                (other, Donor::Honest),
                (corrupt, Donor::Honest),
                (good.clone(), Donor::Honest),
            ],
            good.root(),
            &LENGTHS,
        )
        .await
        .unwrap();
        assert!(same_bits(&got, good.state()));
        let faults: Vec<_> = report
            .dropped
            .iter()
            .map(|(i, f)| (*i, f.clone()))
            .collect();
        assert!(
            faults
                .iter()
                .any(|(i, f)| *i == 0 && matches!(f, PeerFault::ProtocolViolation { .. })),
            "{faults:?}"
        );
        // A joiner with another layout accepts nothing.
        let res = download(vec![(good.clone(), Donor::Honest)], good.root(), &[5]).await;
        assert!(matches!(
            res,
            Err(AveragingError::NoStateDonor { tried: 1 })
        ));
        // The corrupt donor alone: every chunk it serves with the flipped
        // value fails its hash, so the download cannot finish.
        let mut bad = good.state().clone();
        bad.tensors[0][0] = 9.0;
        let corrupt_all = Arc::new(ServedState {
            state: bad,
            descriptor: good.descriptor.clone(),
            encoded: good.encoded.clone(),
            root: good.root,
        });
        let res = download(vec![(corrupt_all, Donor::Honest)], good.root(), &LENGTHS).await;
        assert!(matches!(
            res,
            Err(AveragingError::NoStateDonor { tried: 1 })
        ));
    }

    #[test]
    fn a_redeclared_state_stays_served_while_a_stream_reads_it() {
        let a = Arc::new(ServedState::new(state(0.0)).unwrap());
        let b = Arc::new(ServedState::new(state(1.0)).unwrap());
        let (root_a, root_b) = (a.root(), b.root());
        let mut served = ServedStates::default();
        served.declare(a);
        let reading = served.find(&root_a).expect("declared");
        served.declare(b);
        assert!(served.find(&root_b).is_some());
        assert!(served.find(&root_a).is_some(), "a stream still reads it");
        drop(reading);
        assert!(
            served.find(&root_a).is_none(),
            "no copy kept for anyone else"
        );
        served.withdraw();
        assert!(served.find(&root_b).is_none());
    }

    #[test]
    fn descriptors_claiming_impossible_sizes_are_refused() {
        let good = ServedState::new(state(0.0)).unwrap();
        let mut d = good.descriptor().clone();
        d.lengths = vec![1 << 40];
        assert!(StateDescriptor::decode(&d.encode().unwrap()).is_err());
        let mut d = good.descriptor().clone();
        d.chunk_bytes = 3;
        assert!(StateDescriptor::decode(&d.encode().unwrap()).is_err());
        let mut d = good.descriptor().clone();
        d.chunk_hashes.pop();
        assert!(StateDescriptor::decode(&d.encode().unwrap()).is_err());
        assert_eq!(
            StateDescriptor::decode(&good.encoded).unwrap(),
            *good.descriptor()
        );
        // Chunks grow for large states so the descriptor stays bounded.
        assert_eq!(chunk_bytes_for(10), STATE_CHUNK_BYTES);
        assert!(chunk_bytes_for(1 << 40).div_ceil(1) * MAX_CHUNKS >= 1 << 40);
    }
}
