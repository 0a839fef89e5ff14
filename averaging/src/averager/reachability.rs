//! The leader's check of its group's data addresses before a round depends
//! on them: an address a member cannot use is dropped from the group (the
//! member is then reached through its libp2p connection), so senders do not
//! spend the round's deadlines on it.
//!
//! Two checks per member with a data address:
//! * a rule ([`vet_announced_addr`]): an address that names no host (the
//!   unspecified IP, port 0, multicast, broadcast) never works, and a
//!   loopback one works only for a peer whose libp2p connection comes from
//!   loopback too;
//! * a probe ([`probe`]): a TCP connect and an exchange that only a Colony
//!   data plane of that very peer answers (its answer carries its libp2p
//!   peer id), so a port held by some other service, or another peer's data
//!   plane, fails. Probes start when a join arrives and run while the leader
//!   waits for its window; verdicts are cached per (peer, address).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use colony_dht::{Dht, PeerId};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

use super::{config::multiaddr_ip, peer_label};
use crate::{
    expiring::ExpiringMap,
    group::AssembledGroup,
    wire::{PROBE_ACK, PROBE_MAX_ID, probe_request},
};

/// Probes in flight at once; more wait for a slot (inside their timeout).
const MAX_PROBES: usize = 8;
/// Verdicts remembered.
const MAX_VERDICTS: usize = 1024;
/// How long a verdict holds before the address is probed again.
const VERDICT_TTL: Duration = Duration::from_secs(120);

/// Why an announced data address is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unusable {
    /// The address names no reachable host.
    #[error("{0} is not a unicast address with a port")]
    NoHost(SocketAddr),
    /// Loopback, announced to a peer that reaches this one from elsewhere.
    #[error("{addr} is loopback but the peer connects from {observed}")]
    LoopbackFromElsewhere {
        /// The announced address.
        addr: SocketAddr,
        /// A non-loopback IP its connection comes from.
        observed: IpAddr,
    },
    /// Nothing answered the probe in time, or the connection failed.
    #[error("probe failed: {0}")]
    Unreachable(String),
    /// Something answered, but not a Colony data plane.
    #[error("not a Colony data plane")]
    NotADataPlane,
    /// A Colony data plane answered, of another peer.
    #[error("the data plane there belongs to another peer")]
    OtherPeer,
}

/// Whether `addr`, announced by a peer whose connections to this node come
/// from `observed` (empty: unknown), can be used at all.
///
/// # Errors
/// Why not.
pub(crate) fn vet_announced_addr(addr: SocketAddr, observed: &[IpAddr]) -> Result<(), Unusable> {
    let ip = addr.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast || addr.port() == 0 {
        return Err(Unusable::NoHost(addr));
    }
    if ip.is_loopback()
        && let Some(&observed) = observed.iter().find(|o| !o.is_loopback())
    {
        return Err(Unusable::LoopbackFromElsewhere { addr, observed });
    }
    Ok(())
}

/// Ask the data plane at `addr` whether it is `peer`'s, within `timeout`.
///
/// # Errors
/// Why the address is not usable.
pub(crate) async fn probe(
    addr: SocketAddr,
    peer: &[u8],
    timeout: Duration,
) -> Result<(), Unusable> {
    let nonce: [u8; 32] = rand::random();
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| Unusable::Unreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        s.write_all(&probe_request(&nonce))
            .await
            .map_err(|e| Unusable::Unreachable(e.to_string()))?;
        // A service that closes, or sends something else, is not a data
        // plane: the magic is checked first, so a banner fails at once.
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic)
            .await
            .map_err(|_| Unusable::NotADataPlane)?;
        let mut head = [0u8; 32 + 1];
        if &magic != PROBE_ACK || s.read_exact(&mut head).await.is_err() {
            return Err(Unusable::NotADataPlane);
        }
        if head[..32] != nonce || usize::from(head[32]) > PROBE_MAX_ID {
            return Err(Unusable::NotADataPlane);
        }
        let mut id = vec![0u8; usize::from(head[32])];
        s.read_exact(&mut id)
            .await
            .map_err(|_| Unusable::NotADataPlane)?;
        if id != peer {
            return Err(Unusable::OtherPeer);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Unusable::Unreachable(format!(
                "no answer within {timeout:?}"
            )))
        })
}

type Verdict = Shared<BoxFuture<'static, Result<(), Unusable>>>;

/// The leader's probes and their cached verdicts.
pub(crate) struct Reachability {
    dht: Dht,
    /// One probe's limit (connect and answer).
    timeout: Duration,
    slots: Arc<Semaphore>,
    verdicts: Mutex<ExpiringMap<(Vec<u8>, SocketAddr), Verdict>>,
    /// Addresses already reported at warn (every round's vetting sees them
    /// again; they are logged once per verdict lifetime, then at debug).
    reported: Mutex<ExpiringMap<(Vec<u8>, SocketAddr), ()>>,
}

impl std::fmt::Debug for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reachability")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Reachability {
    pub(crate) fn new(dht: Dht, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            dht,
            timeout,
            slots: Arc::new(Semaphore::new(MAX_PROBES)),
            verdicts: Mutex::new(ExpiringMap::new(MAX_VERDICTS, VERDICT_TTL)),
            reported: Mutex::new(ExpiringMap::new(MAX_VERDICTS, VERDICT_TTL)),
        })
    }

    /// The (cached, or now started) probe of `peer`'s `addr`.
    pub(crate) fn start(&self, peer: &[u8], addr: SocketAddr) -> Verdict {
        let now = tokio::time::Instant::now();
        let key = (peer.to_vec(), addr);
        let Ok(mut verdicts) = self.verdicts.lock() else {
            return futures::future::ready(Ok(())).boxed().shared();
        };
        if let Some(v) = verdicts.get(&key, now) {
            return v.clone();
        }
        let (slots, timeout, peer) = (self.slots.clone(), self.timeout, peer.to_vec());
        let probing = async move {
            // The slot wait counts against the probe's own limit.
            let run = async {
                let _slot = slots.acquire_owned().await;
                probe(addr, &peer, timeout).await
            };
            tokio::time::timeout(timeout * 2, run)
                .await
                .unwrap_or_else(|_| Err(Unusable::Unreachable("no probe slot in time".into())))
        };
        // Spawned, so the probe runs while nobody awaits it yet.
        let task = tokio::spawn(probing);
        let verdict = async move {
            task.await
                .unwrap_or_else(|_| Err(Unusable::Unreachable("probe task failed".into())))
        }
        .boxed()
        .shared();
        verdicts.insert(key, verdict.clone(), now);
        verdict
    }

    /// `group` with every data address this leader finds unusable dropped
    /// (each logged at warn naming the peer and the address). Waits for the
    /// probes at most `limit`; an address whose probe has not answered by
    /// then is kept (senders fall back on their own).
    pub(crate) async fn vet(&self, mut group: AssembledGroup, limit: Duration) -> AssembledGroup {
        let me = self.dht.peer_id().to_bytes();
        let checks = group.members.iter().map(|m| {
            // Not its own: a host behind a port forward often cannot reach its
            // public address from inside (no hairpin NAT), and its own view
            // says nothing about what others can reach.
            let verdict = (m.peer_id != me)
                .then_some(m.data_addr)
                .flatten()
                .map(|addr| (addr, self.start(&m.peer_id, addr)));
            let (peer, dht, me) = (m.peer_id.clone(), self.dht.clone(), &me);
            async move {
                let (addr, verdict) = verdict?;
                if peer != *me {
                    let observed = observed_ips(&dht, &peer).await;
                    if let Err(why) = vet_announced_addr(addr, &observed) {
                        return Some(why);
                    }
                }
                match tokio::time::timeout(limit, verdict).await {
                    Ok(Err(why)) => Some(why),
                    Ok(Ok(())) | Err(_) => None,
                }
            }
        });
        let verdicts = futures::future::join_all(checks).await;
        for (m, why) in group.members.iter_mut().zip(verdicts) {
            if let (Some(why), Some(addr)) = (why, m.data_addr) {
                let now = tokio::time::Instant::now();
                let key = (m.peer_id.clone(), addr);
                let first = self.reported.lock().is_ok_and(|mut r| {
                    let fresh = r.get(&key, now).is_none();
                    if fresh {
                        r.insert(key, (), now);
                    }
                    fresh
                });
                if first {
                    tracing::warn!(
                        peer = %peer_label(&m.peer_id),
                        %addr,
                        reason = %why,
                        "averaging: dropping an unusable data address; the member is reached over libp2p"
                    );
                } else {
                    tracing::debug!(peer = %peer_label(&m.peer_id), %addr, reason = %why, "averaging: data address still unusable");
                }
                m.data_addr = None;
            }
        }
        group
    }
}

/// The IPs `peer`'s open connections to this node come from.
async fn observed_ips(dht: &Dht, peer: &[u8]) -> Vec<IpAddr> {
    let Ok(id) = PeerId::from_bytes(peer) else {
        return Vec::new();
    };
    match dht.peer_addresses(id).await {
        Ok(Some(a)) => a
            .connected
            .iter()
            .filter_map(|m| multiaddr_ip(&m.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_naming_no_host_are_never_usable() {
        for a in [
            "0.0.0.0:7000",
            "[::]:7000",
            "224.0.0.1:7000",
            "[ff02::1]:7000",
            "255.255.255.255:7000",
            "10.0.0.5:0",
        ] {
            assert_eq!(
                vet_announced_addr(sa(a), &[]),
                Err(Unusable::NoHost(sa(a))),
                "{a}"
            );
        }
    }

    #[test]
    fn loopback_is_usable_only_from_loopback() {
        let lo = sa("127.0.0.1:7000");
        assert_eq!(vet_announced_addr(lo, &[]), Ok(()), "unknown: kept");
        assert_eq!(vet_announced_addr(lo, &[ip("127.0.0.1")]), Ok(()));
        assert_eq!(vet_announced_addr(sa("[::1]:7000"), &[ip("::1")]), Ok(()));
        assert_eq!(
            vet_announced_addr(lo, &[ip("127.0.0.1"), ip("10.1.2.3")]),
            Err(Unusable::LoopbackFromElsewhere {
                addr: lo,
                observed: ip("10.1.2.3"),
            })
        );
        assert!(vet_announced_addr(sa("[::1]:7000"), &[ip("192.168.0.9")]).is_err());
    }

    #[test]
    fn routable_addresses_pass_the_rule_from_anywhere() {
        for a in ["10.1.2.3:7000", "203.0.113.5:7000", "[2001:db8::1]:7000"] {
            assert_eq!(vet_announced_addr(sa(a), &[ip("198.51.100.7")]), Ok(()));
            assert_eq!(vet_announced_addr(sa(a), &[ip("127.0.0.1")]), Ok(()));
        }
    }
}

#[cfg(test)]
mod probe_tests {
    use colony_dht::{DhtConfig, StreamProtocol};
    use tokio::net::TcpListener;

    use super::*;
    use crate::{AveragingMode, GroupMember, round::DataPlane};

    /// A listener that accepts and holds connections, writing `greeting`
    /// to each (nothing when empty).
    async fn impostor(greeting: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                if !greeting.is_empty() {
                    let _ = s.write_all(greeting).await;
                }
                held.push(s);
            }
        });
        addr
    }

    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn member(peer_id: Vec<u8>, data_addr: SocketAddr) -> GroupMember {
        GroupMember {
            peer_id,
            data_addr: Some(data_addr),
            mode: AveragingMode::Node,
            bandwidth: None,
            round_public_key: [7; 32],
            signed: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_announcing_peers_data_plane_passes_the_probe() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dht = Dht::new(DhtConfig::default()).await.unwrap();
            let plane = DataPlane::bind("127.0.0.1:0".parse().unwrap(), Duration::from_secs(2))
                .await
                .unwrap()
                .with_libp2p(&dht, StreamProtocol::new("/colony/averaging/probe/data/1"))
                .unwrap();
            let addr = plane.local_addr().unwrap();
            let me = dht.peer_id().to_bytes();
            let t = Duration::from_millis(400);
            assert_eq!(probe(addr, &me, t).await, Ok(()));
            assert_eq!(
                probe(addr, b"someone else", t).await,
                Err(Unusable::OtherPeer)
            );
            let silent = impostor(b"").await;
            assert!(matches!(
                probe(silent, &me, t).await,
                Err(Unusable::Unreachable(_))
            ));
            let chatty = impostor(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            assert_eq!(probe(chatty, &me, t).await, Err(Unusable::NotADataPlane));
            assert!(matches!(
                probe(closed_port(), &me, t).await,
                Err(Unusable::Unreachable(_))
            ));
            // Probes are answered, not rejected.
            assert!(plane.recent_rejections().is_empty());

            // The leader's vetting drops exactly the unusable addresses, and
            // remembers its verdicts.
            let reach = Reachability::new(dht.clone(), t);
            let group = AssembledGroup {
                group_id: [1; 32],
                members: vec![
                    member(me.clone(), addr),
                    member(b"silent".to_vec(), silent),
                    member(b"chatty".to_vec(), chatty),
                    member(b"nohost".to_vec(), "0.0.0.0:7000".parse().unwrap()),
                ],
            };
            let vetted = reach.vet(group, Duration::from_secs(5)).await;
            let kept: Vec<_> = vetted.members.iter().map(|m| m.data_addr).collect();
            assert_eq!(kept, vec![Some(addr), None, None, None]);
            let a = reach.start(b"silent", silent);
            assert!(a.ptr_eq(&reach.start(b"silent", silent)), "cached");
            assert_eq!(
                a.await,
                Err(Unusable::Unreachable(format!("no answer within {t:?}")))
            );
        })
        .await
        .expect("test timed out");
    }
}
