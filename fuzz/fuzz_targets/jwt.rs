//! `cargo fuzz run jwt`: see trellis_fuzzing::jwt.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_fuzzing::jwt(data));
