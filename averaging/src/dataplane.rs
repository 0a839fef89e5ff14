//! The data plane: one TCP listener per averager that hands inbound connections
//! to the round (group id) they name.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use crate::{
    error::{AveragingError, PeerFault, Result},
    wire::{PREAMBLE_LEN, Preamble},
};

/// An inbound connection routed to a round.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) stream: TcpStream,
    pub(crate) preamble: Preamble,
}

type Routes = Mutex<HashMap<[u8; 32], mpsc::Sender<Incoming>>>;

#[derive(Debug, Default)]
struct Shared {
    routes: Routes,
    registered: Notify,
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

/// A data-plane endpoint. Node and auxiliary peers listen; client-mode peers use
/// [`DataPlane::client`] and only connect out.
#[derive(Debug)]
pub struct DataPlane {
    shared: Arc<Shared>,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) bytes: Arc<BytePool>,
    local_addr: Option<SocketAddr>,
    accept_task: Option<JoinHandle<()>>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Some(t) = self.accept_task.take() {
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
                        let shared = task_shared.clone();
                        tokio::spawn(async move {
                            if let Err(fault) = route(shared, stream, preamble_timeout).await {
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
            accept_task: Some(accept_task),
        })
    }

    /// An endpoint that accepts nothing (client mode).
    pub fn client() -> Self {
        Self {
            shared: Arc::new(Shared::default()),
            pool: Arc::default(),
            bytes: Arc::default(),
            local_addr: None,
            accept_task: None,
        }
    }

    /// The listening address (`None` in client mode).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// A scratch buffer of `n` values from the pool.
    pub(crate) fn take_buffer(&self, n: usize) -> Vec<f32> {
        self.pool.take(n)
    }

    /// Route connections for `group_id` into a channel until the guard drops.
    pub(crate) fn register(&self, group_id: [u8; 32], capacity: usize) -> RouteGuard {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.insert(group_id, tx);
        }
        self.shared.registered.notify_waiters();
        RouteGuard {
            shared: self.shared.clone(),
            group_id,
            rx,
        }
    }
}

/// A registered round; unregisters on drop.
#[derive(Debug)]
pub(crate) struct RouteGuard {
    shared: Arc<Shared>,
    group_id: [u8; 32],
    pub(crate) rx: mpsc::Receiver<Incoming>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.remove(&self.group_id);
        }
    }
}

async fn route(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    timeout: Duration,
) -> std::result::Result<(), PeerFault> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pre = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut pre)).await {
        Err(_) => return Err(PeerFault::Stalled { timeout }),
        Ok(Err(e)) => {
            return Err(PeerFault::Disconnected {
                reason: e.to_string(),
            });
        }
        Ok(Ok(_)) => {}
    }
    let preamble = Preamble::decode(&pre)?;
    let _ = stream.set_nodelay(true);
    // A sender may connect before this peer has registered the round: wait for
    // the registration until the deadline.
    loop {
        let notified = shared.registered.notified();
        let tx = shared
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&preamble.group_id).cloned());
        if let Some(tx) = tx {
            return tx
                .send_timeout(Incoming { stream, preamble }, timeout)
                .await
                .map_err(|_| PeerFault::ProtocolViolation {
                    reason: "round is not accepting connections",
                });
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(PeerFault::BadGroupId);
        }
    }
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
