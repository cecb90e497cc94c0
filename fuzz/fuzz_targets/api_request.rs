#![no_main]
//! See `mesh_daemon::fuzzing::api_request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_daemon::fuzzing::api_request(data));
