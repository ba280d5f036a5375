//! `cargo fuzz run delta`: see trellis_fuzzing::delta.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_fuzzing::delta(data));
