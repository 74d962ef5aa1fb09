//! Feeds arbitrary bytes to every message decoder of `src/proto/` (request, master
//! message, child-stream prefix, handshake, open header, status byte, control message,
//! the items of a chanserv stream): they must return an error, never panic or allocate
//! beyond the input, and whatever decodes must encode back to itself.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run wire -- -max_total_time=300` (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let n = chanserv::fuzzing::decode_all(data);
    assert!(n <= chanserv::fuzzing::DECODERS);
});
