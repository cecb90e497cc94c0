//! mesh-daemon: the node-level mesh proxy. One folder per concern; see
//! ARCHITECTURE.md.

pub mod balance;
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod drain;
pub mod health;
pub mod identity;
pub mod model;
pub mod proxy;
pub mod run;
pub mod telemetry;
pub mod tunnel;
