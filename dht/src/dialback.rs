//! Dial-back: "can you reach me on these ports?", asked of a peer over a
//! libp2p stream. Every node answers; `colony doctor` and `colony train`'s
//! reachability check ask.
//!
//! The answering node dials only the IP the asking peer's connection comes
//! from (never an address the asker names), at most [`MAX_PORTS`] ports per
//! request, with a short connect timeout and bounded concurrency, so it can be
//! used neither to scan nor to flood a third party. It answers with that IP
//! (the asker's address as the outside sees it: a NAT's public IP, for a
//! peer behind one) and, per port, whether a TCP connection was accepted.
//! A liar can answer wrongly; askers ask several peers.

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, multiaddr::Protocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{error::DhtError, node::Command};

/// The dial-back protocol.
pub const DIALBACK_PROTOCOL: StreamProtocol = StreamProtocol::new("/colony/dialback/1.0.0");
/// Most ports one request may ask about.
pub const MAX_PORTS: usize = 4;
/// Connect timeout per dialed port.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests answered at once (each dials at most `MAX_PORTS` ports).
const CONCURRENT: usize = 8;
/// Largest request and answer frames.
pub(crate) const MAX_REQUEST: usize = 64;
pub(crate) const MAX_ANSWER: usize = 4096;

/// One port's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCheck {
    /// The port that was dialed.
    pub port: u16,
    /// Whether a TCP connection to it was accepted.
    pub reachable: bool,
    /// Why not (the connect error or "timed out"); empty when reachable.
    pub detail: String,
}

/// A peer's answer to a dial-back request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialBack {
    /// The peer that answered.
    pub peer: PeerId,
    /// The IP this node's connection comes from, as that peer sees it.
    pub observed_ip: IpAddr,
    /// One verdict per requested port.
    pub ports: Vec<PortCheck>,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    observed_ip: String,
    ports: Vec<PortCheck>,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

async fn write_frame(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Serves dial-back requests until the node stops. Holds only a weak command
/// sender, so it never keeps the node alive.
pub(crate) fn serve(
    mut streams: crate::streams::InboundStreamQueue,
    commands: mpsc::WeakSender<Command>,
) {
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    tokio::spawn(async move {
        while let Some((peer, stream)) = streams.recv().await {
            let Some(commands) = commands.upgrade() else {
                break;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "dial-back busy; request dropped");
                continue;
            };
            tokio::spawn(async move {
                let _slot = slot;
                let answered =
                    tokio::time::timeout(DIAL_TIMEOUT * 3, answer(peer, stream, commands)).await;
                match answered {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "dial-back request refused"),
                    Err(_) => tracing::debug!(%peer, "dial-back request timed out"),
                }
            });
        }
    });
}

async fn answer(
    peer: PeerId,
    mut stream: Stream,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<()> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let request = read_frame(&mut stream, MAX_REQUEST).await?;
    let ports = parse_request(&request).map_err(bad)?;
    let (reply, addresses) = oneshot::channel();
    commands
        .send(Command::PeerAddresses { peer, reply })
        .await
        .map_err(|_| bad("node stopped".into()))?;
    let ip = addresses
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .and_then(|a| a.connected.iter().find_map(ip_of))
        .ok_or_else(|| bad("no connection address for the asking peer".into()))?;
    let checks = ports.iter().map(|&port| async move {
        let dial = tokio::net::TcpStream::connect((ip, port));
        match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(Ok(_)) => PortCheck {
                port,
                reachable: true,
                detail: String::new(),
            },
            Ok(Err(e)) => PortCheck {
                port,
                reachable: false,
                detail: e.to_string(),
            },
            Err(_) => PortCheck {
                port,
                reachable: false,
                detail: format!("no answer within {} s", DIAL_TIMEOUT.as_secs_f64()),
            },
        }
    });
    let ports = futures::future::join_all(checks).await;
    tracing::debug!(%peer, %ip, ?ports, "answered a dial-back request");
    let answer = rmp_serde::to_vec(&Answer {
        observed_ip: ip.to_string(),
        ports,
    })
    .map_err(|e| bad(e.to_string()))?;
    write_frame(&mut stream, &answer).await?;
    stream.close().await
}

/// A request frame's ports: 1 to [`MAX_PORTS`], none 0.
pub(crate) fn parse_request(request: &[u8]) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = rmp_serde::from_slice(request).map_err(|e| e.to_string())?;
    if ports.is_empty() || ports.len() > MAX_PORTS || ports.contains(&0) {
        return Err(format!(
            "{} ports asked (1 to {MAX_PORTS}, none 0)",
            ports.len()
        ));
    }
    Ok(ports)
}

/// An answer frame to a request for `ports`: the observed IP and one
/// verdict per port asked, in order.
pub(crate) fn parse_answer(
    answer: &[u8],
    ports: &[u16],
) -> Result<(IpAddr, Vec<PortCheck>), String> {
    let answer: Answer = rmp_serde::from_slice(answer).map_err(|e| e.to_string())?;
    let observed_ip = answer
        .observed_ip
        .parse()
        .map_err(|_| format!("not an IP: {:?}", answer.observed_ip))?;
    // The answer must be about exactly the ports asked, in order.
    if answer.ports.len() != ports.len()
        || answer.ports.iter().zip(ports).any(|(c, p)| c.port != *p)
    {
        return Err("answered about other ports than asked".into());
    }
    Ok((observed_ip, answer.ports))
}

/// Asks `peer` (over `stream`, already open) to dial back `ports`.
pub(crate) async fn ask(
    peer: PeerId,
    mut stream: Stream,
    ports: &[u16],
) -> Result<DialBack, DhtError> {
    let bad = |reason: String| DhtError::DialBack { peer, reason };
    if ports.is_empty() || ports.len() > MAX_PORTS || ports.contains(&0) {
        return Err(bad(format!("ask about 1 to {MAX_PORTS} non-zero ports")));
    }
    let request = rmp_serde::to_vec(ports).map_err(|e| bad(e.to_string()))?;
    write_frame(&mut stream, &request)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let answer = read_frame(&mut stream, MAX_ANSWER)
        .await
        .map_err(|e| bad(format!("no answer: {e}")))?;
    let (observed_ip, ports) = parse_answer(&answer, ports).map_err(bad)?;
    Ok(DialBack {
        peer,
        observed_ip,
        ports,
    })
}
