//! mesh-daemon: the node-level mesh proxy. One folder per concern; see
//! ARCHITECTURE.md.

pub mod model;
