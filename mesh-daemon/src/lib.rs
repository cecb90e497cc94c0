//! mesh-daemon: the node-level mesh proxy. One folder per concern, in
//! layers (docs/src/concepts/architecture.md) that `cargo xtask layers` checks.

pub(crate) mod balance;
pub(crate) mod control;
pub(crate) mod datapath;
pub(crate) mod discovery;
pub(crate) mod drain;
pub(crate) mod env;
/// Entry points of the fuzz targets (fuzz/): not in the daemon's build.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub(crate) mod health;
pub(crate) mod heap;
pub mod identity;
pub mod model;
pub(crate) mod proxy;
pub(crate) mod relay;
pub mod run;
/// The route status writer, one per cluster (`ca serve --kubernetes`).
#[cfg(feature = "kubernetes")]
pub use discovery::status::run as write_route_status;
/// The serving side's authorization (policies, the caller as they see
/// it), for `meshctl authz check`: the same code the proxy runs.
pub use proxy::authz as authorization;
/// The per-request routing decision (Gateway API routes), for `meshctl
/// route check`: the same code the proxy runs.
pub use proxy::http::router as routing;
pub(crate) mod shared_map;
pub mod telemetry;
pub(crate) mod tunnel;
