//! The node-to-node tunnel: HTTP/2 CONNECT over mutually authenticated
//! TLS 1.3 (port 15008). `:authority` is the endpoint's ip:port.
//!
//! Inbound, every stream is checked: the peer chain verified against the
//! trust bundle (in the handshake), the target an enrolled workload of
//! this node, an endpoint (ip and target port) of the service the stream
//! names in its `mesh-service` header, and that service's authorization
//! policy allowing the peer's SPIFFE ID. Any check failing is a 403 with
//! the reason in `mesh-deny`, and no connection is made: the port is never
//! an open proxy, not even to other ports of a pod the peer may reach. Outbound, one pooled HTTP/2 connection per
//! (source identity, destination node) carries many streams, with
//! keepalive pings, and is closed when idle.
#![forbid(unsafe_code)]

pub mod client;
pub mod server;

use hyper::header::HeaderName;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::telemetry::metrics::{CounterLabels, ReasonLabels};
use crate::telemetry::Metrics;

/// Request header of a CONNECT: the service (`namespace/name`) the stream
/// is for. The receiving node relays only to an endpoint of that service.
pub const SERVICE_HEADER: HeaderName = HeaderName::from_static("mesh-service");
/// Request header of a CONNECT whose stream carries requests the sending
/// proxy terminated (`http/1.1` or `h2`): the receiving node proxies and
/// counts each request. Without it a stream is opaque bytes.
pub const PROTOCOL_HEADER: HeaderName = HeaderName::from_static("mesh-protocol");
/// The address of the client whose connection a stream carries, which
/// the receiving node believes only of a workload of the peer's identity
/// (its policies may name client addresses). On a stream of requests the
/// sending proxy writes it on each request instead.
pub const SOURCE_HEADER: HeaderName = HeaderName::from_static("mesh-source");
/// Response header of a refused CONNECT: why (see [`server::Deny`]).
pub const DENY_HEADER: HeaderName = HeaderName::from_static("mesh-deny");

/// What a stream carries, when it carries requests (see [`PROTOCOL_HEADER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamProtocol {
    Http1,
    Http2,
}

impl StreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamProtocol::Http1 => "http/1.1",
            StreamProtocol::Http2 => "h2",
        }
    }

    /// None for anything else: the stream is then relayed as bytes.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http/1.1" => Some(StreamProtocol::Http1),
            "h2" => Some(StreamProtocol::Http2),
            _ => None,
        }
    }
}

/// Largest HTTP/2 frame either side accepts: bulk data crosses in
/// 64 KiB DATA frames (four TLS records) instead of 16 KiB ones.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// Why a tunnel handshake failed.
pub const TLS_FAILURE_REASONS: [&str; 6] =
    ["plaintext", "untrusted_issuer", "expired", "no_client_cert", "bad_certificate", "other"];

/// The reason label of a failed handshake.
pub fn tls_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error, PeerMisbehaved};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidMessage(_))
        | Some(Error::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec)) => "plaintext",
        // Not signed by a CA of the bundle: unknown issuer, or one with the
        // same name whose signature does not verify.
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            "untrusted_issuer"
        }
        Some(Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "expired"
        }
        Some(Error::NoCertificatesPresented) => "no_client_cert",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        _ => "other",
    }
}

/// Handles of `mesh_tunnel_events_total` and
/// `mesh_tunnel_tls_failures_total`.
#[derive(Debug, Clone)]
pub struct TunnelCounters {
    /// Failed handshakes by [`TLS_FAILURE_REASONS`] index.
    pub tls_failures_by_reason: [Counter; 6],
    pub handshakes: Counter,
    pub tls_failures: Counter,
    pub streams: Counter,
    pub denied_not_local: Counter,
    /// The target is no endpoint of the service the stream names.
    pub denied_not_endpoint: Counter,
    pub denied_policy: Counter,
    /// A workload identity from another node than the state places it on.
    pub denied_wrong_node: Counter,
    pub bad_requests: Counter,
    pub upstream_failures: Counter,
    /// Connections closed and streams refused because their peer identity
    /// was at its limit.
    pub over_peer_limit: Counter,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TunnelSnapshot {
    pub handshakes: u64,
    pub tls_failures: u64,
    pub streams: u64,
    pub denied_not_local: u64,
    pub denied_not_endpoint: u64,
    pub denied_policy: u64,
    pub denied_wrong_node: u64,
    pub bad_requests: u64,
    pub upstream_failures: u64,
    #[serde(default)]
    pub over_peer_limit: u64,
    /// Failed handshakes by reason.
    pub tls_failures_by_reason: std::collections::BTreeMap<String, u64>,
}

impl TunnelCounters {
    /// Registers `mesh_tunnel_events_total` and
    /// `mesh_tunnel_tls_failures_total` into `m` (once per daemon).
    pub fn new(m: &Metrics) -> Self {
        let events: Family<CounterLabels, Counter> = Family::default();
        let tls: Family<ReasonLabels, Counter> = Family::default();
        m.register("tunnel_events", "mTLS tunnel handshakes, streams, TLS failures and denials", events.clone());
        m.register("tunnel_tls_failures", "Failed tunnel handshakes by reason", tls.clone());
        let c = |counter| events.get_or_create(&CounterLabels { counter }).clone();
        Self {
            tls_failures_by_reason: TLS_FAILURE_REASONS
                .map(|reason| tls.get_or_create(&ReasonLabels { reason }).clone()),
            handshakes: c("handshakes"),
            tls_failures: c("tls_failures"),
            streams: c("streams"),
            denied_not_local: c("denied_not_local"),
            denied_not_endpoint: c("denied_not_endpoint"),
            denied_policy: c("denied_policy"),
            denied_wrong_node: c("denied_wrong_node"),
            bad_requests: c("bad_requests"),
            upstream_failures: c("upstream_failures"),
            over_peer_limit: c("over_peer_limit"),
        }
    }

    /// Counts a failed handshake under its reason; returns the reason.
    pub fn tls_failed(&self, e: &std::io::Error) -> &'static str {
        let reason = tls_failure_reason(e);
        self.tls_failures.inc();
        if let Some(i) = TLS_FAILURE_REASONS.iter().position(|r| *r == reason) {
            self.tls_failures_by_reason[i].inc();
        }
        reason
    }

    /// `/stats`' `tunnel` object.
    pub fn snapshot(&self) -> TunnelSnapshot {
        TunnelSnapshot {
            handshakes: self.handshakes.get(),
            tls_failures: self.tls_failures.get(),
            streams: self.streams.get(),
            denied_not_local: self.denied_not_local.get(),
            denied_not_endpoint: self.denied_not_endpoint.get(),
            denied_policy: self.denied_policy.get(),
            denied_wrong_node: self.denied_wrong_node.get(),
            bad_requests: self.bad_requests.get(),
            upstream_failures: self.upstream_failures.get(),
            over_peer_limit: self.over_peer_limit.get(),
            tls_failures_by_reason: TLS_FAILURE_REASONS
                .iter()
                .zip(&self.tls_failures_by_reason)
                .map(|(r, c)| (r.to_string(), c.get()))
                .collect(),
        }
    }
}
