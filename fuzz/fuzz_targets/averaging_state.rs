//! The state download among strangers (`colony_averaging::state`): the
//! descriptor a donor sends (`StateDescriptor::decode`, the root check,
//! the layout check) and the chunk answers after it, as
//! `download_vouched` reads them from one donor; and the donor side,
//! `serve_requests`, answering arbitrary request bytes.
//!
//! Input: a mode byte. Joiner side (even): a tensor count (byte % 4), one
//! length byte per tensor, a descriptor length (u16 LE), the descriptor,
//! then the donor's answers to chunk requests; the root asked for is the
//! descriptor's own, so the chunk paths are reachable. Donor side (odd):
//! request bytes, answered from a fixed served state.
//!
//! Caps: tensors are allocated from the joiner's layout only, never from
//! a donor's claims (the allocator's cap catches a violation); an accepted
//! state has that layout, is finite and carries the descriptor's metadata;
//! an accepted descriptor re-encodes to one that decodes equal. The donor
//! side writes no more than one answer per 37-byte request, each at most a
//! chunk or the descriptor.
#![no_main]

use std::{sync::Arc, time::Duration};

use colony_averaging::{
    fuzzing::block_on,
    state::{
        DownloadLimits, ServedState, SharedState, StateDescriptor, download_vouched,
        serve_requests,
    },
};
use colony_fuzz::Input;
use libfuzzer_sys::fuzz_target;

const T: Duration = Duration::from_secs(1);

fn served() -> Arc<ServedState> {
    static S: std::sync::OnceLock<Arc<ServedState>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Arc::new(
            ServedState::new(SharedState {
                metadata: vec![0x2a],
                tensors: vec![vec![1.0, -2.0, 0.5], vec![3.0]],
            })
            .expect("a small state"),
        )
    })
    .clone()
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::averaging_state),
    |data: &[u8]| {
        let mut input = Input::new(data);
        if input.u8() % 2 == 1 {
            let requests = input.rest();
            let mut stream = tokio::io::join(requests, Vec::<u8>::new());
            let served = served();
            let _ = block_on(serve_requests(
                &mut stream,
                |root| (*root == served.root()).then(|| served.clone()),
                T,
                T,
            ));
            let (_, written) = stream.into_inner();
            let most = served.descriptor().chunk_bytes as usize + 1024;
            assert!(written.len() <= (requests.len() / 37 + 1) * most);
            return;
        }
        let tensors = input.u8() % 4;
        let lengths: Vec<usize> = (0..tensors).map(|_| usize::from(input.u8())).collect();
        let len = usize::from(input.u16());
        let descriptor = input.bytes(len);
        if let Ok(d) = StateDescriptor::decode(descriptor) {
            let again = d.encode().expect("encodes");
            assert_eq!(StateDescriptor::decode(&again).expect("decodes"), d);
            assert_eq!(d.chunk_count() as u64, d.total_bytes().div_ceil(u64::from(d.chunk_bytes)));
        }
        let root = StateDescriptor::root_of(descriptor);
        let mut answers = vec![0u8];
        answers.extend_from_slice(&(descriptor.len() as u32).to_le_bytes());
        answers.extend_from_slice(descriptor);
        answers.extend_from_slice(input.rest());
        let limits = DownloadLimits { request_timeout: T, min_rate: 1e6 };
        let got = block_on(download_vouched(
            1,
            |_| {
                let answers = answers.clone();
                async move { Ok(tokio::io::join(std::io::Cursor::new(answers), tokio::io::sink())) }
            },
            root,
            &lengths,
            limits,
        ));
        if let Ok((state, report)) = got {
            assert_eq!(state.tensors.iter().map(Vec::len).collect::<Vec<_>>(), lengths);
            assert!(state.tensors.iter().flatten().all(|x| x.is_finite()));
            let d = StateDescriptor::decode(descriptor).expect("an accepted descriptor decodes");
            assert_eq!(state.metadata, d.metadata);
            assert_eq!(report.chunks, vec![d.chunk_count()]);
        }
    }
);
