//! The data plane: one endpoint per averager that hands inbound connections
//! to the round (group id) they name. Connections arrive on a TCP listener
//! (the direct path) and, with [`DataPlane::with_libp2p`], as libp2p streams
//! of the averager's data protocol on the DHT's connections (for peers whose
//! data address is missing or unreachable). Both are routed by
//! [`route`]; a libp2p stream's authenticated peer id must be the group
//! member whose sender slot its preamble claims. The endpoint also answers
//! reachability probes (see [`crate::wire::PROBE_MAGIC`]).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use colony_dht::{Dht, PeerId, StreamProtocol};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{Notify, Semaphore, mpsc},
    task::JoinHandle,
};

use crate::{
    conn::{DataPath, DataStream},
    error::{AveragingError, PeerFault, Result},
    expiring::ExpiringMap,
    wire::{Opening, PREAMBLE_LEN, Preamble, probe_reply},
};

/// An inbound connection routed to a round.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) stream: DataStream,
    pub(crate) preamble: Preamble,
    /// The libp2p peer of a stream.
    pub(crate) remote: Option<PeerId>,
    /// The remote address of a TCP connection.
    pub(crate) addr: Option<SocketAddr>,
}

/// A data-plane connection refused before it reached a round's reducer.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedConnection {
    /// The libp2p peer of a stream (`None` for TCP, which authenticates
    /// only through the AEAD).
    pub peer: Option<PeerId>,
    /// The path it came by.
    pub path: DataPath,
    /// The sender index its preamble claimed, when it got that far.
    pub claimed_sender: Option<usize>,
    /// Why it was refused.
    pub fault: PeerFault,
}

/// One registered round.
#[derive(Debug)]
struct Route {
    tx: mpsc::Sender<Incoming>,
    /// Member peer ids in group order, to check a libp2p stream's peer.
    members: Arc<Vec<Vec<u8>>>,
    rejected: Arc<Mutex<Vec<RejectedConnection>>>,
}

type Routes = Mutex<HashMap<[u8; 32], Route>>;

/// Connections from one IP (TCP) or one libp2p peer being read or routed
/// at once; more are closed on accept. A round needs one per sender and
/// reducer, and a few peers may share a NAT's address.
const MAX_ROUTING_PER_SOURCE: usize = 32;
/// Connections one source may open per second on average, and in a burst.
const ACCEPT_RATE_PER_SOURCE: f64 = 64.0;
const ACCEPT_BURST_PER_SOURCE: f64 = 128.0;
/// Sources tracked by the admission control (the oldest idle ones are
/// forgotten first).
const MAX_SOURCES: usize = 4096;

/// Admission control of inbound data-plane connections: a token bucket per
/// source (an IP for TCP, a peer id for libp2p) and a cap on each source's
/// connections still being routed, so one host cannot hold the plane's
/// routing slots with idle connections while honest senders wait.
#[derive(Debug)]
struct Admission<K> {
    sources: HashMap<K, SourceState>,
    refused: u64,
}

#[derive(Debug)]
struct SourceState {
    tokens: f64,
    refilled: tokio::time::Instant,
    routing: usize,
}

impl<K> Default for Admission<K> {
    fn default() -> Self {
        Self {
            sources: HashMap::new(),
            refused: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Admission<K> {
    /// Admit one connection from `source` now, or refuse it.
    fn admit(&mut self, source: &K, now: tokio::time::Instant) -> bool {
        if !self.sources.contains_key(source) && self.sources.len() >= MAX_SOURCES {
            // Forget sources with nothing in flight, stalest first.
            let mut idle: Vec<(K, tokio::time::Instant)> = self
                .sources
                .iter()
                .filter(|(_, s)| s.routing == 0)
                .map(|(k, s)| (k.clone(), s.refilled))
                .collect();
            idle.sort_by_key(|(_, t)| *t);
            for (k, _) in idle.into_iter().take(MAX_SOURCES / 4) {
                self.sources.remove(&k);
            }
            if self.sources.len() >= MAX_SOURCES {
                self.refused += 1;
                return false;
            }
        }
        let st = self.sources.entry(source.clone()).or_insert(SourceState {
            tokens: ACCEPT_BURST_PER_SOURCE,
            refilled: now,
            routing: 0,
        });
        let dt = now.saturating_duration_since(st.refilled).as_secs_f64();
        st.tokens = (st.tokens + dt * ACCEPT_RATE_PER_SOURCE).min(ACCEPT_BURST_PER_SOURCE);
        st.refilled = now;
        if st.tokens < 1.0 || st.routing >= MAX_ROUTING_PER_SOURCE {
            self.refused += 1;
            return false;
        }
        st.tokens -= 1.0;
        st.routing += 1;
        true
    }

    /// A connection from `source` left routing.
    fn release(&mut self, source: &K) {
        if let Some(st) = self.sources.get_mut(source) {
            st.routing = st.routing.saturating_sub(1);
        }
    }
}

/// Rejections kept per round, and recent ones per plane.
const MAX_REJECTIONS: usize = 32;
/// Inbound connections (both paths) read or routed at once; more wait.
const MAX_ROUTING: usize = 256;
/// Inbound libp2p data streams queued before the plane takes them.
const P2P_BACKLOG: usize = 64;
/// Of those, at most this many from one peer (as many as it may have
/// routed at once).
const P2P_BACKLOG_PER_PEER: usize = MAX_ROUTING_PER_SOURCE;
/// Peers whose direct address failed, remembered for [`DIRECT_FAILURE_TTL`].
const MAX_DIRECT_FAILURES: usize = 1024;
/// How long a failed direct address is skipped in favour of libp2p.
const DIRECT_FAILURE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Shared {
    routes: Routes,
    registered: Notify,
    /// This plane's libp2p peer id, sent in probe answers.
    identity: OnceLock<Vec<u8>>,
    recent: Mutex<VecDeque<RejectedConnection>>,
    rejection: Notify,
    routing: Arc<Semaphore>,
    tcp_admission: Mutex<Admission<std::net::IpAddr>>,
    p2p_admission: Mutex<Admission<PeerId>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            routes: Mutex::default(),
            registered: Notify::new(),
            identity: OnceLock::new(),
            recent: Mutex::default(),
            rejection: Notify::new(),
            routing: Arc::new(Semaphore::new(MAX_ROUTING)),
            tcp_admission: Mutex::default(),
            p2p_admission: Mutex::default(),
        }
    }
}

impl Shared {
    fn note_rejection(&self, r: RejectedConnection) {
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= MAX_REJECTIONS {
                recent.pop_front();
            }
            recent.push_back(r);
        }
        self.rejection.notify_waiters();
    }
}

/// Admit one connection from `source`: within its limits, and a routing
/// slot free. `None`: close it unread.
fn admit<K: std::hash::Hash + Eq + Clone>(
    admission: &Mutex<Admission<K>>,
    routing: &Arc<Semaphore>,
    source: &K,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let mut a = admission.lock().ok()?;
    if !a.admit(source, tokio::time::Instant::now()) {
        return None;
    }
    match routing.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => {
            a.release(source);
            a.refused += 1;
            None
        }
    }
}

/// Releases a source's routing slot when its connection leaves routing.
struct Admitted<'a, K: std::hash::Hash + Eq + Clone> {
    admission: &'a Mutex<Admission<K>>,
    source: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Admitted<'_, K> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.admission.lock() {
            a.release(&self.source);
        }
    }
}

/// The libp2p side of a plane: dialing reducers over the DHT connection.
#[derive(Debug)]
pub(crate) struct P2p {
    dht: Dht,
    protocol: StreamProtocol,
    direct_failed: Mutex<ExpiringMap<(Vec<u8>, SocketAddr), ()>>,
}

impl P2p {
    /// Whether `peer`'s direct address `addr` failed recently.
    pub(crate) fn direct_failed(&self, peer: &[u8], addr: SocketAddr) -> bool {
        let now = tokio::time::Instant::now();
        self.direct_failed
            .lock()
            .is_ok_and(|m| m.get(&(peer.to_vec(), addr), now).is_some())
    }

    /// Remember that `peer`'s direct address failed; warns once per entry.
    pub(crate) fn note_direct_failure(&self, peer: &[u8], addr: SocketAddr, fault: &PeerFault) {
        let now = tokio::time::Instant::now();
        let fresh = self
            .direct_failed
            .lock()
            .is_ok_and(|mut m| m.insert((peer.to_vec(), addr), (), now));
        if fresh {
            tracing::warn!(
                peer = %crate::averager::peer_label(peer),
                %addr,
                %fault,
                "averaging: data address unreachable; using the libp2p connection for this peer"
            );
        }
    }

    /// Open a data stream to `peer` within `timeout`.
    pub(crate) async fn open(
        &self,
        peer: &[u8],
        timeout: Duration,
    ) -> std::result::Result<DataStream, PeerFault> {
        let id = PeerId::from_bytes(peer).map_err(|_| PeerFault::ProtocolViolation {
            reason: "member peer id is not a libp2p peer id",
        })?;
        match tokio::time::timeout(timeout, self.dht.open_stream(id, self.protocol.clone())).await {
            Err(_) => Err(PeerFault::Stalled { timeout }),
            Ok(Err(e)) => Err(PeerFault::Disconnected {
                reason: e.to_string(),
            }),
            Ok(Ok(s)) => Ok(DataStream::p2p(s)),
        }
    }
}

/// Reusable `f32` buffers, so rounds do not fault in fresh pages every time.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

/// Most buffers kept for reuse.
const POOL_BUFFERS: usize = 16;

impl BufferPool {
    /// A buffer of length `n` (contents unspecified).
    pub(crate) fn take(&self, n: usize) -> Vec<f32> {
        let found = self.free.lock().ok().and_then(|mut free| {
            let i = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)?;
            Some(free.swap_remove(i))
        });
        let mut v = found.unwrap_or_default();
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        v
    }

    /// Return a buffer for reuse.
    pub(crate) fn give(&self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        if let Ok(mut free) = self.free.lock()
            && free.len() < POOL_BUFFERS
        {
            free.push(v);
        }
    }
}

/// Reusable byte buffers for frames, so connections do not zero-fill and
/// fault in fresh multi-megabyte buffers every round.
#[derive(Debug, Default)]
pub(crate) struct BytePool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Most byte buffers kept for reuse (two per connection of a 16-peer round)...
const POOL_BYTE_BUFFERS: usize = 64;
/// ...and most bytes they may hold together, so a large group with large parts
/// does not pin more than this between rounds.
const POOL_BYTES_MAX: usize = 128 << 20;

impl BytePool {
    /// A buffer (contents and length unspecified; the largest one free),
    /// returned to the pool when the guard drops.
    pub(crate) fn take(self: &Arc<Self>) -> PooledBytes {
        let v = self
            .free
            .lock()
            .ok()
            .and_then(|mut free| {
                let i = free
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, v)| v.len())
                    .map(|(i, _)| i)?;
                Some(free.swap_remove(i))
            })
            .unwrap_or_default();
        PooledBytes {
            pool: self.clone(),
            v,
        }
    }
}

/// A byte buffer on loan from a [`BytePool`].
#[derive(Debug)]
pub(crate) struct PooledBytes {
    pool: Arc<BytePool>,
    v: Vec<u8>,
}

impl std::ops::Deref for PooledBytes {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.v
    }
}

impl std::ops::DerefMut for PooledBytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.v
    }
}

impl Drop for PooledBytes {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        if v.capacity() == 0 {
            return;
        }
        if let Ok(mut free) = self.pool.free.lock() {
            let held: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < POOL_BYTE_BUFFERS && held + v.capacity() <= POOL_BYTES_MAX {
                free.push(v);
            }
        }
    }
}

/// A data-plane endpoint. Node and auxiliary peers listen (on TCP with
/// [`DataPlane::bind`], or only on libp2p with [`DataPlane::libp2p_only`]);
/// client-mode peers use [`DataPlane::client`] and only connect out.
#[derive(Debug)]
pub struct DataPlane {
    shared: Arc<Shared>,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) bytes: Arc<BytePool>,
    local_addr: Option<SocketAddr>,
    /// Preamble timeout of inbound connections (`None`: accepts nothing).
    accepts: Option<Duration>,
    pub(crate) p2p: Option<P2p>,
    accept_tasks: Vec<JoinHandle<()>>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        for t in self.accept_tasks.drain(..) {
            t.abort();
        }
    }
}

impl DataPlane {
    /// Listen on `addr` (use port 0 for any). A connection must send its preamble
    /// within `preamble_timeout` and name a round registered within that time.
    ///
    /// # Errors
    /// [`AveragingError::Io`] if the socket cannot be bound.
    pub async fn bind(addr: SocketAddr, preamble_timeout: Duration) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AveragingError::Io {
                context: "binding the data-plane listener",
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| AveragingError::Io {
            context: "reading the listener address",
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let task_shared = shared.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Refused connections are closed at once, unread:
                        // the accept loop never waits on a slot, so honest
                        // senders are never queued behind idle ones.
                        let ip = peer.ip();
                        let Some(permit) =
                            admit(&task_shared.tcp_admission, &task_shared.routing, &ip)
                        else {
                            tracing::debug!(%peer, "data plane: refusing a connection (over its source's limit, or every routing slot busy)");
                            continue;
                        };
                        let shared = task_shared.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let _admitted = Admitted {
                                admission: &shared.tcp_admission,
                                source: ip,
                            };
                            let stream = DataStream::Tcp(stream);
                            if let Err(fault) =
                                route(&shared, stream, None, Some(peer), preamble_timeout).await
                            {
                                tracing::debug!(%peer, %fault, "rejected data-plane connection");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "data-plane accept failed");
                        // Transient (EMFILE etc.): back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self {
            shared,
            pool: Arc::default(),
            bytes: Arc::default(),
            local_addr: Some(local_addr),
            accepts: Some(preamble_timeout),
            p2p: None,
            accept_tasks: vec![accept_task],
        })
    }

    /// An endpoint with no TCP listener that still reduces: with
    /// [`with_libp2p`](Self::with_libp2p) it accepts data streams on the DHT
    /// connection (a peer that can open only its DHT port). Inbound streams
    /// must send their preamble within `preamble_timeout`.
    pub fn libp2p_only(preamble_timeout: Duration) -> Self {
        let mut plane = Self::client();
        plane.accepts = Some(preamble_timeout);
        plane
    }

    /// An endpoint that accepts nothing (client mode).
    pub fn client() -> Self {
        Self {
            shared: Arc::new(Shared::default()),
            pool: Arc::default(),
            bytes: Arc::default(),
            local_addr: None,
            accepts: None,
            p2p: None,
            accept_tasks: Vec::new(),
        }
    }

    /// Also carry connections over libp2p streams of `protocol` on `dht`:
    /// a reducer whose data address is absent, refuses, times out or failed
    /// recently is dialed there, and (unless this is a client endpoint)
    /// inbound streams of `protocol` are routed like TCP connections, their
    /// peer id checked against the sender slot they claim. Probes are
    /// answered with `dht`'s peer id.
    ///
    /// # Errors
    /// [`AveragingError::Dht`] if `protocol` already has an acceptor on `dht`.
    pub fn with_libp2p(mut self, dht: &Dht, protocol: StreamProtocol) -> Result<Self> {
        let _ = self.shared.identity.set(dht.peer_id().to_bytes());
        if let Some(preamble_timeout) = self.accepts {
            let mut rx = dht
                .accept_streams_per_peer(protocol.clone(), P2P_BACKLOG, P2P_BACKLOG_PER_PEER)
                .map_err(AveragingError::dht("registering the data protocol"))?;
            let shared = self.shared.clone();
            self.accept_tasks.push(tokio::spawn(async move {
                while let Some((peer, stream)) = rx.recv().await {
                    let Some(permit) = admit(&shared.p2p_admission, &shared.routing, &peer) else {
                        tracing::debug!(%peer, "data plane: refusing a libp2p stream (over its peer's limit, or every routing slot busy)");
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _admitted = Admitted {
                            admission: &shared.p2p_admission,
                            source: peer,
                        };
                        let stream = DataStream::p2p(stream);
                        if let Err(fault) =
                            route(&shared, stream, Some(peer), None, preamble_timeout).await
                        {
                            tracing::info!(%peer, %fault, "rejected libp2p data stream");
                        }
                    });
                }
            }));
        }
        self.p2p = Some(P2p {
            dht: dht.clone(),
            protocol,
            direct_failed: Mutex::new(ExpiringMap::new(MAX_DIRECT_FAILURES, DIRECT_FAILURE_TTL)),
        });
        Ok(self)
    }

    /// The listening address (`None` without a TCP listener).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Whether this endpoint can dial and accept libp2p data streams.
    pub fn has_libp2p(&self) -> bool {
        self.p2p.is_some()
    }

    /// Inbound connections and streams closed unread by admission control
    /// (a source over its rate or its concurrent limit, or every routing
    /// slot busy) since this plane started.
    pub fn refused_connections(&self) -> u64 {
        let tcp = self.shared.tcp_admission.lock().map_or(0, |a| a.refused);
        let p2p = self.shared.p2p_admission.lock().map_or(0, |a| a.refused);
        tcp + p2p
    }

    /// The latest inbound connections refused before reaching a round (a
    /// bad preamble, an unknown group, an impersonating stream), newest last;
    /// at most 32.
    pub fn recent_rejections(&self) -> Vec<RejectedConnection> {
        self.shared
            .recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Wait until a rejection matching `pred` has been recorded.
    #[cfg(test)]
    pub(crate) async fn rejection_where(
        &self,
        pred: impl Fn(&RejectedConnection) -> bool,
    ) -> RejectedConnection {
        loop {
            let notified = self.shared.rejection.notified();
            if let Some(r) = self.recent_rejections().into_iter().find(|r| pred(r)) {
                return r;
            }
            notified.await;
        }
    }

    /// A scratch buffer of `n` values from the pool.
    pub(crate) fn take_buffer(&self, n: usize) -> Vec<f32> {
        self.pool.take(n)
    }

    /// Route connections for `group_id` (whose members' peer ids are
    /// `members`, in group order) into a channel until the guard drops.
    pub(crate) fn register(
        &self,
        group_id: [u8; 32],
        members: Vec<Vec<u8>>,
        capacity: usize,
    ) -> RouteGuard {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let rejected = Arc::new(Mutex::new(Vec::new()));
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.insert(
                group_id,
                Route {
                    tx,
                    members: Arc::new(members),
                    rejected: rejected.clone(),
                },
            );
        }
        self.shared.registered.notify_waiters();
        RouteGuard {
            shared: self.shared.clone(),
            group_id,
            rx,
            rejected,
        }
    }
}

/// A registered round; unregisters on drop.
#[derive(Debug)]
pub(crate) struct RouteGuard {
    shared: Arc<Shared>,
    group_id: [u8; 32],
    pub(crate) rx: mpsc::Receiver<Incoming>,
    rejected: Arc<Mutex<Vec<RejectedConnection>>>,
}

impl RouteGuard {
    /// Connections for this round refused so far.
    pub(crate) fn rejected(&self) -> Vec<RejectedConnection> {
        self.rejected.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.remove(&self.group_id);
        }
    }
}

/// Read a connection's opening within `timeout`: answer a probe, or hand a
/// sender to the round it names once that round is registered (and, for a
/// libp2p stream from `remote`, once `remote` is the member it claims to be).
async fn route(
    shared: &Shared,
    stream: DataStream,
    remote: Option<PeerId>,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> std::result::Result<(), PeerFault> {
    let path = stream.path();
    let res = route_inner(shared, stream, remote, addr, timeout).await;
    if let Err((claimed_sender, fault)) = &res {
        shared.note_rejection(RejectedConnection {
            peer: remote,
            path,
            claimed_sender: *claimed_sender,
            fault: fault.clone(),
        });
    }
    res.map_err(|(_, f)| f)
}

async fn route_inner(
    shared: &Shared,
    mut stream: DataStream,
    remote: Option<PeerId>,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> std::result::Result<(), (Option<usize>, PeerFault)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pre = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut pre)).await {
        Err(_) => return Err((None, PeerFault::Stalled { timeout })),
        Ok(Err(e)) => {
            return Err((
                None,
                PeerFault::Disconnected {
                    reason: e.to_string(),
                },
            ));
        }
        Ok(Ok(_)) => {}
    }
    let preamble = match Opening::decode(&pre).map_err(|f| (None, f))? {
        Opening::Probe(nonce) => {
            let id = shared.identity.get().map(Vec::as_slice).unwrap_or(&[]);
            let reply = probe_reply(&nonce, id);
            let answer = async {
                stream.write_all(&reply).await?;
                stream.shutdown().await
            };
            // A prober that does not read its answer is its own problem.
            let _ = tokio::time::timeout_at(deadline, answer).await;
            return Ok(());
        }
        Opening::Round(p) => p,
    };
    let sender = Some(preamble.sender as usize);
    if let DataStream::Tcp(s) = &stream {
        let _ = s.set_nodelay(true);
    }
    // A sender may connect before this peer has registered the round: wait for
    // the registration until the deadline.
    loop {
        let notified = shared.registered.notified();
        let found = shared.routes.lock().ok().and_then(|r| {
            r.get(&preamble.group_id)
                .map(|r| (r.tx.clone(), r.members.clone(), r.rejected.clone()))
        });
        if let Some((tx, members, rejected)) = found {
            if let Some(peer) = remote {
                check_stream_peer(peer, &members, preamble.sender as usize).map_err(|fault| {
                    if let Ok(mut r) = rejected.lock()
                        && r.len() < MAX_REJECTIONS
                    {
                        r.push(RejectedConnection {
                            peer: Some(peer),
                            path: DataPath::Libp2p,
                            claimed_sender: sender,
                            fault: fault.clone(),
                        });
                    }
                    (sender, fault)
                })?;
            }
            return tx
                .send_timeout(
                    Incoming {
                        stream,
                        preamble,
                        remote,
                        addr,
                    },
                    timeout,
                )
                .await
                .map_err(|_| {
                    (
                        sender,
                        PeerFault::ProtocolViolation {
                            reason: "round is not accepting connections",
                        },
                    )
                });
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err((sender, PeerFault::BadGroupId));
        }
    }
}

/// A libp2p stream from `peer` may take only its own sender slot.
fn check_stream_peer(
    peer: PeerId,
    members: &[Vec<u8>],
    sender: usize,
) -> std::result::Result<(), PeerFault> {
    let Some(claimed) = members.get(sender) else {
        return Err(PeerFault::ProtocolViolation {
            reason: "sender index outside the group",
        });
    };
    if *claimed == peer.to_bytes() {
        return Ok(());
    }
    tracing::warn!(
        %peer,
        claimed = %crate::averager::peer_label(claimed),
        sender,
        "averaging: libp2p data stream claims another member's sender slot"
    );
    Err(PeerFault::ImpersonatedSender { sender })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_buffers_are_reused_and_capped() {
        let pool = Arc::new(BytePool::default());
        let ptr = {
            let mut b = pool.take();
            assert!(b.is_empty());
            b.resize(1 << 20, 7);
            b.as_ptr()
        };
        // The grown buffer came back and is handed out again, contents kept
        // (frames overwrite what they use, so nothing is zero-filled again).
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1 << 20);
        drop(b);
        // A buffer larger than the byte cap is not kept.
        {
            let mut big = pool.take();
            big.resize(POOL_BYTES_MAX + 1, 0);
        }
        assert!(pool.take().is_empty());
    }

    #[test]
    fn f32_buffers_are_reused_with_the_requested_length() {
        let pool = BufferPool::default();
        let v = pool.take(1000);
        assert_eq!(v.len(), 1000);
        let ptr = v.as_ptr();
        pool.give(v);
        let w = pool.take(10);
        assert_eq!((w.len(), w.as_ptr()), (10, ptr));
    }
}
