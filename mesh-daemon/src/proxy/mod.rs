//! Connection paths through the node proxy.

pub mod error;
pub mod outbound;
pub mod relay;
pub mod routes;

pub use error::ConnectError;
pub use outbound::Outbound;
pub use routes::{Local, Route, RouteEndpoint, RouteTable, Workload};
