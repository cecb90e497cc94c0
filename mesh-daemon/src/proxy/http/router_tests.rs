//! The decision, case by case, from the Gateway API's mesh conformance
//! suite (kubernetes-sigs/gateway-api `conformance/tests/mesh/`): the same
//! routes, requests and expected backends, paths, headers and redirects.

use std::sync::Arc;

use hyper::header::HeaderMap;
use hyper::{Method, Uri};

use super::*;
use crate::model::route::{RouteDoc, Router};
use crate::model::{parse_document, ServiceKey, State};

const NS: &str = "gateway-conformance-mesh";

/// The conformance suite's Services: echo (80), echo-v1 and echo-v2 (80
/// and 8080), all `http`, and `routes` (YAML documents separated by
/// `---`, as the suite writes them).
fn state(routes: &str) -> Result<State, crate::model::ValidationErrors> {
    state_with(routes, "")
}

/// `state` with `grants` (YAML list items under `referenceGrants:`) and
/// a Service `other/db2` (port 80, http) in a third namespace.
fn state_with(routes: &str, grants: &str) -> Result<State, crate::model::ValidationErrors> {
    let svc = |name: &str, vip: &str, ports: &str| {
        format!(" - {{name: {name}, namespace: {NS}, vip: {vip}, ports: [{ports}]}}\n")
    };
    let two = "{port: 80, targetPort: 8080, appProtocol: http}, {port: 8080, appProtocol: http}, {port: 7070, appProtocol: grpc}";
    let mut doc = parse_document(
        &(format!(
            "services:\n{}{}{}{}",
            svc(
                "echo",
                "10.96.0.10",
                "{port: 80, targetPort: 8080, appProtocol: http}, {port: 7070, appProtocol: grpc}"
            ),
            svc("echo-v1", "10.96.0.11", two),
            svc("echo-v2", "10.96.0.12", two),
            " - {name: db, vip: 10.96.0.20, ports: [{port: 5432}]}\n",
        ) + &format!(
            " - {{name: db2, namespace: other, vip: 10.96.0.21, ports: [{{port: 80, appProtocol: http}}]}}\n{}",
            if grants.is_empty() { String::new() } else { format!("referenceGrants:\n{grants}") }
        )),
    )
    .unwrap();
    for d in routes.split("\n---\n").filter(|d| !d.trim().is_empty()) {
        doc.routes.push(Arc::new(serde_yaml::from_str::<RouteDoc>(d).unwrap()));
    }
    State::from_document(&doc)
}

fn router(routes: &str, parent: &str) -> Arc<Router> {
    let s = state(routes).unwrap_or_else(|e| panic!("{e}"));
    let key = ServiceKey { namespace: NS.parse_name(), name: parent.parse_name() };
    s.routes.router(&key).expect("a router for the parent").clone()
}

trait ParseName {
    fn parse_name(&self) -> crate::model::Name;
}

impl ParseName for str {
    fn parse_name(&self) -> crate::model::Name {
        crate::model::Name::parse(self).unwrap()
    }
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

fn req(path: &str, headers: &[(&str, &str)]) -> Req {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    Req { method: Method::GET, uri: format!("http://echo{path}").parse().unwrap(), headers: h }
}

impl Req {
    fn head(&self) -> Head<'_> {
        Head { method: &self.method, uri: &self.uri, headers: &self.headers }
    }
}

/// The backend Service a request goes to (`echo-v1`), or `404`, `500`,
/// `service`, or `302 LOCATION` for a redirect.
fn to(r: &Router, q: &Req, unit: f64) -> String {
    match decide(r, 80, Some(NS), &q.head(), unit) {
        Decision::Service => "service".into(),
        Decision::NotFound => "404".into(),
        Decision::Redirect { status, location, .. } => format!("{status} {location}"),
        Decision::Forward { backend: None, .. } => "500".into(),
        Decision::Forward { backend: Some(b), .. } => b.port.service.name.to_string(),
    }
}

const MATCHING: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-matching, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 8080}]
";

#[test]
fn httproute_matching() {
    let r = router(MATCHING, "echo");
    for (path, headers, want) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/", &[("Version", "one")], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/", &[("Version", "two")], "echo-v2"),
        ("/v2/", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/foo/v2/example", &[], "echo-v1"),
    ] {
        assert_eq!(to(&r, &req(path, headers), 0.0), want, "{path} {headers:?}");
    }
}

#[test]
fn mesh_split_and_no_match() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-split, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: Exact, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
",
        "echo",
    );
    assert_eq!(to(&r, &req("/v1", &[]), 0.5), "echo-v1");
    assert_eq!(to(&r, &req("/v2", &[]), 0.5), "echo-v2");
    assert_eq!(to(&r, &req("/v1/x", &[]), 0.5), "404", "Exact is the whole path");
    assert_eq!(to(&r, &req("/", &[]), 0.5), "404");
}

#[test]
fn query_params_methods_and_precedence() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: q, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: '/r/[0-9]+'}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/exact}}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        "echo",
    );
    assert_eq!(to(&r, &req("/?animal=whale", &[]), 0.0), "echo-v1");
    assert_eq!(to(&r, &req("/?animal=dolphin", &[]), 0.0), "echo-v2");
    // More query matches win over fewer.
    assert_eq!(to(&r, &req("/?animal=dolphin&color=blue", &[]), 0.0), "echo-v1");
    assert_eq!(to(&r, &req("/?ANIMAL=whale", &[]), 0.0), "404", "parameter names are exact");
    assert_eq!(to(&r, &req("/api/x", &[]), 0.0), "echo-v1");
    let mut post = req("/api/x", &[]);
    post.method = Method::POST;
    assert_eq!(to(&r, &post, 0.0), "echo-v2", "a method match wins at equal path");
    assert_eq!(to(&r, &req("/api/exact", &[]), 0.0), "echo-v2", "Exact wins over a prefix");
    assert_eq!(to(&r, &req("/r/42", &[]), 0.0), "echo-v2");
    assert_eq!(to(&r, &req("/r/42x", &[]), 0.0), "404", "a regular expression matches the whole path");
}

#[test]
fn weights_70_30_0() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-weighted-backends, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 70}
    - {name: echo-v2, port: 8080, weight: 30}
    - {name: echo, port: 80, weight: 0}
",
        "echo",
    );
    let q = req("/", &[]);
    let mut n = [0u32; 2];
    for i in 0..1000 {
        match to(&r, &q, f64::from(i) / 1000.0).as_str() {
            "echo-v1" => n[0] += 1,
            "echo-v2" => n[1] += 1,
            other => panic!("weight 0 gets nothing: {other}"),
        }
    }
    assert_eq!(n, [700, 300], "the unit interval is cut in proportion to weight");
    let zero = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: z, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo}]
  rules: [{backendRefs: [{name: echo-v1, port: 80, weight: 0}]}]
",
        "echo",
    );
    assert_eq!(to(&zero, &q, 0.3), "500", "every backend weighs 0");
}

#[test]
fn redirects_path_host_port_scheme_status() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-redirect, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}}]
  - matches: [{path: {type: PathPrefix, value: /path-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /path-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {type: PathPrefix, value: /port-and-host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, hostname: example.org, statusCode: 302}}]
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {type: PathPrefix, value: /scheme-and-host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 302, hostname: example.org}}]
  - matches: [{path: {type: PathPrefix, value: /s303}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 303}}]
  - matches: [{path: {type: PathPrefix, value: /s307}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]
  - matches: [{path: {type: PathPrefix, value: /s308}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]
",
        "echo",
    );
    for (path, want) in [
        ("/original-prefix/lemon", "302 http://echo/replacement-prefix/lemon"),
        ("/full/path/original", "302 http://echo/full-path-replacement"),
        ("/path-and-host", "302 http://example.org/replacement-prefix"),
        ("/path-and-status", "301 http://echo/replacement-prefix"),
        ("/port", "302 http://echo:8083/port"),
        ("/port-and-host-and-status", "302 http://example.org:8083/port-and-host-and-status"),
        ("/scheme", "302 https://echo/scheme"),
        ("/scheme-and-host-and-status", "302 https://example.org/scheme-and-host-and-status"),
        ("/s303", "303 http://echo/s303"),
        ("/s307", "307 http://echo/s307"),
        ("/s308?a=b", "308 http://echo/s308?a=b"),
    ] {
        assert_eq!(to(&r, &req(path, &[]), 0.0), want, "{path}");
    }
}

#[test]
fn rewrites_and_header_modifiers() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-rewrite-path, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /host}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: two.example.org}}]
    backendRefs: [{name: echo-v1, port: 80}]
",
        "echo",
    );
    let sent = |path: &str, headers: &[(&str, &str)]| {
        let mut q = req(path, headers);
        let (rule, backend, prefix) = match decide(&r, 80, None, &q.head(), 0.0) {
            Decision::Forward { rule, backend: Some(b), prefix, .. } => (rule, b, prefix),
            other => panic!("{path}: {other:?}"),
        };
        rewrite_request(&mut q.uri, &mut q.headers, rule, backend, prefix);
        let mut resp = HeaderMap::new();
        rewrite_response(&mut resp, rule, backend);
        (q, resp)
    };
    for (path, want) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/prefix/one?x=1", "/one?x=1"),
    ] {
        assert_eq!(sent(path, &[]).0.uri.path_and_query().unwrap().as_str(), want, "{path}");
    }
    let (q, resp) = sent(
        "/full/rewrite-path-and-modify-headers/test",
        &[("X-Header-Remove", "remove-val"), ("X-Header-Add-Append", "append-val-1"), ("x-header-set", "set-val")],
    );
    assert_eq!(q.uri.path(), "/test");
    let all = |n: &str| q.headers.get_all(n).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(all("x-header-set"), ["set-overwrites-values"], "set overwrites, whatever the case");
    assert_eq!(all("X-Header-Add"), ["header-val-1"]);
    assert_eq!(all("X-Header-Add-Append"), ["append-val-1", "header-val-2"], "add appends");
    assert!(q.headers.get("x-header-remove").is_none());
    assert_eq!(resp.get("x-header-set").unwrap(), "set");
    let (q, _) = sent("/host/x", &[("host", "echo")]);
    assert_eq!(
        (q.uri.host(), q.headers.get("host").unwrap().to_str().unwrap()),
        (Some("two.example.org"), "two.example.org")
    );
}

#[test]
fn consumer_routes_apply_to_their_namespace_only() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-echo-add-header, namespace: gateway-conformance-mesh-consumer}
spec:
  parentRefs: [{group: '', kind: Service, name: echo-v1, namespace: gateway-conformance-mesh}]
  rules:
  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]
    backendRefs: [{name: echo-v1, namespace: gateway-conformance-mesh, port: 80}]
",
        "echo-v1",
    );
    let q = req("/", &[]);
    match decide(&r, 80, Some("gateway-conformance-mesh-consumer"), &q.head(), 0.0) {
        Decision::Forward { rule, backend: Some(b), .. } => {
            assert_eq!(b.port.to_string(), "gateway-conformance-mesh/echo-v1:80");
            let mut h = HeaderMap::new();
            rewrite_response(&mut h, rule, b);
            assert_eq!(h.get("x-header-set").unwrap(), "set");
        }
        other => panic!("the consumer namespace's client takes its route: {other:?}"),
    }
    for ns in [Some(NS), Some("other"), None] {
        assert!(matches!(decide(&r, 80, ns, &q.head(), 0.0), Decision::Service), "{ns:?}: the Service as it is");
    }
}

#[test]
fn named_rules_and_ports() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: named, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo-v1, port: 8080}]
  rules:
  - name: named-rule
    matches: [{path: {type: PathPrefix, value: /named}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v2, port: 8080}]
",
        "echo-v1",
    );
    let q = req("/named", &[]);
    let Decision::Forward { rule, .. } = decide(&r, 8080, None, &q.head(), 0.0) else { panic!() };
    assert_eq!((rule.route.to_string().as_str(), &*rule.name), ("gateway-conformance-mesh/named", "named-rule"));
    let Decision::Forward { rule, .. } = decide(&r, 8080, None, &req("/x", &[]).head(), 0.0) else { panic!() };
    assert_eq!(&*rule.name, "1", "an unnamed rule is known by its index");
    assert!(matches!(decide(&r, 80, None, &q.head(), 0.0), Decision::Service), "port 80 has no route: mesh-ports");
}

#[test]
fn bad_routes_are_refused_with_their_field_and_the_fix() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: gateway-conformance-mesh}\n";
    for (spec, want) in [
        ("spec: {parentRefs: [{name: nope}], rules: [{backendRefs: [{name: echo-v1, port: 80}]}]}", "routes[0].spec.parentRefs[0].name: there is no service gateway-conformance-mesh/nope"),
        ("spec: {parentRefs: [{name: echo}], rules: [{backendRefs: [{name: echo-v1}]}]}", "routes[0].spec.rules[0].backendRefs[0].port: is missing"),
        ("spec: {parentRefs: [{name: db, namespace: default}], rules: [{backendRefs: [{name: echo-v1, port: 80}]}]}", "routes[0].spec.parentRefs[0]: no port of service default/db carries requests"),
        ("spec: {parentRefs: [{name: echo}], rules: [{matches: [{path: {type: RegularExpression, value: '(['}}], backendRefs: [{name: echo-v1, port: 80}]}]}", "routes[0].spec.rules[0].matches[0].path.value: \"([\" is not a regular expression"),
        ("spec: {parentRefs: [{name: echo}], rules: [{}]}", "routes[0].spec.rules[0].backendRefs: is empty"),
        ("spec: {parentRefs: [{name: echo}], rules: [{retry: {codes: [200]}, backendRefs: [{name: echo-v1, port: 80}]}]}", "routes[0].spec.rules[0].retry.codes[0]: 200 is not a 4xx or 5xx status"),
        ("spec: {parentRefs: [{name: echo}], rules: [{retry: {codes: [503], backoff: soon}, backendRefs: [{name: echo-v1, port: 80}]}]}", "routes[0].spec.rules[0].retry.backoff: \"soon\" is not a duration"),
        ("spec: {parentRefs: [{name: echo}], rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, percent: 150}}], backendRefs: [{name: echo-v1, port: 80}]}]}", "requestMirror.percent: 150 is over 100"),
        ("spec: {parentRefs: [{name: echo}], rules: [{filters: [{type: ExtensionRef, extensionRef: {}}], backendRefs: [{name: echo-v1, port: 80}]}]}", "ExtensionRef is not implemented"),
    ] {
        let e = state(&format!("{base}{spec}\n")).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "{spec}\nwant {want}\ngot {e}");
    }
    let e = state(&MATCHING.replace("HTTPRoute", "TCPRoute")).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("routes[0].kind: \"TCPRoute\" is not a route kind"), "{e}");
    let e = state(&format!("{MATCHING}---\n{MATCHING}")).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("routes[1].metadata: route gateway-conformance-mesh/mesh-matching is also routes[0]"), "{e}");
}

#[test]
fn grpcroute_method_and_header_matches_weights_and_modifiers() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{headers: [{name: x-test-case, value: set}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-header-set, value: set-overwrites-values}]}
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {service: mesh.test.Echo, method: Say}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - matches: [{method: {service: mesh.test.Echo}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {type: RegularExpression, service: '.*\\.Other', method: 'C.*'}}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - backendRefs:
    - {name: echo-v1, port: 7070, weight: 70}
    - {name: echo-v2, port: 7070, weight: 30}
    - {name: echo, port: 7070, weight: 0}
",
        "echo",
    );
    let call = |path: &str, headers: &[(&str, &str)], unit: f64| {
        let mut q = req(path, headers);
        q.method = Method::POST;
        match decide(&r, 7070, None, &q.head(), unit) {
            Decision::Forward { rule, backend: Some(b), prefix, .. } => {
                rewrite_request(&mut q.uri, &mut q.headers, rule, b, prefix);
                let set = q.headers.get("x-header-set").map(|v| v.to_str().unwrap().to_owned());
                (b.port.to_string(), set)
            }
            other => panic!("{path}: {other:?}"),
        }
    };
    let p = |s: &str| format!("gateway-conformance-mesh/{s}");
    assert_eq!(call("/mesh.test.Echo/Say", &[], 0.0).0, p("echo-v2:7070"), "service and method, exact");
    assert_eq!(call("/mesh.test.Echo/Count", &[], 0.0).0, p("echo-v1:7070"), "the service alone");
    assert_eq!(call("/mesh.test.Other/Count", &[], 0.0).0, p("echo-v2:8080"), "the regular expression");
    assert_eq!(
        call("/mesh.test.Echo/Say", &[("x-test-case", "set"), ("x-header-set", "old")], 0.0),
        (p("echo-v2:7070"), Some("old".into())),
        "a header match ranks below any service or method match"
    );
    assert_eq!(
        call("/other.Svc/M", &[("x-test-case", "set"), ("x-header-set", "old")], 0.0),
        (p("echo-v1:7070"), Some("set-overwrites-values".into())),
        "and above none; its filter sets the header"
    );
    let mut n = [0; 2];
    for i in 0..100 {
        let b = call("/other.Svc/M", &[], f64::from(i) / 100.0).0;
        n[usize::from(b == p("echo-v2:7070"))] += 1;
    }
    assert_eq!(n, [70, 30], "grpcroute-weight: 70/30/0");
    for (spec, want) in [
        (
            "[{matches: [{path: {value: /x}}], backendRefs: [{name: echo-v1, port: 7070}]}]",
            "path and queryParams are for HTTPRoute",
        ),
        (
            "[{filters: [{type: URLRewrite, urlRewrite: {hostname: x}}], backendRefs: [{name: echo-v1, port: 7070}]}]",
            "URLRewrite is for HTTPRoute",
        ),
        (
            "[{matches: [{method: {service: a/b}}], backendRefs: [{name: echo-v1, port: 7070}]}]",
            "method.service: has a '/'",
        ),
    ] {
        let doc = format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: {NS}}}\nspec: {{parentRefs: [{{name: echo, port: 7070}}], rules: {spec}}}\n");
        let e = state(&doc).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "{spec}: {e}");
    }
}

#[test]
fn the_segment_index_keeps_the_precedence_order() {
    let mut rules = String::new();
    for i in 0..40 {
        rules.push_str(&format!(
            "  - matches: [{{path: {{type: Exact, value: /r{i}}}}}]\n    backendRefs: [{{name: echo-v1, port: 80}}]\n"
        ));
    }
    let http = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: many, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules:\n{rules}  - backendRefs: [{{name: echo-v2, port: 80}}]\n"
    );
    let r = router(&http, "echo");
    assert_eq!(r.by_segment.as_ref().unwrap()["r7"], [7, 40], "a request for /r7... checks /r7 and the catch-all");
    assert_eq!(r.generic, [40]);
    assert_eq!(to(&r, &req("/r7", &[]), 0.0), "echo-v1");
    assert_eq!(to(&r, &req("/r7/x", &[]), 0.0), "echo-v2", "Exact is the whole path");
    assert_eq!(to(&r, &req("/", &[]), 0.0), "echo-v2");
    // A GRPCRoute's service match ranks before an Exact path of the same
    // parent: nothing is indexed, and the order holds.
    let grpc = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules: [{{matches: [{{method: {{service: r7}}}}], backendRefs: [{{name: echo, port: 80}}]}}]\n"
    );
    let r = router(&format!("{http}---\n{grpc}"), "echo");
    assert_eq!(to(&r, &req("/r7", &[]), 0.0), "echo", "the longer service match first");
    assert_eq!(to(&r, &req("/r8", &[]), 0.0), "echo-v1");
    // Prefixes by their first segment, a regular expression for any path,
    // in precedence order: the regex ranks before the prefixes.
    let mixed = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: mixed, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /a/b}}}}]\n    backendRefs: [{{name: echo-v1, port: 80}}]\n  - matches: [{{path: {{type: RegularExpression, value: '/a/b/c.*'}}}}]\n    backendRefs: [{{name: echo-v2, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /a}}}}]\n    backendRefs: [{{name: echo, port: 80}}]\n"
    );
    let r = router(&mixed, "echo");
    assert_eq!(to(&r, &req("/a/b/cd", &[]), 0.0), "echo-v2", "the regex ranks first");
    assert_eq!(to(&r, &req("/a/b/x", &[]), 0.0), "echo-v1", "then the longest prefix");
    assert_eq!(to(&r, &req("/a/x", &[]), 0.0), "echo");
    assert_eq!(to(&r, &req("/b", &[]), 0.0), "404", "no entry for segment b: only the regex is checked");
}

#[test]
fn mirrors_take_their_share_of_requests() {
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: m, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}, fraction: {numerator: 1, denominator: 4}}}
    backendRefs:
    - name: echo-v1
      port: 80
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 80}, percent: 10}}]
",
        "echo",
    );
    let Decision::Forward { rule, backend: Some(b), .. } = decide(&r, 80, None, &req("/", &[]).head(), 0.0) else {
        panic!()
    };
    let shares: Vec<(String, u32, u32)> = rule
        .filters
        .mirrors
        .iter()
        .chain(&b.filters.mirrors)
        .map(|m| (m.port.to_string(), m.numerator, m.denominator))
        .collect();
    let p = |s: &str| format!("gateway-conformance-mesh/{s}");
    assert_eq!(shares, [(p("echo-v2:80"), 1, 1), (p("echo-v2:8080"), 1, 4), (p("echo:80"), 10, 100)]);
    let quarter = &rule.filters.mirrors[1];
    let taken = (0..1000).filter(|i| quarter.takes(f64::from(*i) / 1000.0)).count();
    assert_eq!(taken, 250);
    assert!((0..100).all(|i| rule.filters.mirrors[0].takes(f64::from(i) / 100.0)), "no share given: every request");
}

#[test]
fn a_backend_refs_own_header_modifiers_apply_after_the_rules() {
    // httproute-request-header-modifier-backend: filters on a backendRef
    // act on the requests sent to that backend only.
    let r = router(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-filters, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: rule}], add: [{name: X-Rule, value: r}]}}
    backendRefs:
    - name: echo-v1
      port: 80
      weight: 1
      filters:
      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: v1}], remove: [X-Rule]}}
      - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: X-Backend, value: v1}]}}
    - {name: echo-v2, port: 80, weight: 1}
",
        "echo",
    );
    let sent = |unit: f64| {
        let mut q = req("/", &[]);
        let Decision::Forward { rule, backend: Some(b), prefix, .. } = decide(&r, 80, None, &q.head(), unit) else {
            panic!()
        };
        rewrite_request(&mut q.uri, &mut q.headers, rule, b, prefix);
        let mut resp = HeaderMap::new();
        rewrite_response(&mut resp, rule, b);
        let h = |m: &HeaderMap, n: &str| m.get(n).map(|v| v.to_str().unwrap().to_owned());
        (b.port.service.name.to_string(), h(&q.headers, "x-header-set"), h(&q.headers, "x-rule"), h(&resp, "x-backend"))
    };
    assert_eq!(
        sent(0.2),
        ("echo-v1".into(), Some("v1".into()), None, Some("v1".into())),
        "the backend's after the rule's"
    );
    assert_eq!(
        sent(0.7),
        ("echo-v2".into(), Some("rule".into()), Some("r".into()), None),
        "the other backend: the rule's only"
    );
}

#[test]
fn refs_that_do_not_resolve_answer_500_for_their_share_and_say_why() {
    // As the Gateway API says: the route is accepted, ResolvedRefs is
    // False, and the share of requests drawn for a bad ref is answered
    // 500 while the good refs take theirs.
    let routes = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: half, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: gone, port: 80}}}]
    backendRefs:
    - {name: echo-v1, port: 8080, weight: 50}
    - {name: nope, port: 80, weight: 20}
    - {name: echo-v2, port: 9, weight: 10}
    - {name: db2, namespace: other, port: 80, weight: 10}
    - {group: example.com, kind: Bucket, name: b, weight: 10}
";
    let s = state(routes).unwrap();
    let why: Vec<(String, &str)> = s.routes.unresolved.iter().map(|u| (u.path.clone(), u.reason.as_str())).collect();
    let p = "routes[0].spec.rules[0]";
    assert_eq!(
        why,
        [
            (format!("{p}.filters[0].requestMirror.backendRef"), "BackendNotFound"),
            (format!("{p}.backendRefs[1]"), "BackendNotFound"),
            (format!("{p}.backendRefs[2]"), "BackendNotFound"),
            (format!("{p}.backendRefs[3]"), "RefNotPermitted"),
            (format!("{p}.backendRefs[4]"), "InvalidKind"),
        ]
    );
    assert!(s.routes.unresolved[3]
        .message
        .contains("no ReferenceGrant there lets HTTPRoutes of gateway-conformance-mesh name it"));
    let r = s.routes.router(&ServiceKey { namespace: NS.parse_name(), name: "echo".parse_name() }).unwrap().clone();
    assert!(r.rules[0].filters.mirrors.is_empty(), "a mirror to nothing is not sent");
    let q = req("/", &[]);
    let mut n = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..100 {
        *n.entry(to(&r, &q, f64::from(i) / 100.0)).or_default() += 1;
    }
    assert_eq!(n, [("500".to_owned(), 50), ("echo-v1".to_owned(), 50)].into(), "half the weight is on bad refs");

    // A grant in the Service's namespace, for this kind and namespace,
    // lets the route name it; one for another kind, namespace or Service
    // does not.
    let grant = |from_kind: &str, from_ns: &str, to_name: &str| {
        format!(
            " - apiVersion: gateway.networking.k8s.io/v1beta1\n   kind: ReferenceGrant\n   metadata: {{name: g, namespace: other}}\n   spec:\n     from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n     to: [{{group: '', kind: Service{to_name}}}]\n"
        )
    };
    let to_db2 = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: far, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{name: echo, port: 80}]
  rules: [{backendRefs: [{name: db2, namespace: other, port: 80}]}]
";
    for (g, ok) in [
        (grant("HTTPRoute", NS, ""), true),
        (grant("HTTPRoute", NS, ", name: db2"), true),
        (grant("HTTPRoute", NS, ", name: db3"), false),
        (grant("GRPCRoute", NS, ""), false),
        (grant("HTTPRoute", "default", ""), false),
        (grant("HTTPRoute", NS, "").replace("namespace: other}", "namespace: default}"), false),
    ] {
        let s = state_with(to_db2, &g).unwrap_or_else(|e| panic!("{g}: {e}"));
        let r = s.routes.router(&ServiceKey { namespace: NS.parse_name(), name: "echo".parse_name() }).unwrap().clone();
        assert_eq!(to(&r, &q, 0.5), if ok { "db2" } else { "500" }, "{g}");
        assert_eq!(s.routes.unresolved.is_empty(), ok, "{g}");
    }
    let bad = grant("HTTPRoute", NS, "").replace("kind: Service", "kind: Secret").replace("v1beta1", "v2");
    let e = state_with(to_db2, &bad).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("referenceGrants[0].apiVersion: \"gateway.networking.k8s.io/v2\" is not served here"), "{e}");
    assert!(e.contains("referenceGrants[0].spec.to[0]: /Secret is not a Service"), "{e}");
}
