#![no_main]
//! See `mesh_daemon::fuzzing::state_document`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_daemon::fuzzing::state_document(data));
