//! Connection paths through the node proxy.
#![forbid(unsafe_code)]

pub mod access;
pub mod authz;
pub mod counters;
pub mod dial;
pub mod error;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod routes;
pub mod tries;

pub use counters::ProxyCounters;
pub use inbound::{InboundHandler, InboundView};
pub use outbound::Outbound;
pub use routes::{Local, Route, RouteEndpoint, RouteTable, RoutesView, RuleMeter, Workload};
