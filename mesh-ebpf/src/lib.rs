#![no_std]
// Exists so that mesh-daemon can depend on this crate from its build script
// (cargo then rebuilds the daemon when the kernel programs change).
