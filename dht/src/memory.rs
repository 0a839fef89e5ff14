//! Memory-based connection limits: while this process's resident memory is
//! over its cap, new connections (inbound and outbound) are denied, so a
//! node that is running out of memory stops taking on more peers before the
//! operating system kills it. Connections already open are kept.
//!
//! The resident set is read from `/proc/self/status` (Linux), at most every
//! [`REFRESH`]; where it cannot be read the limit is off, and says so once.
//! rust-libp2p's `memory-connection-limits` does the same through `sysinfo`;
//! reading one proc file keeps that dependency out.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    },
};

/// How stale the resident-memory reading may be when a connection arrives.
pub(crate) const REFRESH: Duration = Duration::from_millis(100);

/// How much memory this process may hold before new connections are denied
/// ([`DhtConfig::max_memory`](crate::DhtConfig::max_memory)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryCap {
    /// No memory-based limit.
    Off,
    /// This many bytes of resident memory.
    Bytes(u64),
    /// This fraction (0, 1] of the machine's total memory (`MemTotal`).
    FractionOfSystem(f64),
}

/// The connection was denied because resident memory is over the cap.
#[derive(Debug, thiserror::Error)]
#[error("resident memory {resident} bytes is over this node's cap of {cap} bytes")]
pub struct MemoryCapExceeded {
    /// The process's resident memory when the connection arrived.
    pub resident: u64,
    /// The cap.
    pub cap: u64,
}

/// A `VmRSS:` or `MemTotal:` line's value in bytes (the files give kB).
fn kilobytes_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// This process's resident memory, bytes (`None`: not on Linux, or unreadable).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kilobytes_field(&status, "VmRSS:")
}

fn system_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kilobytes_field(&info, "MemTotal:")
}

impl MemoryCap {
    /// The cap in bytes on this machine (`None`: no limit).
    pub(crate) fn resolve(self) -> Option<u64> {
        match self {
            Self::Off => None,
            Self::Bytes(n) => Some(n),
            Self::FractionOfSystem(f) => system_bytes().map(|total| (total as f64 * f) as u64),
        }
    }
}

/// The behaviour: denies connections while resident memory is over `cap`.
pub(crate) struct MemoryLimits {
    cap: Option<u64>,
    last: Option<(Instant, u64)>,
    /// Connections denied so far (shared with the node's stats).
    pub(crate) denied: Arc<AtomicU64>,
}

impl MemoryLimits {
    pub(crate) fn new(cap: MemoryCap) -> Self {
        let cap = cap.resolve();
        if cap.is_some() && resident_bytes().is_none() {
            tracing::warn!(
                "resident memory cannot be read on this system; no memory-based connection limit"
            );
        }
        Self {
            cap,
            last: None,
            denied: Arc::default(),
        }
    }

    fn resident(&mut self, now: Instant) -> Option<u64> {
        if let Some((at, bytes)) = self.last
            && now.duration_since(at) < REFRESH
        {
            return Some(bytes);
        }
        let bytes = resident_bytes()?;
        self.last = Some((now, bytes));
        Some(bytes)
    }

    fn check(&mut self, peer: Option<PeerId>) -> Result<(), ConnectionDenied> {
        let Some(cap) = self.cap else { return Ok(()) };
        let Some(resident) = self.resident(Instant::now()) else {
            return Ok(());
        };
        if resident <= cap {
            return Ok(());
        }
        let n = self.denied.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                ?peer,
                resident,
                cap,
                denied = n,
                "resident memory over the cap: denying new connections"
            );
        }
        Err(ConnectionDenied::new(MemoryCapExceeded { resident, cap }))
    }
}

impl NetworkBehaviour for MemoryLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check(None)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        _addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.check(maybe_peer)?;
        Ok(Vec::new())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  1000 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(kilobytes_field(status, "VmRSS:"), Some(2048 * 1024));
        assert_eq!(
            kilobytes_field("MemTotal:       16 kB\n", "MemTotal:"),
            Some(16384)
        );
        assert_eq!(kilobytes_field("VmRSS: lots kB\n", "VmRSS:"), None);
        assert_eq!(kilobytes_field("", "VmRSS:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_cap_below_the_resident_set_denies_and_one_above_admits() {
        let resident = resident_bytes().expect("VmRSS on Linux");
        assert!(resident > 1 << 20, "{resident}");
        let mut low = MemoryLimits::new(MemoryCap::Bytes(1));
        assert!(low.check(None).is_err());
        assert!(low.check(None).is_err());
        assert_eq!(low.denied.load(Ordering::Relaxed), 2);
        let mut high = MemoryLimits::new(MemoryCap::Bytes(u64::MAX));
        assert!(high.check(None).is_ok());
        let mut fraction = MemoryLimits::new(MemoryCap::FractionOfSystem(1.0));
        assert!(fraction.check(None).is_ok());
        assert!(MemoryLimits::new(MemoryCap::Off).check(None).is_ok());
    }
}
