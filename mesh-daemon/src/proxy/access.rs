//! The access log: one line per finished connection, tunnel stream or
//! request, written here only, with the same fields in both directions
//! (tracing target `access`; message `closed`, or `request` for a request).

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use crate::env::Env;
use crate::identity::Identity;
use crate::model::AccessLog;

/// What a request line adds to its record.
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query string, which may hold secrets.
    pub path: &'a str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Tries after the first (outbound).
    pub retries: u32,
    /// The trace the request belongs to, when it came with one (hex).
    pub trace_id: Option<&'a str>,
    /// The Gateway API route (`namespace/name`) and rule (its name, or
    /// its index) that decided the request, if one did.
    pub route: Option<(&'a str, &'a str)>,
    /// The authorization policy and rule that decided it (`ns/name#rule`,
    /// or `no-allow-match`), if policies apply.
    pub authz: Option<&'a str>,
    /// The AUDIT policies and rules that matched it (comma-separated).
    pub audit: Option<&'a str>,
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
    pub client: Option<SocketAddr>,
    /// `namespace/name:port`, or `namespace/name` where the port is unknown.
    pub service: &'a str,
    pub endpoint: Option<SocketAddr>,
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
    /// Writes the line, if the service's `access` setting keeps it (a
    /// share of successful records is drawn from `env`).
    pub fn log(&self, access: AccessLog, env: &dyn Env) {
        if !access.writes(self.succeeded(), || env.unit()) {
            return;
        }
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let message = if self.request.is_some() { "request" } else { "closed" };
        if !crate::telemetry::line::write("access", message, |f| self.fields(f)) {
            self.log_through_tracing();
        }
    }

    /// Ended as it should: outcome `ok` and, for a request, neither a
    /// 4xx or 5xx status nor a gRPC status other than OK. Sampling keeps
    /// every other record.
    fn succeeded(&self) -> bool {
        self.outcome == "ok"
            && self.request.as_ref().is_none_or(|r| r.status < 400 && r.grpc_status.is_none_or(|g| g == 0))
    }

    /// The same fields as [`Self::log_through_tracing`], in its order.
    fn fields(&self, f: &mut crate::telemetry::line::Fields<'_>) {
        f.str("direction", self.direction);
        if let Some(v) = self.source {
            f.str("source", v);
        }
        if let Some(v) = self.identity {
            f.str("identity", v.as_str());
        }
        if let Some(v) = self.client {
            f.addr("client", v);
        }
        f.str("service", self.service);
        if let Some(v) = self.endpoint {
            f.addr("endpoint", v);
        }
        if let Some(v) = self.node {
            f.str("node", v);
        }
        if let Some(v) = self.bytes_up {
            f.u64("bytes_up", v);
        }
        f.u64("bytes_down", self.bytes_down);
        f.u64("duration_ms", self.duration.as_millis() as u64);
        f.str("outcome", self.outcome);
        if let Some(v) = self.error {
            f.display("error", v);
        }
        if let Some(r) = &self.request {
            f.str("method", r.method);
            f.str("authority", r.authority);
            f.str("path", r.path);
            f.u64("status", u64::from(r.status));
            if let Some(g) = r.grpc_status {
                f.u64("grpc_status", u64::from(g));
            }
            if r.retries > 0 {
                f.u64("retries", u64::from(r.retries));
            }
            if let Some(t) = r.trace_id {
                f.str("trace_id", t);
            }
            if let Some((route, rule)) = r.route {
                f.str("route", route);
                f.str("rule", rule);
            }
            if let Some(a) = r.authz {
                f.str("authz", a);
            }
            if let Some(a) = r.audit {
                f.str("audit", a);
            }
        }
    }

    fn log_through_tracing(&self) {
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
            retries = r.map(|r| r.retries).filter(|n| *n > 0),
            trace_id = r.and_then(|r| r.trace_id),
            route = r.and_then(|r| r.route).map(|r| r.0),
            rule = r.and_then(|r| r.route).map(|r| r.1),
            authz = r.and_then(|r| r.authz),
            audit = r.and_then(|r| r.audit),
            "{}",
            if r.is_some() { "request" } else { "closed" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: bool, r: &Record<'_>) -> String {
        let (mut out, mut scratch) = (String::new(), String::new());
        let now = Duration::from_secs(1_795_910_400);
        crate::telemetry::line::format(&mut out, &mut scratch, json, now, "access", "request", |f| r.fields(f));
        out
    }

    #[test]
    fn sampling_keeps_every_failure() {
        let line = |status: u16, grpc_status: Option<u32>| RequestLine {
            method: "GET",
            authority: "web",
            path: "/",
            status,
            grpc_status,
            retries: 0,
            trace_id: None,
            route: None,
            authz: None,
            audit: None,
        };
        let record = |outcome: &'static str, request: Option<RequestLine<'static>>| Record {
            direction: "outbound",
            source: None,
            identity: None,
            client: None,
            service: "default/web:80",
            endpoint: None,
            node: None,
            bytes_up: None,
            bytes_down: 0,
            duration: Duration::ZERO,
            outcome,
            error: None,
            request,
        };
        assert!(record("ok", None).succeeded());
        assert!(record("ok", Some(line(200, None))).succeeded());
        assert!(record("ok", Some(line(302, Some(0)))).succeeded());
        assert!(!record("refused", None).succeeded());
        assert!(!record("ok", Some(line(404, None))).succeeded());
        assert!(!record("ok", Some(line(503, None))).succeeded());
        assert!(!record("ok", Some(line(200, Some(14)))).succeeded());
        assert!(!record("cancelled", Some(line(200, None))).succeeded());
    }

    #[test]
    fn a_request_line_has_the_json_shape_of_the_tracing_subscriber() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
        let error = "connection reset by \"peer\"";
        let r = Record {
            direction: "inbound",
            source: None,
            identity: Some(&id),
            client: None,
            service: "default/web:80",
            endpoint: Some("10.244.2.3:8080".parse().unwrap()),
            node: Some("local"),
            bytes_up: None,
            bytes_down: 12,
            duration: Duration::from_millis(7),
            outcome: "error",
            error: Some(&error),
            request: Some(RequestLine {
                method: "GET",
                authority: "web",
                path: "/a",
                status: 404,
                grpc_status: None,
                retries: 2,
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                route: Some(("default/canary", "v2")),
                authz: Some("default/api#1"),
                audit: Some("default/audit#0,mesh-system/all#2"),
            }),
        };
        let text = line(true, &r);
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["timestamp"], "2026-11-29T00:00:00.000000Z");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["direction"], "inbound");
        assert_eq!(f["identity"], "spiffe://cluster.local/ns/default/sa/client");
        assert_eq!(f["endpoint"], "10.244.2.3:8080");
        assert_eq!(
            (f["status"].as_u64(), f["bytes_down"].as_u64(), f["duration_ms"].as_u64()),
            (Some(404), Some(12), Some(7))
        );
        assert_eq!(f["error"], error);
        assert_eq!(f["retries"].as_u64(), Some(2));
        assert_eq!(f["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((f["route"].as_str(), f["rule"].as_str()), (Some("default/canary"), Some("v2")));
        assert_eq!(f["authz"], "default/api#1");
        assert_eq!(f["audit"], "default/audit#0,mesh-system/all#2");
        assert!(f.get("source").is_none() && f.get("bytes_up").is_none() && f.get("grpc_status").is_none(), "{v}");
        let text = line(false, &r);
        assert!(
            text.starts_with("2026-11-29T00:00:00.000000Z  INFO access: request direction=inbound identity=spiffe://"),
            "{text}"
        );
        assert!(text.contains(" status=404") && text.contains(" error=\"connection reset by \\\"peer\\\"\""), "{text}");
        assert!(text.contains(" audit=default/audit#0,mesh-system/all#2"), "{text}");
    }
}
