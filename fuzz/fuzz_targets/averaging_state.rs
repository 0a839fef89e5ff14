//! The state download a joining peer runs against a donor
//! (`colony_averaging::state::download_state`: length-prefixed header,
//! then the tensors, checked for size, finiteness and checksum), with and
//! without the expected layout. (A chunked state descriptor does not exist
//! yet; this is the current decoder.)
//!
//! Caps: no allocation past the allocator's cap whatever lengths the header
//! declares (the download may only hold what it received); an accepted
//! state holds no more metadata and tensor bytes than its input. Round
//! trip: an accepted state served again downloads to the same state.
#![no_main]

use std::time::Duration;

use colony_averaging::{
    fuzzing::block_on,
    state::{download_state, serve_state},
};
use colony_fuzz::Input;
use libfuzzer_sys::fuzz_target;

const T: Duration = Duration::from_secs(1);

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::averaging_state),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let layout = input.u8();
        let expected: Option<Vec<usize>> = (layout % 2 == 1)
            .then(|| (0..layout / 2 % 4).map(|_| usize::from(input.u8())).collect());
        let mut stream = input.rest();
        let len = stream.len();
        let Ok(state) = block_on(download_state(&mut stream, 0, expected.as_deref(), T)) else {
            return;
        };
        let floats: usize = state.tensors.iter().map(Vec::len).sum();
        assert!(state.metadata.len() + 4 * floats <= len);
        if let Some(expected) = &expected {
            assert_eq!(&state.tensors.iter().map(Vec::len).collect::<Vec<_>>(), expected);
        }
        assert!(state.tensors.iter().flatten().all(|x| x.is_finite()));
        let mut served = Vec::new();
        block_on(serve_state(&mut served, &state, T)).expect("serving into a Vec");
        let again = block_on(download_state(&mut &served[..], 0, None, T)).expect("round trip");
        assert_eq!(again, state);
    }
);
