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

/// Protocol → the acceptor's channel.
type Acceptors = HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>;

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
    /// not yet received. `None` if a live acceptor already holds the protocol.
    pub(crate) fn accept(
        &self,
        protocol: StreamProtocol,
        capacity: usize,
    ) -> Option<mpsc::Receiver<(PeerId, Stream)>> {
        let mut acceptors = self.lock();
        acceptors.retain(|_, sender| !sender.is_closed());
        if acceptors.contains_key(&protocol) {
            return None;
        }
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        acceptors.insert(protocol, sender);
        Some(receiver)
    }

    /// The protocols with a live acceptor.
    fn protocols(&self) -> Vec<StreamProtocol> {
        let mut acceptors = self.lock();
        acceptors.retain(|_, sender| !sender.is_closed());
        acceptors.keys().cloned().collect()
    }

    /// Hands a negotiated inbound stream to its acceptor. A full acceptor
    /// drops (resets) the stream: the bound is the caller's capacity.
    fn deliver(&self, peer: PeerId, protocol: StreamProtocol, stream: Stream) {
        let mut acceptors = self.lock();
        let Some(sender) = acceptors.get(&protocol) else {
            tracing::debug!(%peer, %protocol, "no acceptor; inbound stream dropped");
            return;
        };
        match sender.try_send((peer, stream)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%peer, %protocol, "acceptor is full; inbound stream dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(%peer, %protocol, "acceptor is gone; inbound stream dropped");
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
