#![no_main]
//! See `mesh_daemon::fuzzing::handover_message`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_daemon::fuzzing::handover_message(data));
