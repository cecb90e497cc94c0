//! The decision, case by case, from the Gateway API's mesh conformance
//! suite (kubernetes-sigs/gateway-api `conformance/tests/mesh/`): the same
//! routes, requests and expected backends, paths, headers and redirects.

use std::sync::Arc;

use hyper::header::HeaderMap;
use hyper::{Method, Uri};

use super::*;
use crate::model::route::{RouteDoc, Router};
use crate::model::{parse_document, ServiceKey, State};

#[path = "router_tests_more.rs"]
mod more;

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
