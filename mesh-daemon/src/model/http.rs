//! A service's per-request policy (`services[].http`): timeouts, retries
//! with a budget, outlier ejection by answers, and a local rate limit,
//! validated with the path of every field.
#![forbid(unsafe_code)]

use std::time::Duration;

use super::document::{BudgetDoc, HttpDoc, OutlierDoc, RateLimitDoc, RetriesDoc};
use super::errors::{invalid, Errors, Invalid};
use super::names::bounded_duration;
use super::ServicePort;

/// What the proxy does per request for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpPolicy {
    /// The whole request, retries included, until the response headers.
    pub timeout: Option<Duration>,
    /// One try, until its response headers.
    pub per_try_timeout: Option<Duration>,
    /// None: no request is sent twice (a failed connect still goes to
    /// another endpoint: nothing of it was sent).
    pub retries: Option<RetryPolicy>,
    /// None: answers never eject an endpoint.
    pub outlier: Option<Outlier>,
    pub rate_limit: Option<RateLimit>,
    /// Whether requests reach the workload with the verified caller in
    /// `x-forwarded-client-cert`.
    pub forward_client_cert: bool,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        Self {
            timeout: None,
            per_try_timeout: None,
            retries: None,
            outlier: Some(Outlier::default()),
            rate_limit: None,
            forward_client_cert: true,
        }
    }
}

/// What applies to one request: the service's, or a route rule's
/// (Gateway API `timeouts` and `retry`) before them.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'p> {
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retries: Option<&'p RetryPolicy>,
}

impl HttpPolicy {
    /// The service's own rules for a request.
    pub fn rules(&self) -> Rules<'_> {
        Rules { timeout: self.timeout, per_try_timeout: self.per_try_timeout, retries: self.retries.as_ref() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    /// Retries after the first try.
    pub attempts: u32,
    pub budget: Budget,
    /// Bodies up to this size are kept to be sent again.
    pub max_body: u64,
    /// Methods that may be retried; None: the idempotent ones (every call
    /// on gRPC ports).
    pub methods: Option<Vec<hyper::Method>>,
    /// The least wait before a retry, doubling up to 8 times it, no
    /// jitter (an HTTPRoute's `retry.backoff`); None: 10 ms doubling to
    /// 500 ms with jitter.
    pub backoff: Option<Duration>,
}

/// Which answers are retried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// HTTP statuses, as inclusive ranges.
    pub statuses: Vec<(u16, u16)>,
    /// gRPC status codes, as a bit set.
    pub grpc: u32,
}

impl RetryOn {
    pub fn status(&self, s: u16) -> bool {
        self.statuses.iter().any(|(lo, hi)| (*lo..=*hi).contains(&s))
    }

    pub fn grpc_status(&self, code: u32) -> bool {
        code < 32 && self.grpc & (1 << code) != 0
    }
}

/// gRPC status names as `retryOn` spells them, by code.
pub const GRPC_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// How many retries a service may add to its requests (linkerd2-proxy's
/// default: 20% of requests plus 10 a second, over 10 s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) }
    }
}

/// Failed answers in a row that eject an endpoint through its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    /// At most this share of the service's endpoints ejected at once (at
    /// least one may be).
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self { consecutive_failures: 5, max_ejected_percent: 50 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub per_identity: bool,
}

/// `64KiB`, `1MiB`, `512` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, Invalid> {
    let t = s.trim();
    let (num, mult) = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1), ("", 1)]
        .into_iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim(), m)))
        .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| invalid!("{s:?} is not a size: use bytes, or a number with KiB or MiB (64KiB)"))
}

/// The policy of service `p` (a field path such as `services[0]`), whose
/// ports are `ports`; `grpc` when one of them speaks gRPC. None when an
/// error was recorded.
pub(super) fn validate(e: &mut Errors, p: &str, doc: Option<&HttpDoc>, ports: &[ServicePort]) -> Option<HttpPolicy> {
    let Some(doc) = doc else { return Some(HttpPolicy::default()) };
    let p = format!("{p}.http");
    let requests = ports.iter().any(|port| port.app_protocol.is_requests());
    let grpc = ports.iter().any(|port| port.app_protocol == super::AppProtocol::Grpc);
    let errors_before = e.0.len();
    if !requests {
        for (field, set) in [
            ("timeout", doc.timeout.is_some()),
            ("perTryTimeout", doc.per_try_timeout.is_some()),
            ("retries", doc.retries.is_some()),
            ("outlier", doc.outlier.is_some()),
        ] {
            if set {
                e.push(
                    format!("{p}.{field}"),
                    "acts on requests, and every port of this service is `tcp`: set ports[].appProtocol (http, http2, grpc or auto)",
                );
            }
        }
    }
    let span = |e: &mut Errors, field: &str, v: &Option<String>| {
        v.as_deref().and_then(|s| {
            e.take(|| format!("{p}.{field}"), bounded_duration(s, Duration::from_millis(1), Duration::from_secs(3600)))
        })
    };
    let timeout = span(e, "timeout", &doc.timeout);
    let per_try_timeout = span(e, "perTryTimeout", &doc.per_try_timeout);
    if let (Some(t), Some(pt)) = (timeout, per_try_timeout) {
        if pt > t {
            e.push(format!("{p}.perTryTimeout"), format!("{pt:?} is longer than timeout {t:?}: make it shorter"));
        }
    }
    let service_retries = doc.retries.as_ref().and_then(|r| retries(e, &format!("{p}.retries"), r, grpc));
    // consecutive5xx: 0 turns it off.
    let outlier = outlier(e, &format!("{p}.outlier"), doc.outlier.as_ref()).filter(|o| o.consecutive_failures > 0);
    let rate_limit = doc.rate_limit.as_ref().and_then(|r| rate_limit(e, &format!("{p}.rateLimit"), r));
    let forward_client_cert = match doc.forward_client_cert.as_deref() {
        None | Some("set") => true,
        Some("off") => false,
        Some(v) => {
            e.push(format!("{p}.forwardClientCert"), format!("{v:?}: write set or off"));
            true
        }
    };
    if doc.routes.is_some() {
        e.push(
            format!("{p}.routes"),
            "per-prefix routes are gone: write a top-level HTTPRoute for this service whose rule matches the prefix (PathPrefix) and sets timeouts.request, timeouts.backendRequest and retry (see docs/src/guides/routing.md)",
        );
    }
    (e.0.len() == errors_before).then_some(HttpPolicy {
        timeout,
        per_try_timeout,
        retries: service_retries,
        outlier,
        rate_limit,
        forward_client_cert,
    })
}

fn retries(e: &mut Errors, p: &str, doc: &RetriesDoc, grpc: bool) -> Option<RetryPolicy> {
    let mut on = RetryOn::default();
    let default_on: Vec<String> =
        if grpc { vec!["gateway-error".into(), "unavailable".into()] } else { vec!["gateway-error".into()] };
    for (i, item) in doc.retry_on.as_ref().unwrap_or(&default_on).iter().enumerate() {
        match item.as_str() {
            // Always on: a request whose connect failed was never sent.
            "connect-failure" => {}
            "5xx" => on.statuses.push((500, 599)),
            "gateway-error" => on.statuses.extend([(502, 504)]),
            code if code.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) => {
                let c: u16 = code.parse().unwrap_or(0);
                on.statuses.push((c, c));
            }
            name => match GRPC_NAMES.iter().position(|n| *n == name) {
                Some(code) if code > 0 => on.grpc |= 1 << code,
                _ => e.push(
                    format!("{p}.retryOn[{i}]"),
                    format!("{name:?} is not a condition: use connect-failure, 5xx, gateway-error, a status code (503) or a gRPC status (unavailable, internal, ...)"),
                ),
            },
        }
    }
    let attempts = e.take(
        || format!("{p}.attempts"),
        match doc.attempts.unwrap_or(2) {
            a @ 0..=10 => Ok(a as u32),
            a => Err(invalid!("{a} is not in 0..10")),
        },
    );
    let budget = budget(e, &format!("{p}.budget"), doc.budget.as_ref());
    let max_body = e.take(|| format!("{p}.maxBody"), parse_bytes(doc.max_body.as_deref().unwrap_or("64KiB")));
    if max_body.is_some_and(|b| b > 16 << 20) {
        e.push(format!("{p}.maxBody"), "at most 16MiB: each retried request holds its body in memory");
    }
    let methods = doc.methods.as_ref().map(|m| {
        m.iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let r = hyper::Method::from_bytes(name.to_ascii_uppercase().as_bytes())
                    .map_err(|_| invalid!("{name:?} is not an HTTP method"));
                e.take(|| format!("{p}.methods[{i}]"), r)
            })
            .collect()
    });
    Some(RetryPolicy { on, attempts: attempts?, budget: budget?, max_body: max_body?, methods, backoff: None })
}

fn budget(e: &mut Errors, p: &str, doc: Option<&BudgetDoc>) -> Option<Budget> {
    let d = Budget::default();
    let Some(doc) = doc else { return Some(d) };
    let ratio = e.take(
        || format!("{p}.ratio"),
        match doc.ratio.unwrap_or(d.ratio) {
            r if (0.0..=1.0).contains(&r) => Ok(r),
            r => Err(invalid!("{r} is not between 0 and 1 (retries per request)")),
        },
    );
    let min = e.take(
        || format!("{p}.minPerSecond"),
        match doc.min_per_second.unwrap_or(i64::from(d.min_per_second)) {
            m @ 0..=100_000 => Ok(m as u32),
            m => Err(invalid!("{m} is not in 0..100000")),
        },
    );
    let window = match &doc.window {
        None => Some(d.window),
        Some(w) => {
            e.take(|| format!("{p}.window"), bounded_duration(w, Duration::from_secs(1), Duration::from_secs(60)))
        }
    };
    Some(Budget { ratio: ratio?, min_per_second: min?, window: window? })
}

fn outlier(e: &mut Errors, p: &str, doc: Option<&OutlierDoc>) -> Option<Outlier> {
    let d = Outlier::default();
    let Some(doc) = doc else { return Some(d) };
    let n = e.take(
        || format!("{p}.consecutive5xx"),
        match doc.consecutive5xx.unwrap_or(i64::from(d.consecutive_failures)) {
            n @ 0..=1000 => Ok(n as u32),
            n => Err(invalid!("{n} is not in 0..1000 (0 turns ejection by answers off)")),
        },
    );
    let pct = e.take(
        || format!("{p}.maxEjectedPercent"),
        match doc.max_ejected_percent.unwrap_or(i64::from(d.max_ejected_percent)) {
            n @ 0..=100 => Ok(n as u32),
            n => Err(invalid!("{n} is not a percentage (0..100)")),
        },
    );
    Some(Outlier { consecutive_failures: n?, max_ejected_percent: pct? })
}

fn rate_limit(e: &mut Errors, p: &str, doc: &RateLimitDoc) -> Option<RateLimit> {
    let rps = e.take(
        || format!("{p}.requestsPerSecond"),
        match doc.requests_per_second {
            r if r > 0.0 && r <= 10_000_000.0 => Ok(r),
            r => Err(invalid!("{r} is not a rate above 0")),
        },
    );
    let burst = e.take(
        || format!("{p}.burst"),
        match doc.burst {
            None => Ok(rps.unwrap_or(1.0).ceil().max(1.0) as u32),
            Some(b @ 1..=10_000_000) => Ok(b as u32),
            Some(b) => Err(invalid!("{b} is not a burst of at least 1")),
        },
    );
    Some(RateLimit { per_second: rps?, burst: burst?, per_identity: doc.per_identity })
}

/// Checks `doc` alone, for a service with `ports`: the errors, with paths
/// under `http`. Discovery uses it to leave out a bad annotation rather
/// than make the whole state invalid.
pub fn check(doc: &HttpDoc, ports: &[ServicePort]) -> Result<(), Vec<String>> {
    let mut e = Errors::default();
    validate(&mut e, "service", Some(doc), ports);
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(e.0.iter().map(|f| f.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors of a one-service state whose port has `app` and whose
    /// `http` is the YAML flow mapping `http`.
    fn errors(app: &str, http: &str) -> Vec<String> {
        let doc = crate::model::parse_document(&format!(
            "nodes: [{{name: a, address: 172.18.0.2}}]\n\
             services:\n\
             \x20- {{name: web, vip: 10.96.0.10, ports: [{{port: 80, appProtocol: {app}}}], endpoints: [{{ip: 10.244.1.3, node: a}}],\n\
             \x20   http: {http}}}\n"
        ))
        .unwrap();
        match crate::model::State::from_document(&doc) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn a_good_policy_is_taken_whole() {
        let doc = crate::model::parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n\
             \x20- {name: web, vip: 10.96.0.10, ports: [{port: 80, appProtocol: grpc}], endpoints: [{ip: 10.244.1.3, node: a}],\n\
             \x20   http: {timeout: 10s, perTryTimeout: 2s, retries: {attempts: 3, maxBody: 1MiB, budget: {ratio: 0.1}},\n\
             \x20          outlier: {consecutive5xx: 7}, rateLimit: {requestsPerSecond: 50, perIdentity: true}}}\n",
        )
        .unwrap();
        let state = crate::model::State::from_document(&doc).unwrap();
        let p = &state.services[0].http;
        assert_eq!((p.timeout, p.per_try_timeout), (Some(Duration::from_secs(10)), Some(Duration::from_secs(2))));
        let r = p.retries.as_ref().unwrap();
        assert_eq!((r.attempts, r.max_body, r.budget.ratio, r.budget.min_per_second), (3, 1 << 20, 0.1, 10));
        assert!(r.on.grpc_status(14) && r.on.status(503), "gRPC ports retry unavailable by default");
        assert_eq!(p.outlier, Some(Outlier { consecutive_failures: 7, max_ejected_percent: 50 }));
        assert_eq!(p.rate_limit, Some(RateLimit { per_second: 50.0, burst: 50, per_identity: true }));
    }

    #[test]
    fn bad_fields_are_named_with_their_paths_and_the_fix() {
        let e = errors("http", "{retries: {retryOn: [5xx, bogus]}}");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("services[0].http.retries.retryOn[1]: \"bogus\" is not a condition"), "{e:?}");
        let e = errors("tcp", "{timeout: 1s}");
        assert!(
            e[0].starts_with("services[0].http.timeout: acts on requests") && e[0].contains("appProtocol"),
            "{e:?}"
        );
        let e = errors("http", "{timeout: 1s, perTryTimeout: 2s}");
        assert!(e[0].starts_with("services[0].http.perTryTimeout:") && e[0].contains("longer than timeout"), "{e:?}");
        let e = errors("http", "{rateLimit: {requestsPerSecond: 0}}");
        assert!(e[0].starts_with("services[0].http.rateLimit.requestsPerSecond:"), "{e:?}");
        let e = errors("http", "{retries: {budget: {ratio: 2}, maxBody: 64kb}}");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("services[0].http.retries.budget.ratio:")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("services[0].http.retries.maxBody:")), "{e:?}");
        assert!(errors("tcp", "{rateLimit: {requestsPerSecond: 5}}").is_empty(), "a tcp port limits connections");
    }

    #[test]
    fn the_caller_is_forwarded_unless_the_service_says_off() {
        assert!(HttpPolicy::default().forward_client_cert, "set by default");
        let e = errors("http", "{forwardClientCert: maybe}");
        assert!(e[0].starts_with("services[0].http.forwardClientCert: \"maybe\": write set or off"), "{e:?}");
        assert!(errors("http", "{forwardClientCert: off}").is_empty());
    }

    #[test]
    fn per_prefix_routes_are_refused_with_the_way_to_an_httproute() {
        let e = errors("http", "{timeout: 1s, routes: [{prefix: /api, timeout: 5s}]}");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("services[0].http.routes: per-prefix routes are gone: write a top-level HTTPRoute"),
            "{e:?}"
        );
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert!(parse_bytes("64kb").unwrap_err().0.contains("KiB"));
    }

    #[test]
    fn retry_conditions_cover_statuses_and_grpc_codes() {
        let mut e = Errors::default();
        let doc = RetriesDoc {
            retry_on: Some(vec!["gateway-error".into(), "429".into(), "unavailable".into(), "connect-failure".into()]),
            ..Default::default()
        };
        let r = retries(&mut e, "s.http.retries", &doc, false).unwrap();
        assert!(e.0.is_empty());
        assert!(r.on.status(502) && r.on.status(504) && r.on.status(429) && !r.on.status(500));
        assert!(r.on.grpc_status(14) && !r.on.grpc_status(13));
        assert_eq!((r.attempts, r.max_body, r.budget), (2, 65536, Budget::default()));
    }
}
