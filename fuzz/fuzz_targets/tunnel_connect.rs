#![no_main]
//! See `mesh_daemon::fuzzing::tunnel_connect`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_daemon::fuzzing::tunnel_connect(data));
