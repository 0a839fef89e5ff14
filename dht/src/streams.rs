//! Inbound application streams: a small behaviour that hands every negotiated
//! inbound stream straight to the acceptor's bounded channel.
//!
//! libp2p-stream's `Control::accept` queues inbound streams in a channel with
//! room for exactly one stream (`futures::channel::mpsc::channel(0)` with a
//! single sender) and drops (resets) any stream that arrives while that slot
//! is taken. Streams are delivered from the connection tasks, so when several
//! peers open streams at once, or the acceptor's task is starved of CPU, all
//! but the first are reset: the opener's first write fails with yamux's
//! "connection is closed" even though the connection is fine. Here the
//! connection task delivers into the acceptor's own channel, whose capacity
//! the caller of [`Dht::accept_streams`](crate::Dht::accept_streams) chooses.
//!
//! Outbound streams still go through libp2p-stream's `Control::open_stream`,
//! which has no such limit; its behaviour never accepts a protocol because no
//! protocol is registered with it.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::{Ready, ready},
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{
        Endpoint, UpgradeInfo,
        transport::PortUse,
        upgrade::{DeniedUpgrade, InboundUpgrade},
    },
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, FullyNegotiatedInbound},
    },
};
use tokio::sync::mpsc;

/// Streams each peer has waiting in one acceptor's queue (taken by neither
/// side yet), shared by the registry and the acceptor's receiver.
type Queued = Arc<Mutex<HashMap<PeerId, usize>>>;

fn lock_queued(queued: &Mutex<HashMap<PeerId, usize>>) -> MutexGuard<'_, HashMap<PeerId, usize>> {
    queued
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One protocol's acceptor.
struct Acceptor {
    sender: mpsc::Sender<(PeerId, Stream)>,
    queued: Queued,
    /// Streams one peer may have waiting at once.
    per_peer: usize,
}

/// Protocol → its acceptor.
type Acceptors = HashMap<StreamProtocol, Acceptor>;

/// The streams accepted for one protocol, in arrival order
/// ([`Dht::accept_streams`](crate::Dht::accept_streams)). Dropping it stops
/// accepting the protocol.
pub struct InboundStreamQueue {
    receiver: mpsc::Receiver<(PeerId, Stream)>,
    queued: Queued,
}

impl InboundStreamQueue {
    fn taken(&self, peer: &PeerId) {
        let mut queued = lock_queued(&self.queued);
        if let Some(n) = queued.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                queued.remove(peer);
            }
        }
    }

    /// The next stream and the peer that opened it; `None` once the node stopped.
    pub async fn recv(&mut self) -> Option<(PeerId, Stream)> {
        let (peer, stream) = self.receiver.recv().await?;
        self.taken(&peer);
        Some((peer, stream))
    }

    /// The next stream if one is waiting.
    ///
    /// # Errors
    /// Empty, or disconnected once the node stopped.
    pub fn try_recv(&mut self) -> Result<(PeerId, Stream), mpsc::error::TryRecvError> {
        let (peer, stream) = self.receiver.try_recv()?;
        self.taken(&peer);
        Ok((peer, stream))
    }
}

/// The registry of accepted protocols, shared by the behaviour, its connection
/// handlers and the [`Dht`](crate::Dht) handle.
#[derive(Clone, Default)]
pub(crate) struct InboundRegistry {
    acceptors: Arc<Mutex<Acceptors>>,
}

impl InboundRegistry {
    fn lock(&self) -> MutexGuard<'_, Acceptors> {
        self.acceptors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an acceptor for `protocol` with room for `capacity` streams
    /// not yet received, at most `per_peer` of them from one peer. `None` if
    /// a live acceptor already holds the protocol.
    pub(crate) fn accept(
        &self,
        protocol: StreamProtocol,
        capacity: usize,
        per_peer: usize,
    ) -> Option<InboundStreamQueue> {
        let mut acceptors = self.lock();
        acceptors.retain(|_, a| !a.sender.is_closed());
        if acceptors.contains_key(&protocol) {
            return None;
        }
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let queued = Queued::default();
        acceptors.insert(
            protocol,
            Acceptor {
                sender,
                queued: queued.clone(),
                per_peer: per_peer.max(1),
            },
        );
        Some(InboundStreamQueue { receiver, queued })
    }

    /// The protocols with a live acceptor.
    fn protocols(&self) -> Vec<StreamProtocol> {
        let mut acceptors = self.lock();
        acceptors.retain(|_, a| !a.sender.is_closed());
        acceptors.keys().cloned().collect()
    }

    /// Hands a negotiated inbound stream to its acceptor. A full acceptor, or
    /// one holding its per-peer share of this peer's streams, drops (resets)
    /// the stream: the bound is the caller's capacity, and no one peer can
    /// take all of it from the others.
    fn deliver(&self, peer: PeerId, protocol: StreamProtocol, stream: Stream) {
        let mut acceptors = self.lock();
        let Some(acceptor) = acceptors.get(&protocol) else {
            tracing::debug!(%peer, %protocol, "no acceptor; inbound stream dropped");
            return;
        };
        let mut queued = lock_queued(&acceptor.queued);
        let waiting = queued.get(&peer).copied().unwrap_or(0);
        if waiting >= acceptor.per_peer {
            tracing::warn!(%peer, %protocol, waiting, "peer has its share of the acceptor's queue waiting; inbound stream dropped");
            return;
        }
        match acceptor.sender.try_send((peer, stream)) {
            Ok(()) => *queued.entry(peer).or_default() += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%peer, %protocol, "acceptor is full; inbound stream dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(%peer, %protocol, "acceptor is gone; inbound stream dropped");
                drop(queued);
                acceptors.remove(&protocol);
            }
        }
    }
}

/// Negotiates any of the registered protocols on an inbound substream.
pub(crate) struct InboundUpgradeAny {
    protocols: Vec<StreamProtocol>,
}

impl UpgradeInfo for InboundUpgradeAny {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.protocols.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for InboundUpgradeAny {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

/// The per-connection handler: accepts inbound streams, never opens any and
/// never keeps the connection alive by itself (an open stream does).
pub(crate) struct InboundHandler {
    remote: PeerId,
    registry: InboundRegistry,
}

impl ConnectionHandler for InboundHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = InboundUpgradeAny;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(
            InboundUpgradeAny {
                protocols: self.registry.protocols(),
            },
            (),
        )
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
            self.registry.deliver(self.remote, protocol, stream);
        }
    }
}

/// The behaviour carrying [`InboundHandler`]s.
pub(crate) struct InboundStreams {
    registry: InboundRegistry,
}

impl InboundStreams {
    pub(crate) fn new(registry: InboundRegistry) -> Self {
        Self { registry }
    }

    fn handler(&self, remote: PeerId) -> InboundHandler {
        InboundHandler {
            remote,
            registry: self.registry.clone(),
        }
    }
}

impl NetworkBehaviour for InboundStreams {
    type ConnectionHandler = InboundHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
