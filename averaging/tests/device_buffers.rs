//! `step_buffers`: averaging `colony-kernels` buffers (any device) through the
//! averager's host tensors, over real `colony-dht` swarms in one process.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use colony_averaging::{AveragerConfig, AveragingError, DecentralizedAverager};
use colony_dht::{Dht, DhtConfig};
use colony_kernels::{Buffer, Device};

async fn pair() -> (Dht, Dht) {
    let cfg = || DhtConfig {
        query_timeout: Duration::from_secs(3),
        ..DhtConfig::default()
    };
    let a = Dht::new(cfg()).await.unwrap();
    let b = Dht::new(DhtConfig {
        initial_peers: a.listen_addrs(),
        ..cfg()
    })
    .await
    .unwrap();
    (a, b)
}

fn config() -> AveragerConfig {
    let mut c = AveragerConfig::new("devbuf");
    c.target_group_size = Some(2);
    c.min_matchmaking_time = Duration::from_secs(8);
    c.request_timeout = Duration::from_secs(3);
    c.allreduce.part_size_bytes = 4096;
    c.allreduce.allreduce_timeout = Duration::from_secs(20);
    c
}

const LENS: [usize; 2] = [2500, 7];

fn host(i: usize) -> Vec<Vec<f32>> {
    LENS.iter()
        .enumerate()
        .map(|(t, &n)| {
            (0..n)
                .map(|j| (i * 13 + t * 5 + j % 17) as f32 * 0.25)
                .collect()
        })
        .collect()
}

/// The peer's buffers on `device`, or `None` (with the reason printed) when
/// that device is not available in this build or on this machine.
fn buffers(i: usize, device: Device) -> Option<Vec<Buffer<f32>>> {
    let made: Result<Vec<_>, _> = host(i)
        .iter()
        .map(|v| Buffer::from_slice(v, device))
        .collect();
    match made {
        Ok(b) => Some(b),
        Err(e) => {
            println!("skipping {device:?}: {e}");
            None
        }
    }
}

async fn average_on(device: Device) {
    let (Some(mut b0), Some(mut b1)) = (buffers(0, device), buffers(1, device)) else {
        return;
    };
    let (n0, n1) = pair().await;
    // The averagers start from zeros: step_buffers must take the buffers' values.
    let zeros = || LENS.iter().map(|&n| vec![0.0; n]).collect::<Vec<_>>();
    let a0 = DecentralizedAverager::new(n0, zeros(), config())
        .await
        .unwrap();
    let a1 = DecentralizedAverager::new(n1, zeros(), config())
        .await
        .unwrap();
    let t = Duration::from_secs(30);
    let (r0, r1) = tokio::join!(
        a0.step_buffers(&mut b0, Some(1.0), t),
        a1.step_buffers(&mut b1, Some(3.0), t)
    );
    assert_eq!(r0.unwrap().group.members.len(), 2);
    assert_eq!(r1.unwrap().group.members.len(), 2);
    let (h0, h1) = (host(0), host(1));
    for (b, _) in [(&b0, 0), (&b1, 1)] {
        for (t, buf) in b.iter().enumerate() {
            assert_eq!(buf.device(), device);
            let got = buf.to_vec().unwrap();
            for (j, v) in got.iter().enumerate() {
                let want = (h0[t][j] + 3.0 * h1[t][j]) / 4.0;
                assert!(
                    (v - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{v} vs {want}"
                );
            }
        }
    }
    // The averager's host tensors hold the same values.
    let mut back: Vec<Buffer<f32>> = LENS
        .iter()
        .map(|&n| Buffer::zeros(n, device).unwrap())
        .collect();
    a0.stage_out(&mut back).await.unwrap();
    for (x, y) in back.iter().zip(&b0) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_buffers_average_through_the_averager() {
    tokio::time::timeout(Duration::from_secs(90), average_on(Device::Cpu))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_buffers_average_through_the_averager() {
    tokio::time::timeout(Duration::from_secs(90), average_on(Device::Cuda(0)))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_buffers_are_refused_and_left_alone() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (n0, _n1) = pair().await;
        let a = DecentralizedAverager::new(n0, host(0), config())
            .await
            .unwrap();
        let mut wrong = vec![Buffer::from_slice(&[9.0f32; 5], Device::Cpu).unwrap()];
        let err = a
            .step_buffers(&mut wrong, Some(1.0), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AveragingError::LayoutMismatch { .. }),
            "{err}"
        );
        assert_eq!(wrong[0].to_vec().unwrap(), vec![9.0; 5]);
        // Same count, wrong length of one tensor.
        let mut wrong: Vec<_> = [2500usize, 8]
            .iter()
            .map(|&n| Buffer::from_slice(&vec![1.0f32; n], Device::Cpu).unwrap())
            .collect();
        assert!(matches!(
            a.stage_out(&mut wrong).await,
            Err(AveragingError::LayoutMismatch { .. })
        ));
        // The averager's tensors were not touched by the refused calls.
        assert_eq!(*a.tensors().await, host(0));
    })
    .await
    .expect("test timed out");
}
