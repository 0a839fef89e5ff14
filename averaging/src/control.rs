//! Control messages of the join protocol, MessagePack with a length prefix, over
//! noise-authenticated libp2p streams.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use crate::{
    error::PeerFault,
    group::{AssembledGroup, GroupMember},
    matchmaking::{JoinCode, JoinRequest},
};

/// Largest control message accepted (bytes).
pub(crate) const MAX_CONTROL_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ControlMsg {
    Join {
        request: JoinRequest,
        member: GroupMember,
    },
    Reply {
        code: JoinCode,
        suggested_leader: Option<Vec<u8>>,
        /// The leader's declared expiration (with `Accepted`): the follower
        /// waits for `Begin` until then at least.
        #[serde(default)]
        leader_expiration: Option<f64>,
    },
    Begin {
        group: AssembledGroup,
    },
    Disbanded {
        suggested_leader: Option<Vec<u8>>,
    },
}

pub(crate) async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMsg,
    timeout: Duration,
) -> Result<(), PeerFault> {
    let body = rmp_serde::to_vec(msg).map_err(|_| PeerFault::ProtocolViolation {
        reason: "unencodable control message",
    })?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let fut = async {
        w.write_all(&frame).await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PeerFault::Disconnected {
            reason: e.to_string(),
        }),
        Err(_) => Err(PeerFault::Stalled { timeout }),
    }
}

pub(crate) async fn recv<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<ControlMsg, PeerFault> {
    let fut = async {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_CONTROL_BYTES {
            return Ok(Err(PeerFault::ProtocolViolation {
                reason: "control message too large",
            }));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(Ok(body))
    };
    let body = match tokio::time::timeout(timeout, fut).await {
        Err(_) => return Err(PeerFault::Stalled { timeout }),
        Ok(Err(e)) => {
            return Err(PeerFault::Disconnected {
                reason: e.to_string(),
            });
        }
        Ok(Ok(b)) => b?,
    };
    rmp_serde::from_slice(&body).map_err(|_| PeerFault::Garbage {
        reason: "undecodable control message",
    })
}
