//! A route rule's matches (path, headers, query parameters, method;
//! a GRPCRoute's service and method), checked and compiled with their rank.

use super::*;

pub(super) fn regex(e: &mut Errors, p: &str, s: &str) -> Option<regex::Regex> {
    let r = regex::RegexBuilder::new(&format!("^(?:{s})$")).size_limit(REGEX_SIZE).build();
    e.take(|| p.to_owned(), r.map_err(|err| invalid!("{s:?} is not a regular expression: {err}")))
}

pub(super) fn value_match(e: &mut Errors, p: &str, d: &ValueMatchDoc) -> Option<ValueMatch> {
    let Some(v) = &d.value else {
        e.push(format!("{p}.value"), "is missing");
        return None;
    };
    match d.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Some(ValueMatch::Exact(v.clone())),
        "RegularExpression" => regex(e, &format!("{p}.value"), v).map(ValueMatch::Regex),
        k => {
            e.push(format!("{p}.type"), format!("{k:?}: use Exact or RegularExpression"));
            None
        }
    }
}

type Rank = (u8, usize, bool, usize, usize);

/// A match compiled, with its precedence rank.
pub(super) fn compiled_match(e: &mut Errors, p: &str, d: &MatchDoc, grpc: bool) -> Option<(Match, Rank)> {
    if grpc {
        return grpc_match(e, p, d);
    }
    let before = e.0.len();
    let path_doc = d.path.clone().unwrap_or_default();
    let value = path_doc.value.clone().unwrap_or_else(|| "/".into());
    let pp = format!("{p}.path");
    let path = match path_doc.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" | "PathPrefix" if !value.starts_with('/') => {
            e.push(format!("{pp}.value"), format!("{value:?} does not start with '/'"));
            None
        }
        "Exact" => Some(PathMatch::Exact(value)),
        "PathPrefix" => {
            let trimmed = value.trim_end_matches('/');
            Some(PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() }))
        }
        "RegularExpression" => regex(e, &format!("{pp}.value"), &value).map(PathMatch::Regex),
        k => {
            e.push(format!("{pp}.type"), format!("{k:?}: use Exact, PathPrefix or RegularExpression"));
            None
        }
    };
    let headers = header_matches(e, p, d);
    let mut query = Vec::new();
    for (i, q) in d.query_params.iter().enumerate() {
        let qp = format!("{p}.queryParams[{i}]");
        let Some(n) = q.name.clone().filter(|n| !n.is_empty()) else {
            e.push(format!("{qp}.name"), "is missing");
            continue;
        };
        if let Some(v) = value_match(e, &qp, q) {
            query.push((n, v));
        }
    }
    let method = match &d.method {
        None => None,
        Some(MethodDoc::Http(m)) => e.take(
            || format!("{p}.method"),
            hyper::Method::from_bytes(m.as_bytes()).map_err(|_| Invalid(format!("{m:?} is not an HTTP method"))),
        ),
        Some(MethodDoc::Grpc(_)) => {
            e.push(format!("{p}.method"), "a service and method are for GRPCRoute: write an HTTP method, e.g. GET");
            None
        }
    };
    let path = path?;
    if e.0.len() != before {
        return None;
    }
    let rank = match &path {
        PathMatch::Exact(_) => (0, 0),
        PathMatch::Regex(_) => (1, 0),
        PathMatch::Prefix(s) => (2, s.len()),
    };
    let r = (rank.0, rank.1, method.is_none(), headers.len(), query.len());
    Some((Match { path, headers, query, method }, r))
}

pub(super) fn header_matches(e: &mut Errors, p: &str, d: &MatchDoc) -> Vec<(HeaderName, ValueMatch)> {
    let mut headers = Vec::new();
    for (i, h) in d.headers.iter().enumerate() {
        let hp = format!("{p}.headers[{i}]");
        let name = match h.name.as_deref() {
            Some(n) => header_name(e, &format!("{hp}.name"), n),
            None => {
                e.push(format!("{hp}.name"), "is missing");
                None
            }
        };
        if let (Some(n), Some(v)) = (name, value_match(e, &hp, h)) {
            headers.push((n, v));
        }
    }
    headers
}

/// A GRPCRoute match: its `method` (service and method, Exact or
/// RegularExpression) becomes a match on the request path
/// `/package.Service/Method`, so both kinds share one decision. Ranked
/// as the spec orders gRPC rules: the most characters of service, then
/// of method, then the most headers.
pub(super) fn grpc_match(e: &mut Errors, p: &str, d: &MatchDoc) -> Option<(Match, Rank)> {
    let before = e.0.len();
    if d.path.is_some() || !d.query_params.is_empty() {
        e.push(p.to_owned(), "path and queryParams are for HTTPRoute: a GRPCRoute matches method and headers");
    }
    let m = match &d.method {
        None => GrpcMethodDoc::default(),
        Some(MethodDoc::Grpc(m)) => m.clone(),
        Some(MethodDoc::Http(_)) => {
            e.push(format!("{p}.method"), "write {type, service, method} for a GRPCRoute");
            GrpcMethodDoc::default()
        }
    };
    let mp = format!("{p}.method");
    let (service, method) =
        (m.service.as_deref().filter(|s| !s.is_empty()), m.method.as_deref().filter(|s| !s.is_empty()));
    let path = match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            for (f, v) in [("service", service), ("method", method)] {
                if v.is_some_and(|v| v.contains('/')) {
                    e.push(format!("{mp}.{f}"), "has a '/': name the service (package.Service) and method apart");
                }
            }
            match (service, method) {
                (Some(s), Some(m)) => Some(PathMatch::Exact(format!("/{s}/{m}"))),
                (Some(s), None) => Some(PathMatch::Prefix(format!("/{s}"))),
                (None, Some(m)) => regex(e, &mp, &format!("/[^/]+/{}", regex::escape(m))).map(PathMatch::Regex),
                (None, None) => Some(PathMatch::Prefix("/".into())),
            }
        }
        "RegularExpression" => {
            let s = service.unwrap_or("[^/]+");
            let m = method.unwrap_or("[^/]+");
            regex(e, &mp, &format!("/(?:{s})/(?:{m})")).map(PathMatch::Regex)
        }
        k => {
            e.push(format!("{mp}.type"), format!("{k:?}: use Exact or RegularExpression"));
            None
        }
    };
    let headers = header_matches(e, p, d);
    let path = path?;
    if e.0.len() != before {
        return None;
    }
    let len = service.map_or(0, str::len) << 16 | method.map_or(0, str::len);
    let rank = (0, len, true, headers.len(), 0);
    Some((Match { path, headers, query: Vec::new(), method: None }, rank))
}
