//! A hostile peer: a raw libp2p swarm speaking the Colony kad protocol with an
//! unfiltered store, so it can push and serve arbitrary record bytes.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use colony_dht::{IDENTIFY_PROTOCOL, KAD_PROTOCOL, Multiaddr, PeerId};
use futures::StreamExt;
use libp2p::{
    Swarm, identify,
    identity::Keypair,
    kad::{
        self, Mode, QueryResult, Quorum, Record, RecordKey, store::MemoryStore, store::RecordStore,
    },
    noise,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};

#[derive(NetworkBehaviour)]
pub struct AttackerBehaviour {
    pub kad: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
    pub stream: libp2p_stream::Behaviour,
}

pub struct Attacker {
    pub swarm: Swarm<AttackerBehaviour>,
}

const WAIT: Duration = Duration::from_secs(20);

impl Attacker {
    pub async fn new() -> Self {
        let keypair = Keypair::generate_ed25519();
        let peer_id = keypair.public().to_peer_id();
        let mut cfg = kad::Config::new(KAD_PROTOCOL);
        cfg.set_max_packet_size(2 << 20);
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), cfg);
        kad.set_mode(Some(Mode::Server));
        let behaviour = AttackerBehaviour {
            kad,
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_owned(),
                keypair.public(),
            )),
            stream: libp2p_stream::Behaviour::new(),
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(|_| behaviour)
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        let mut me = Self { swarm };
        me.drive_until(|e| matches!(e, SwarmEvent::NewListenAddr { .. }))
            .await;
        me
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    async fn drive_until(
        &mut self,
        mut done: impl FnMut(&SwarmEvent<AttackerBehaviourEvent>) -> bool,
    ) {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.swarm.select_next_some().await;
                if done(&event) {
                    return;
                }
            }
        })
        .await
        .expect("attacker wait timed out");
    }

    /// Dials a node and waits until it has identified us (so it knows we serve kad).
    pub async fn connect(&mut self, addr: Multiaddr, peer: PeerId) {
        self.swarm.dial(addr).expect("dial");
        self.drive_until(|e| {
            matches!(e, SwarmEvent::Behaviour(AttackerBehaviourEvent::Identify(identify::Event::Received { peer_id, .. })) if *peer_id == peer)
        })
        .await;
    }

    /// Sends raw record bytes to `peer` as a kad PUT_VALUE and waits for the ack.
    pub async fn put_to(&mut self, peer: PeerId, key: &[u8], value: Vec<u8>) {
        let record = Record {
            key: RecordKey::new(&key),
            value,
            publisher: None,
            expires: None,
        };
        let id = self.swarm.behaviour_mut().kad.put_record_to(
            record,
            std::iter::once(peer),
            Quorum::One,
        );
        self.drive_until(|e| {
            matches!(e, SwarmEvent::Behaviour(AttackerBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id: q, result: QueryResult::PutRecord(_), .. })) if *q == id)
        })
        .await;
    }

    /// Sends `n` copies of raw record bytes to `peer` as kad PUT_VALUEs, all
    /// at once, and waits for every ack (or failure). Returns how many were
    /// acknowledged.
    pub async fn flood_to(&mut self, peer: PeerId, key: &[u8], value: Vec<u8>, n: usize) -> usize {
        let mut pending: std::collections::HashSet<kad::QueryId> = (0..n)
            .map(|_| {
                let record = Record {
                    key: RecordKey::new(&key),
                    value: value.clone(),
                    publisher: None,
                    expires: None,
                };
                self.swarm.behaviour_mut().kad.put_record_to(
                    record,
                    std::iter::once(peer),
                    Quorum::One,
                )
            })
            .collect();
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !pending.is_empty() {
            let Ok(event) = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await
            else {
                break;
            };
            if let SwarmEvent::Behaviour(AttackerBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    id,
                    result: QueryResult::PutRecord(r),
                    ..
                },
            )) = event
                && pending.remove(&id)
            {
                acked += usize::from(r.is_ok());
            }
        }
        acked
    }

    /// Holds raw record bytes in the attacker's own store, served to any reader.
    pub fn hold(&mut self, key: &[u8], value: Vec<u8>) {
        let record = Record {
            key: RecordKey::new(&key),
            value,
            publisher: None,
            expires: None,
        };
        self.swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .put(record)
            .expect("hold");
    }

    /// Keeps the swarm running in the background (answering lookups).
    pub fn serve(mut self) -> (libp2p_stream::Control, tokio::task::JoinHandle<()>) {
        let control = self.swarm.behaviour().stream.new_control();
        let task = tokio::spawn(async move {
            loop {
                self.swarm.select_next_some().await;
            }
        });
        (control, task)
    }
}
