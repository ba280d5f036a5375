//! `cargo fuzz run csr`: see trellis_fuzzing::csr.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_fuzzing::csr(data));
