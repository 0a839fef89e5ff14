//! 64 state requests at once, from 8 peers, that never read their answers
//! (alone in this test binary, so the process's resident memory is this
//! test's). The donor serves a few at a time (per peer and in all) from the
//! one copy it declared, refuses the rest, and an honest joiner still
//! downloads its state bit for bit afterwards.

use std::time::Duration;

use colony_averaging::{
    AveragerConfig, DecentralizedAverager,
    state::{ServedState, SharedState},
};
use colony_dht::{Dht, DhtConfig, StreamProtocol, dht_time};
use futures::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(120);
/// Floats in the donor's state: 16 MiB.
const FLOATS: usize = 4 << 20;
const REQUESTS: usize = 64;
const READERS: usize = 8;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn config() -> AveragerConfig {
    let mut c = AveragerConfig::new("flood");
    c.min_matchmaking_time = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(1);
    // A stalled reader is dropped after this long without progress.
    c.allreduce.sender_timeout = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_slow_state_requests_share_one_copy() {
    tokio::time::timeout(T, async {
        let first = Dht::new(DhtConfig::default()).await.unwrap();
        let mut readers = Vec::new();
        for _ in 0..=READERS {
            readers.push(
                Dht::new(DhtConfig {
                    initial_peers: first.listen_addrs(),
                    ..DhtConfig::default()
                })
                .await
                .unwrap(),
            );
        }
        let second = readers.pop().unwrap();
        let state: Vec<Vec<f32>> = vec![(0..FLOATS).map(|i| (i % 1013) as f32 * 0.5).collect()];
        let donor = DecentralizedAverager::new(first.clone(), state.clone(), config())
            .await
            .unwrap();
        donor
            .declare_state(1.0, b"step 1".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();
        // The root the donor serves, as a joiner would read it from the DHT.
        let root = ServedState::new(SharedState {
            metadata: b"step 1".to_vec(),
            tensors: state.clone(),
        })
        .unwrap()
        .root();
        let state_bytes = (FLOATS * 4) as u64;
        let before = rss_bytes();

        let protocol = StreamProtocol::new("/colony/averaging/flood/state/1");
        let mut streams = Vec::new();
        for i in 0..REQUESTS {
            let reader = &readers[i % READERS];
            let mut s = reader
                .open_stream(first.peer_id(), protocol.clone())
                .await
                .unwrap();
            // A request for the first chunk (tag 2, the root, index 0).
            let mut request = vec![2u8];
            request.extend_from_slice(&root);
            request.extend_from_slice(&0u32.to_le_bytes());
            let _ = s.write_all(&request).await;
            let _ = s.flush().await;
            streams.push(s);
        }
        // Each request is either being served (its status byte arrives) or
        // was refused (the stream ends); none is read any further.
        let mut served = 0;
        for s in &mut streams {
            let mut status = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut status)).await;
            if matches!(read, Ok(Ok(()))) && status[0] == 0 {
                served += 1;
            }
        }
        let during = rss_bytes();
        let growth = match (before, during) {
            (Some(b), Some(d)) => Some(d.saturating_sub(b)),
            _ => None,
        };
        // The donor serves from the copy it made when it declared (before
        // `before`): what grows is transport buffers, less than one more copy.
        let bound = state_bytes;
        eprintln!(
            "state flood: {served} of {REQUESTS} requests served at once; resident memory grew \
             {:.1} MiB with {REQUESTS} stalled readers (bound {:.1} MiB: one more copy of the {:.1} MiB \
             state; a copy per request alone would be {:.1} MiB)",
            growth.map_or(f64::NAN, |g| g as f64 / 1048576.0),
            bound as f64 / 1048576.0,
            state_bytes as f64 / 1048576.0,
            (REQUESTS as u64 * state_bytes) as f64 / 1048576.0,
        );
        assert!(
            (1..=colony_averaging::MAX_STATE_REQUESTS).contains(&served),
            "{served}"
        );
        if let Some(growth) = growth {
            assert!(growth < bound, "grew {growth} bytes, bound {bound}");
        }
        drop(streams);

        // The stalled readers are gone (or time out): an honest joiner gets
        // the state, retrying while the donor still serves the stalled ones.
        let joiner = DecentralizedAverager::new(second.clone(), vec![vec![0.0; FLOATS]], config())
            .await
            .unwrap();
        let mut attempts = 0;
        let meta = loop {
            attempts += 1;
            match joiner.load_state_from_peers(Duration::from_secs(20)).await {
                Ok(meta) => break meta,
                Err(e) => {
                    assert!(attempts < 5, "no state after {attempts} attempts: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        assert_eq!(meta, b"step 1");
        let got = joiner.tensors().await.clone();
        assert!(
            got[0]
                .iter()
                .zip(&state[0])
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    })
    .await
    .expect("test timed out");
}
