//! Feeds arbitrary records, in arbitrary splits, to the read side of a TLS link (its
//! buffer and record decoder, src/mux/tls_io.rs): records sealed from arbitrary inner
//! plaintext (content types, padding, alerts, handshake messages, key updates, sizes
//! up to past the limit) and raw garbage between them. It must fail with an error,
//! never panic, never grow its buffer nor hand out more than a record's plaintext.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run tls_records -- -max_total_time=300` (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chanserv::fuzzing::tls_records(data);
});
