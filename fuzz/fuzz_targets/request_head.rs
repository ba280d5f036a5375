//! `cargo fuzz run request_head`: see trellis_fuzzing::request_head.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_fuzzing::request_head(data));
