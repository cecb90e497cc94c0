//! The routes and policies `cargo xtask bench` puts on its routes and
//! authz rows, and the daemon's instruction-count loads on theirs: one
//! text for both, so what is counted is what is timed.

use std::fmt::Write as _;

/// 50 HTTPRoutes of 16 rules on each `(parent, backend)` Service (port
/// 80): a PathPrefix and a header match each, which no bench request
/// matches and the router cannot skip by an index of exact paths, and one
/// catch-all route (`PARENT-all`) to `backend`, which every request ends
/// at. A `routes:` list, YAML.
pub fn bench_routes(parents: &[(&str, &str)]) -> String {
    let mut s = String::from("routes:\n");
    for (parent, backend) in parents {
        for i in 0..50 {
            let _ = writeln!(s, "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute");
            let _ = writeln!(s, "    metadata: {{ name: {parent}-{i} }}\n    spec:\n      parentRefs: [{{ name: {parent}, port: 80 }}]\n      rules:");
            for j in 0..16 {
                let _ = writeln!(
                    s,
                    "        - matches: [{{ path: {{ type: PathPrefix, value: /r{i}/{j} }}, headers: [{{ name: x-rule, value: \"{j}\" }}] }}]\n          backendRefs: [{{ name: {backend}, port: 80 }}]"
                );
            }
        }
        let _ = writeln!(
            s,
            "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata: {{ name: {parent}-all }}\n    spec:\n      parentRefs: [{{ name: {parent}, port: 80 }}]\n      rules: [{{ backendRefs: [{{ name: {backend}, port: 80 }}] }}]"
        );
    }
    s
}

/// 19 DENY policies of 10 rules on the Services `targets` (a principal
/// and a path each, or in every other policy a path alone, which no bench
/// request has) and an ALLOW policy (`bench-19`) of 10 rules, the last of
/// which (empty) matches every request: each request is checked against
/// all 200 rules. A `policies:` list, YAML.
pub fn bench_policies(targets: &[&str]) -> String {
    let refs = targets.iter().map(|t| format!("{{ kind: Service, name: {t} }}")).collect::<Vec<_>>().join(", ");
    let mut s = String::from("policies:\n");
    for i in 0..20 {
        let action = if i < 19 { "DENY" } else { "ALLOW" };
        let _ = writeln!(s, "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{ name: bench-{i} }}\n    spec:\n      action: {action}\n      targetRefs: [{refs}]\n      rules:");
        for j in 0..10 {
            if i == 19 && j == 9 {
                let _ = writeln!(s, "        - {{}}");
            } else if i % 2 == 1 {
                let _ = writeln!(s, "        - to: [{{ operation: {{ paths: [/deny/{i}/{j}] }} }}]");
            } else {
                let _ = writeln!(
                    s,
                    "        - from: [{{ source: {{ principals: [cluster.local/ns/other/sa/p{i}-{j}] }} }}]\n          to: [{{ operation: {{ paths: [/deny/{i}/{j}] }} }}]"
                );
            }
        }
    }
    s
}
