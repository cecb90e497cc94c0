#![no_main]
//! See `mesh_daemon::fuzzing::kernel_structs`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_daemon::fuzzing::kernel_structs(data));
