//! `cargo fuzz run config_load`: see trellis_fuzzing::config_load.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_fuzzing::config_load(data));
