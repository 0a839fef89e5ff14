//! [`AveragerConfig`]: every knob of a [`DecentralizedAverager`](super::DecentralizedAverager),
//! and the data-plane address it announces.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use colony_dht::Dht;

use crate::{
    dataplane::DataPlane,
    error::{AveragingError, Result},
    group::{AllreduceConfig, AveragingMode},
    group_keys::is_group_bits,
};

/// Configuration of a [`DecentralizedAverager`] (reference defaults noted).
#[derive(Debug, Clone)]
pub struct AveragerConfig {
    /// Key prefix and protocol namespace; no `.` allowed. Required.
    pub prefix: String,
    /// Largest group (`None` = unbounded). Default `None`.
    pub target_group_size: Option<usize>,
    /// Smallest group that runs when time is up. Default 2.
    pub min_group_size: usize,
    /// Moshpit group bits. Default `""` (one bucket).
    pub initial_group_bits: String,
    /// How long a peer waits for others before its declared expiration. Default 5 s.
    pub min_matchmaking_time: Duration,
    /// Leader response timeout. Default 3 s.
    pub request_timeout: Duration,
    /// All-reduce knobs (part size, compression, per-part and round timeouts).
    pub allreduce: AllreduceConfig,
    /// Load-balancing bandwidth hint. Default `None`.
    pub bandwidth: Option<f64>,
    /// Node, client or auxiliary. Default node.
    pub mode: AveragingMode,
    /// Whether others may download this peer's state. Default: node mode only.
    pub allow_state_sharing: Option<bool>,
    /// Data-plane listen address. Default `127.0.0.1:0`.
    pub data_listen_addr: SocketAddr,
    /// Whether node and auxiliary peers open a TCP data plane. Default
    /// `true`. `false`: no TCP listener is bound and no data address is
    /// announced (`data_listen_addr` is unused); group members reach this
    /// peer with data streams on its libp2p connection (the averager's data
    /// protocol, `/colony/averaging/{prefix}/data/1`), for a peer that can
    /// open only its DHT port. Data streams are always accepted as well, for
    /// senders that cannot reach the TCP address.
    pub direct_data_plane: bool,
    /// Data-plane address announced to group members, when it differs from the
    /// bound one (port forwarding, NAT: bind `0.0.0.0:7000`, announce
    /// `203.0.113.5:7000`). Must name a concrete IP and a non-zero port; not
    /// allowed in client mode (clients accept no connections). Default `None`:
    /// announce the bound address, or, when bound to an unspecified IP
    /// (`0.0.0.0` / `::`), the bound port on an IP this peer's DHT node
    /// advertises (non-loopback first); construction fails if there is none.
    pub data_announce_addr: Option<SocketAddr>,
    /// How often a state donor re-declares itself (see
    /// [`DecentralizedAverager::declare_state`]). Default 30 s (reference
    /// `declare_state_period`).
    pub declare_state_period: Duration,
    /// How many distinct donors must vouch for a state's root before a
    /// joiner installs it (fewer when fewer donors are live: a majority of
    /// them). Default 2; 1 trusts any single donor.
    pub state_vouchers: usize,
    /// Slowest a state donor may serve (bytes/s) before a joiner drops it
    /// and gives its chunks to the others. Default 256 KiB/s.
    pub state_min_rate: f64,
    /// Most vouching donors a joiner downloads from at once. Default 8.
    pub state_max_donors: usize,
}

impl AveragerConfig {
    /// A config with reference defaults under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            target_group_size: None,
            min_group_size: 2,
            initial_group_bits: String::new(),
            min_matchmaking_time: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            allreduce: AllreduceConfig::default(),
            bandwidth: None,
            mode: AveragingMode::Node,
            allow_state_sharing: None,
            data_listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            direct_data_plane: true,
            data_announce_addr: None,
            declare_state_period: Duration::from_secs(30),
            state_vouchers: 2,
            state_min_rate: 256.0 * 1024.0,
            state_max_donors: 8,
        }
    }

    /// Check ranges and relations between fields.
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(AveragingError::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.prefix.is_empty() || self.prefix.contains('.') {
            return bad("prefix", "must be non-empty and contain no '.'");
        }
        if !is_group_bits(&self.initial_group_bits) {
            return bad("initial_group_bits", "must be a string of 0 and 1");
        }
        if self.min_group_size < 1 {
            return bad("min_group_size", "must be at least 1");
        }
        if self
            .target_group_size
            .is_some_and(|t| t < self.min_group_size)
        {
            return bad("target_group_size", "must be at least min_group_size");
        }
        if self.request_timeout.is_zero() || self.min_matchmaking_time.is_zero() {
            return bad("request_timeout", "timeouts must be positive");
        }
        if self.state_vouchers == 0 {
            return bad("state_vouchers", "must be at least 1");
        }
        if self.state_max_donors == 0 {
            return bad("state_max_donors", "must be at least 1");
        }
        if !(self.state_min_rate.is_finite() && self.state_min_rate > 0.0) {
            return bad("state_min_rate", "must be a positive rate");
        }
        if self.min_matchmaking_time.as_secs_f64() > crate::records::MATCHMAKING_MAX_TTL {
            return bad(
                "min_matchmaking_time",
                "must be at most MATCHMAKING_MAX_TTL (peers refuse longer declarations)",
            );
        }
        if self.request_timeout >= self.min_matchmaking_time {
            // A leader's answer must arrive well inside a declaration's
            // lifetime, or followers reach it only after it has acted.
            return bad(
                "request_timeout",
                "must be shorter than min_matchmaking_time",
            );
        }
        if self.declare_state_period.is_zero() {
            return bad("declare_state_period", "must be positive");
        }
        if let Some(a) = self.data_announce_addr {
            if !self.direct_data_plane {
                return bad(
                    "data_announce_addr",
                    "there is no TCP data plane to announce (direct_data_plane is false)",
                );
            }
            if self.mode == AveragingMode::Client {
                return bad(
                    "data_announce_addr",
                    "client-mode peers accept no data-plane connections",
                );
            }
            if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                return bad(
                    "data_announce_addr",
                    "must be a concrete unicast IP with a non-zero port",
                );
            }
            if let IpAddr::V4(v4) = a.ip()
                && v4.is_broadcast()
            {
                return bad("data_announce_addr", "must not be a broadcast address");
            }
        }
        self.allreduce.validate()
    }
}

/// The data-plane address to announce: the configured one, the bound one, or,
/// for an unspecified bind IP, the bound port on an IP the DHT node advertises.
pub(super) fn announced_data_addr(
    cfg: &AveragerConfig,
    plane: &DataPlane,
    dht: &Dht,
) -> Result<Option<SocketAddr>> {
    if cfg.mode == AveragingMode::Client {
        return Ok(None);
    }
    if let Some(a) = cfg.data_announce_addr {
        return Ok(Some(a));
    }
    let Some(bound) = plane.local_addr() else {
        return Ok(None);
    };
    // The DHT node announces external addresses (a public IP in front of
    // this host): the data plane is reached at the same IP, on its own port.
    let announced = dht
        .announce_addrs()
        .iter()
        .filter_map(|a| multiaddr_ip(&a.to_string()))
        .find(|ip| ip.is_ipv4() == bound.is_ipv4() && !ip.is_unspecified());
    if let Some(ip) = announced {
        return Ok(Some(SocketAddr::new(ip, bound.port())));
    }
    if !bound.ip().is_unspecified() {
        return Ok(Some(bound));
    }
    let ips: Vec<IpAddr> = dht
        .listen_addrs()
        .iter()
        .filter_map(|a| multiaddr_ip(&a.to_string()))
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast() && ip.is_ipv4() == bound.is_ipv4())
        .collect();
    let ip = ips
        .iter()
        .find(|ip| !ip.is_loopback())
        .or_else(|| ips.first())
        .ok_or_else(|| AveragingError::InvalidConfig {
            field: "data_announce_addr",
            reason: format!(
                "the data plane is bound to {bound} and the DHT node advertises no usable \
                 {} address: set data_announce_addr",
                if bound.is_ipv4() { "IPv4" } else { "IPv6" }
            ),
        })?;
    Ok(Some(SocketAddr::new(*ip, bound.port())))
}

/// The IP of a multiaddr's leading `/ip4/..` or `/ip6/..` component.
pub(super) fn multiaddr_ip(addr: &str) -> Option<IpAddr> {
    let mut parts = addr.split('/').skip_while(|p| p.is_empty());
    match (parts.next()?, parts.next()?) {
        ("ip4" | "ip6", ip) => ip.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tcp_data_plane_there_is_no_address_to_announce() {
        let mut c = AveragerConfig::new("run");
        c.direct_data_plane = false;
        assert!(c.validate().is_ok());
        c.data_announce_addr = Some("203.0.113.5:7000".parse().unwrap());
        assert!(matches!(
            c.validate(),
            Err(AveragingError::InvalidConfig {
                field: "data_announce_addr",
                ..
            })
        ));
    }

    #[test]
    fn a_leader_answer_must_fit_inside_a_declaration() {
        let mut c = AveragerConfig::new("run");
        assert!(c.validate().is_ok());
        c.request_timeout = c.min_matchmaking_time;
        assert!(matches!(
            c.validate(),
            Err(AveragingError::InvalidConfig {
                field: "request_timeout",
                ..
            })
        ));
        c.request_timeout = c.min_matchmaking_time / 2;
        assert!(c.validate().is_ok());
    }
}
