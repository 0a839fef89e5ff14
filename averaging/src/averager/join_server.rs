//! The join server: reads the first message of each inbound join stream and
//! hands the request to the matchmaker task, which decides and answers.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::reachability::Reachability;
use crate::{
    control::{self, ControlMsg},
    matchmaking::shell::{Command, InboundJoin},
};

/// Join requests being read at once; more wait in the DHT's stream queue.
const MAX_READING: usize = 64;

/// Serve inbound join streams until the averager (every strong handle to
/// its matchmaker) or the DHT is gone.
pub(super) async fn accept_joins(
    matchmaker: mpsc::WeakSender<Command>,
    mut rx: colony_dht::InboundStreamQueue,
    request_timeout: Duration,
    reach: Option<Arc<Reachability>>,
) {
    let reading = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_READING));
    while let Some((peer, mut stream)) = rx.recv().await {
        let Some(tx) = matchmaker.upgrade() else {
            return;
        };
        let Ok(permit) = reading.clone().acquire_owned().await else {
            return;
        };
        let reach = reach.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match control::recv(&mut stream, request_timeout).await {
                Ok(ControlMsg::Join { request, member }) => {
                    // Probe its data address while the window runs; the
                    // group is checked against the verdicts at begin.
                    if let (Some(reach), Some(addr)) = (&reach, member.data_addr)
                        && member.peer_id == peer.to_bytes()
                    {
                        drop(reach.start(&member.peer_id, addr));
                    }
                    let join = Command::Join(Box::new(InboundJoin {
                        peer,
                        stream,
                        request,
                        member,
                    }));
                    if tx.send(join).await.is_err() {
                        tracing::debug!(%peer, "join arrived after the averager stopped");
                    }
                }
                Ok(_) => tracing::debug!(%peer, "join stream: expected a join"),
                Err(fault) => tracing::debug!(%peer, %fault, "join request failed"),
            }
        });
    }
}
