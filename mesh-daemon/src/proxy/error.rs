//! The one error type of the connect path, and the one rule of what counts
//! against an endpoint: only a failure of the endpoint itself (or of the
//! way to it) feeds its breaker and is retried on another endpoint. A
//! refusal by policy or a client without an identity says nothing about
//! the endpoint: it fails that one connection at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;

use crate::model::NodeName;
use crate::tunnel::client::TunnelError;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{addr}: connect timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("{addr} via the tunnel: {source}")]
    Tunnel { addr: SocketAddr, source: TunnelError },
    #[error("{addr} is on node {node} and the service requires mTLS, but the client is not an enrolled workload, so it has no identity")]
    NoIdentity { addr: SocketAddr, node: NodeName },
    #[error("{addr} is on node {node} and the service requires mTLS, but this daemon has no certificates (--ca-cert, --ca-key, --trust-bundle)")]
    NoCertificates { addr: SocketAddr, node: NodeName },
    #[error("the service has no endpoint that may take a connection")]
    NoEndpoint,
    #[error("{addr}: denied by authorization policy ({by})")]
    Denied { addr: SocketAddr, by: String },
}

fn io_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::TimedOut => "timeout",
        _ => "io",
    }
}

impl ConnectError {
    /// The access log's `outcome` and the metrics' `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Io { source, .. } => io_reason(source),
            ConnectError::Tunnel { source, .. } => match source {
                TunnelError::Certificate { .. } => "no_certificates",
                TunnelError::ConnectTimeout { .. } => "timeout",
                TunnelError::Connect { source, .. } => io_reason(source),
                TunnelError::Handshake { .. } => "tls_handshake",
                TunnelError::Http2 { .. } => "tunnel",
                TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN => "denied",
                TunnelError::Refused { status, .. } if *status == StatusCode::BAD_REQUEST => "bad_request",
                TunnelError::Refused { .. } => "upstream",
            },
            ConnectError::NoIdentity { .. } => "no_identity",
            ConnectError::NoCertificates { .. } => "no_certificates",
            ConnectError::NoEndpoint => "no_endpoint",
            ConnectError::Denied { .. } => "denied",
        }
    }

    /// Whether a policy refused it (here, or at the endpoint's node): the
    /// client's connection is reset, as a refused connect would be.
    pub fn is_denial(&self) -> bool {
        match self {
            ConnectError::Denied { .. } => true,
            ConnectError::Tunnel { source: TunnelError::Refused { status, .. }, .. } => {
                *status == StatusCode::FORBIDDEN
            }
            _ => false,
        }
    }

    /// Whether this failure feeds the endpoint's breaker and is retried on
    /// another endpoint. Only failures of the endpoint or of the way to it
    /// do: a refusal by policy, a client without identity, missing
    /// certificates or a malformed request would fail the same anywhere,
    /// and counting them would let one client eject endpoints for all.
    /// Decided on the error itself, never on its metric label.
    pub fn counts_against_endpoint(&self) -> bool {
        match self {
            ConnectError::Timeout { .. } | ConnectError::Io { .. } => true,
            ConnectError::Tunnel { source, .. } => match source {
                TunnelError::ConnectTimeout { .. }
                | TunnelError::Connect { .. }
                | TunnelError::Handshake { .. }
                | TunnelError::Http2 { .. } => true,
                TunnelError::Certificate { .. } => false,
                TunnelError::Refused { status, .. } => {
                    *status != StatusCode::FORBIDDEN && *status != StatusCode::BAD_REQUEST
                }
            },
            ConnectError::NoIdentity { .. }
            | ConnectError::NoCertificates { .. }
            | ConnectError::NoEndpoint
            | ConnectError::Denied { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "10.244.2.3:8080".parse().unwrap()
    }

    fn node() -> NodeName {
        NodeName::parse("node-b").unwrap()
    }

    fn refused(status: StatusCode) -> ConnectError {
        ConnectError::Tunnel {
            addr: addr(),
            source: TunnelError::Refused { node: node(), target: addr(), status, reason: None },
        }
    }

    #[test]
    fn endpoint_failures_count_and_are_retried() {
        let io = |kind| ConnectError::Io { addr: addr(), source: io::Error::from(kind) };
        for (e, reason) in [
            (io(io::ErrorKind::ConnectionRefused), "refused"),
            (io(io::ErrorKind::HostUnreachable), "unreachable"),
            (io(io::ErrorKind::ConnectionReset), "reset"),
            (ConnectError::Timeout { addr: addr(), after: Duration::from_secs(1) }, "timeout"),
            (
                ConnectError::Tunnel {
                    addr: addr(),
                    source: TunnelError::Handshake {
                        node: node(),
                        addr: addr(),
                        source: io::Error::other("bad certificate"),
                    },
                },
                "tls_handshake",
            ),
            (refused(StatusCode::BAD_GATEWAY), "upstream"),
            (refused(StatusCode::GATEWAY_TIMEOUT), "upstream"),
        ] {
            assert_eq!(e.reason(), reason, "{e}");
            assert!(e.counts_against_endpoint(), "{e} must count against the endpoint");
        }
    }

    #[test]
    fn refusals_and_missing_identities_never_count() {
        let cert = ConnectError::Tunnel {
            addr: addr(),
            source: TunnelError::Certificate {
                identity: crate::identity::Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
                message: "cannot sign".into(),
            },
        };
        for (e, reason) in [
            (refused(StatusCode::FORBIDDEN), "denied"),
            (ConnectError::NoIdentity { addr: addr(), node: node() }, "no_identity"),
            (ConnectError::NoCertificates { addr: addr(), node: node() }, "no_certificates"),
            (cert, "no_certificates"),
            (ConnectError::NoEndpoint, "no_endpoint"),
        ] {
            assert_eq!(e.reason(), reason, "{e}");
            assert!(!e.counts_against_endpoint(), "{e} must not count against the endpoint");
        }
    }

    #[test]
    fn a_refusal_names_the_remote_reason() {
        let e = ConnectError::Tunnel {
            addr: addr(),
            source: TunnelError::Refused {
                node: node(),
                target: addr(),
                status: StatusCode::FORBIDDEN,
                reason: Some("policy".into()),
            },
        };
        assert_eq!(
            e.to_string(),
            "10.244.2.3:8080 via the tunnel: tunnel to node-b: CONNECT 10.244.2.3:8080 refused with 403 Forbidden (policy)"
        );
    }
}
