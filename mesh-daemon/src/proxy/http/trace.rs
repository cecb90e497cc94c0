//! Trace context on requests: W3C `traceparent` (with `tracestate` left as
//! it is) and B3, single (`b3`) and multi (`x-b3-*`) header. The proxy never
//! starts a trace: only a request that arrives with a sampled context gets
//! a span, whose id then goes upstream as the parent in every format the
//! request carried; the trace id and the sampled flag are kept. A request
//! without trace headers gets none added.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The trace a request belongs to, as its headers said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the proxy's.
    pub parent: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// The trace id in hex, as the access log writes it.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Lower-case hex of exactly `N` bytes (B3 allows a 64-bit trace id:
/// it is widened with zeros on the left).
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() > N * 2 || s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    let offset = N - s.len() / 2;
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[offset + i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out).filter(|b| b.iter().any(|x| *x != 0))
}

// Names, not strings: a string is parsed into a name on every lookup.
fn header(h: &HeaderMap, name: HeaderName) -> Option<&str> {
    h.get(name)?.to_str().ok()
}

/// `00-<trace id>-<parent id>-<flags>`.
fn w3c(h: &HeaderMap) -> Option<TraceContext> {
    let v = header(h, TRACEPARENT)?;
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext { trace_id: unhex(trace)?, parent: unhex(parent)?, sampled: flags & 1 == 1 })
}

/// `<trace id>-<span id>[-<sampled>[-<parent id>]]`, or just `0`/`1`/`d`.
fn b3_single(h: &HeaderMap) -> Option<TraceContext> {
    let v = header(h, B3)?;
    let mut parts = v.trim().split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    let sampled = matches!(parts.next(), Some("1") | Some("d"));
    Some(TraceContext { trace_id: unhex(trace)?, parent: unhex(span)?, sampled })
}

fn b3_multi(h: &HeaderMap) -> Option<TraceContext> {
    let trace = unhex(header(h, B3_TRACE_ID)?)?;
    let span = unhex(header(h, B3_SPAN_ID)?)?;
    let sampled = matches!(header(h, B3_SAMPLED), Some("1") | Some("true")) || header(h, B3_FLAGS) == Some("1");
    Some(TraceContext { trace_id: trace, parent: span, sampled })
}

/// The request's trace context, W3C first, then B3.
pub fn extract(h: &HeaderMap) -> Option<TraceContext> {
    w3c(h).or_else(|| b3_single(h)).or_else(|| b3_multi(h))
}

/// A span id for the proxy's span: random, never all zeros.
pub fn new_span_id() -> [u8; 8] {
    let n = fastrand::u64(1..);
    n.to_be_bytes()
}

/// Makes `span` the parent of the next hop in every format `h` carries,
/// keeping each one's trace id and sampling.
pub fn inject(h: &mut HeaderMap, span: [u8; 8]) {
    let span_hex = hex(&span);
    let set = |h: &mut HeaderMap, name: HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    if let Some(v) = header(h, TRACEPARENT).map(str::to_owned) {
        let p: Vec<&str> = v.trim().split('-').collect();
        if p.len() >= 4 {
            set(h, TRACEPARENT, format!("{}-{}-{span_hex}-{}", p[0], p[1], p[3]));
        }
    }
    if let Some(v) = header(h, B3).map(str::to_owned) {
        let p: Vec<&str> = v.trim().split('-').collect();
        if p.len() >= 2 {
            let mut out = format!("{}-{span_hex}", p[0]);
            if let Some(s) = p.get(2) {
                let _ = write!(out, "-{s}-{}", p[1]);
            }
            set(h, B3, out);
        }
    }
    if let Some(parent) = header(h, B3_SPAN_ID).map(str::to_owned) {
        if h.contains_key(B3_TRACE_ID) {
            set(h, B3_PARENT, parent);
            set(h, B3_SPAN_ID, span_hex);
        }
    }
}

/// A request's trace, and the proxy's span of it when it records one.
#[derive(Debug, Clone)]
pub struct Traced {
    pub context: TraceContext,
    /// The trace id in hex, for the access log.
    pub trace_hex: String,
    /// Recorded: the request was sampled and spans are exported.
    span: Option<Recording>,
}

/// The proxy's span of a request, until it ends.
#[derive(Debug, Clone)]
struct Recording {
    id: [u8; 8],
    start: std::time::SystemTime,
    to: std::sync::Arc<crate::telemetry::otlp::Spans>,
}

impl Traced {
    /// Reads the request's trace context and, when it is sampled and spans
    /// are exported, starts the proxy's span and makes it the next hop's
    /// parent.
    pub fn of(h: &mut HeaderMap, spans: &std::sync::Arc<crate::telemetry::otlp::Spans>) -> Option<Self> {
        let context = extract(h)?;
        let span = (context.sampled && spans.enabled()).then(|| {
            let id = new_span_id();
            inject(h, id);
            Recording { id, start: std::time::SystemTime::now(), to: spans.clone() }
        });
        Some(Self { trace_hex: context.trace_hex(), context, span })
    }

    /// The request ended: exports its span, if one is recorded.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        direction: &'static str,
        service: &str,
        endpoint: Option<std::net::SocketAddr>,
        line: (&str, &str, &str),
        status: u16,
        grpc_status: Option<u32>,
        retries: u32,
        error: bool,
    ) {
        let Some(r) = &self.span else { return };
        r.to.record(crate::telemetry::otlp::SpanRecord {
            trace_id: self.context.trace_id,
            span_id: r.id,
            parent: self.context.parent,
            direction,
            start: r.start,
            end: std::time::SystemTime::now(),
            service: service.to_owned(),
            endpoint,
            method: line.0.to_owned(),
            authority: line.1.to_owned(),
            path: line.2.to_owned(),
            status,
            grpc_status,
            retries,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn w3c_keeps_the_trace_and_flags_and_gets_the_proxys_span_as_parent() {
        let mut h = headers(&[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")]);
        let ctx = extract(&h).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        inject(&mut h, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(h["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01");
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE", "tracestate passes unchanged");
    }

    #[test]
    fn malformed_or_unsampled_contexts_are_told_apart() {
        assert_eq!(extract(&headers(&[("traceparent", "00-zz-00f067aa0ba902b7-01")])), None);
        assert_eq!(
            extract(&headers(&[("traceparent", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])),
            None
        );
        let zeros = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(extract(&headers(&[("traceparent", zeros)])), None, "an all-zero trace id is invalid");
        let unsampled = TP.replace("-01", "-00");
        assert!(!extract(&headers(&[("traceparent", &unsampled)])).unwrap().sampled);
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    #[test]
    fn b3_single_and_multi_are_read_and_rewritten() {
        let mut h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")]);
        let ctx = extract(&h).unwrap();
        assert!(ctx.sampled);
        inject(&mut h, [0xaa; 8]);
        assert_eq!(h["b3"], "80f198ee56343ba864fe8b2a57d3eff7-aaaaaaaaaaaaaaaa-1-e457b5a2e4d86bd1");

        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = extract(&h).unwrap();
        assert_eq!(ctx.trace_hex(), "0000000000000000463ac35c9f6413ad", "a 64-bit trace id, widened");
        inject(&mut h, [0xbb; 8]);
        assert_eq!(h["x-b3-spanid"], "bbbbbbbbbbbbbbbb");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad", "the trace id is kept as sent");
    }

    #[test]
    fn nothing_is_added_to_a_request_without_trace_headers() {
        let mut h = headers(&[("accept", "*/*")]);
        inject(&mut h, [1; 8]);
        assert_eq!(h.len(), 1);
    }
}
