//! The access log: one line per finished connection or tunnel stream,
//! written here only, with the same fields in both directions (tracing
//! target `access`).

use std::fmt::Display;
use std::net::SocketAddrV4;
use std::time::Duration;

use tracing::info;

use crate::identity::Identity;

/// One finished connection. `bytes_up` went from the client towards the
/// endpoint, `bytes_down` back.
pub struct Record<'a> {
    /// `outbound` (redirected from a pod here) or `inbound` (a tunnel
    /// stream to a pod here).
    pub direction: &'static str,
    /// The client workload (`namespace/name`), when it is one of this node.
    pub source: Option<&'a str>,
    /// The client's SPIFFE identity.
    pub identity: Option<&'a Identity>,
    pub client: Option<SocketAddrV4>,
    /// `namespace/name:port`, or `namespace/name` where the port is unknown.
    pub service: &'a str,
    pub endpoint: Option<SocketAddrV4>,
    /// `local`, or the node the endpoint is on.
    pub node: Option<&'a str>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    /// `ok`, `error`, or why the connection never reached an endpoint.
    pub outcome: &'static str,
    pub error: Option<&'a (dyn Display + Sync)>,
}

impl Record<'_> {
    pub fn log(&self) {
        let duration_ms = self.duration.as_millis() as u64;
        info!(
            target: "access",
            direction = self.direction,
            source = self.source,
            identity = self.identity.map(tracing::field::display),
            client = self.client.map(tracing::field::display),
            service = self.service,
            endpoint = self.endpoint.map(tracing::field::display),
            node = self.node,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms,
            outcome = self.outcome,
            error = self.error.map(tracing::field::display),
            "closed"
        );
    }
}

/// One finished request of the request-aware path.
pub struct RequestRecord<'a> {
    pub direction: &'static str,
    pub source: Option<&'a str>,
    pub identity: Option<&'a Identity>,
    pub client: Option<SocketAddrV4>,
    pub service: &'a str,
    pub endpoint: Option<SocketAddrV4>,
    pub node: Option<&'a str>,
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Response body bytes.
    pub bytes: u64,
    pub duration: Duration,
    /// `ok`, `error`, `cancelled`, or why no endpoint took it.
    pub outcome: &'static str,
}

impl RequestRecord<'_> {
    pub fn log(&self) {
        let duration_ms = self.duration.as_millis() as u64;
        info!(
            target: "access",
            direction = self.direction,
            source = self.source,
            identity = self.identity.map(tracing::field::display),
            client = self.client.map(tracing::field::display),
            service = self.service,
            endpoint = self.endpoint.map(tracing::field::display),
            node = self.node,
            method = self.method,
            authority = self.authority,
            path = self.path,
            status = self.status,
            grpc_status = self.grpc_status,
            bytes = self.bytes,
            duration_ms,
            outcome = self.outcome,
            "request"
        );
    }
}
