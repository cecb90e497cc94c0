//! The access log: one line per finished connection, tunnel stream or
//! request, written here only, with the same fields in both directions
//! (tracing target `access`; message `closed`, or `request` for a request).

use std::fmt::Display;
use std::net::SocketAddrV4;
use std::time::Duration;

use tracing::info;

use crate::identity::Identity;

/// What a request line adds to its record.
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query string, which may hold secrets.
    pub path: &'a str,
    pub status: u16,
    pub grpc_status: Option<u32>,
}

/// One finished connection or request. `bytes_up` went from the client
/// towards the endpoint (not counted for requests), `bytes_down` back (a
/// request's response body).
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
    pub bytes_up: Option<u64>,
    pub bytes_down: u64,
    pub duration: Duration,
    /// `ok`, `error`, `cancelled` (a request whose client left), or why
    /// it never reached an endpoint.
    pub outcome: &'static str,
    pub error: Option<&'a (dyn Display + Sync)>,
    pub request: Option<RequestLine<'a>>,
}

impl Record<'_> {
    pub fn log(&self) {
        let duration_ms = self.duration.as_millis() as u64;
        let r = self.request.as_ref();
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
            method = r.map(|r| r.method),
            authority = r.map(|r| r.authority),
            path = r.map(|r| r.path),
            status = r.map(|r| r.status),
            grpc_status = r.and_then(|r| r.grpc_status),
            "{}",
            if r.is_some() { "request" } else { "closed" }
        );
    }
}
