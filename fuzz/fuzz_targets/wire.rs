//! Feeds arbitrary bytes to the chanserv message decoders (request, master message)
//! and the NAMES control message parser: they must return an error, never panic or
//! allocate beyond the input.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run wire -- -max_total_time=300` (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let n = chanserv::fuzzing::decode_all(data);
    assert!((1..=3).contains(&n));
});
