//! Connection paths through the node proxy.

pub mod outbound;
pub mod relay;
pub mod routes;

pub use outbound::Outbound;
pub use routes::{Local, Route, RouteEndpoint, RouteTable, Workload};
