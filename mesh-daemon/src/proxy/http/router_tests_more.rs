//! The conformance suite's GRPCRoute cases, mirrors, a backendRef's own
//! filters, and refs that do not resolve (helpers in the parent module).

use super::*;

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
