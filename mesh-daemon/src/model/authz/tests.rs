//! The evaluation, case by case, in Istio's order (DENY, then ALLOW, then
//! the default), and the refusal of bad policies with their field paths.

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::header::HeaderMap;

use super::*;
use crate::model::errors::Errors;

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey { namespace: Name::parse(ns).unwrap(), name: Name::parse(name).unwrap() }
}

/// `docs` (YAML documents separated by `---`) compiled, or the errors.
fn compiled(docs: &str) -> Result<Policies, Vec<String>> {
    let docs: Vec<Arc<PolicyDoc>> = docs
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| Arc::new(serde_yaml::from_str::<PolicyDoc>(d).unwrap_or_else(|e| panic!("{d}: {e}"))))
        .collect();
    let mut e = Errors::default();
    let p = compile(&mut e, &docs, &Default::default(), &[]);
    if e.0.is_empty() {
        Ok(p)
    } else {
        Err(e.0.iter().map(|f| format!("{}: {}", f.path, f.message)).collect())
    }
}

fn policies(docs: &str) -> Policies {
    compiled(docs).unwrap_or_else(|e| panic!("{e:?}"))
}

fn head(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n"
    )
}

/// A request: method, path and headers.
type Req<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

struct Case<'a> {
    principal: Option<&'a str>,
    ip: &'a str,
    /// None: a connection on a tcp port.
    req: Option<Req<'a>>,
    port: u16,
}

fn sa(name: &str) -> Option<String> {
    Some(format!("cluster.local/ns/shop/sa/{name}"))
}

/// "allow" or "deny", and the policy and rule that decided (`-` for none).
fn decided(p: &Policies, c: &Case<'_>) -> String {
    let svc = key("shop", "web");
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    let dest = Dest { service: &svc, namespace: "shop", labels: Some(&labels), port: c.port };
    let ns = c.principal.and_then(|p| p.split('/').nth(2));
    let caller = Caller { principal: c.principal, namespace: ns, ip: Some(c.ip.parse().unwrap()) };
    let mut headers = HeaderMap::new();
    let req = c.req.map(|(method, path, hs)| {
        for (k, v) in hs {
            headers.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        (method, path)
    });
    let r = req.map(|(method, path)| Request { method, path, host: "web.shop", headers: &headers });
    let v = decide(p, &dest, &caller, r.as_ref());
    let by = v.by.map_or("-".to_owned(), |(p, i)| format!("{}#{i}", p.label));
    format!("{} {by}", if v.allowed { "allow" } else { "deny" })
}

fn get<'a>(principal: &'a Option<String>, path: &'static str) -> Case<'a> {
    Case { principal: principal.as_deref(), ip: "10.244.1.5", req: Some(("GET", path, &[])), port: 8080 }
}

#[test]
fn no_policy_allows_and_an_allow_policy_makes_everything_else_denied() {
    let none = policies("");
    assert_eq!(decided(&none, &get(&sa("x"), "/")), "allow -");
    let p = policies(&format!(
        "{}spec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [/api/*]}}}}]\n  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/admin]}}}}]\n    to: [{{operation: {{methods: [POST], paths: [/admin]}}}}]\n",
        head("shop", "web-api")
    ));
    assert_eq!(decided(&p, &get(&sa("frontend"), "/api/users")), "allow shop/web-api#0");
    let post = |who: &Option<String>| {
        decided(
            &p,
            &Case { principal: who.as_deref(), ip: "10.244.1.5", req: Some(("POST", "/admin", &[])), port: 8080 },
        )
    };
    assert_eq!(post(&sa("frontend")), "deny -", "frontend may not POST /admin");
    assert_eq!(post(&sa("admin")), "allow shop/web-api#1");
    assert_eq!(decided(&p, &get(&sa("frontend"), "/other")), "deny -");
    assert_eq!(decided(&p, &get(&None, "/api/x")), "deny -", "a caller without an identity matches no principal");
    // The policy selects app=web only: another workload is not concerned.
    let svc = key("shop", "db");
    let other: BTreeMap<String, String> = [("app".to_owned(), "db".to_owned())].into();
    let dest = Dest { service: &svc, namespace: "shop", labels: Some(&other), port: 5432 };
    assert!(decide(&p, &dest, &Caller::default(), None).allowed);
}

#[test]
fn deny_beats_allow_and_not_principals_ip_blocks_and_when_work() {
    let p = policies(&format!(
        "{}spec:\n  rules: [{{}}]\n---\n{}spec:\n  action: DENY\n  rules:\n  - from: [{{source: {{notPrincipals: ['cluster.local/ns/shop/*']}}}}]\n  - from: [{{source: {{ipBlocks: [10.9.0.0/16]}}}}]\n  - when: [{{key: 'request.headers[x-debug]', values: ['1']}}]\n",
        head("shop", "allow-all"),
        head("shop", "deny-some")
    ));
    assert_eq!(decided(&p, &get(&sa("web"), "/")), "allow shop/allow-all#0");
    let foreign = Some("cluster.local/ns/other/sa/web".to_owned());
    assert_eq!(decided(&p, &get(&foreign, "/")), "deny shop/deny-some#0", "notPrincipals: another namespace");
    let c = Case {
        principal: sa("web").as_deref().map(|_| "cluster.local/ns/shop/sa/web"),
        ip: "10.9.3.4",
        req: Some(("GET", "/", &[])),
        port: 80,
    };
    assert_eq!(decided(&p, &c), "deny shop/deny-some#1", "ipBlocks");
    let c = Case {
        principal: Some("cluster.local/ns/shop/sa/web"),
        ip: "10.244.1.5",
        req: Some(("GET", "/", &[("x-debug", "1")])),
        port: 80,
    };
    assert_eq!(decided(&p, &c), "deny shop/deny-some#2", "when on a header");
    let c = Case {
        principal: Some("cluster.local/ns/shop/sa/web"),
        ip: "10.244.1.5",
        req: Some(("GET", "/", &[("x-debug", "0")])),
        port: 80,
    };
    assert_eq!(decided(&p, &c), "allow shop/allow-all#0");
}

#[test]
fn on_a_tcp_port_request_fields_never_allow_and_always_deny() {
    let allow = policies(&format!(
        "{}spec:\n  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n",
        head("shop", "l7-allow")
    ));
    let tcp = Case { principal: Some("cluster.local/ns/shop/sa/web"), ip: "10.244.1.5", req: None, port: 5432 };
    assert_eq!(decided(&allow, &tcp), "deny -", "an ALLOW rule about methods does not match a connection");
    let deny = policies(&format!(
        "{}spec:\n  action: DENY\n  rules: [{{to: [{{operation: {{methods: [POST], ports: ['5432']}}}}]}}]\n",
        head("shop", "l7-deny")
    ));
    assert_eq!(decided(&deny, &tcp), "deny shop/l7-deny#0", "a DENY rule about methods matches a connection");
    let other_port = Case { port: 6000, ..tcp };
    assert_eq!(decided(&deny, &other_port), "allow -", "but its ports still count");
}

#[test]
fn audit_and_dry_run_never_decide() {
    let p = policies(&format!(
        "{}spec:\n  action: AUDIT\n  rules: [{{to: [{{operation: {{paths: ['/audit*']}}}}]}}]\n---\n{}spec:\n  action: DENY\n  rules: [{{}}]\n",
        head("shop", "audit"),
        head("shop", "dry").replace("namespace: shop}", "namespace: shop, annotations: {istio.io/dry-run: 'true'}}")
    ));
    let svc = key("shop", "web");
    let dest = Dest { service: &svc, namespace: "shop", labels: None, port: 80 };
    let h = HeaderMap::new();
    let r = Request { method: "GET", path: "/audit/1", host: "web", headers: &h };
    let v = decide(&p, &dest, &Caller::default(), Some(&r));
    assert!(v.allowed, "AUDIT and a dry-run DENY do not deny");
    assert_eq!(v.audited.iter().map(|(p, i)| format!("{}#{i}", p.label)).collect::<Vec<_>>(), ["shop/audit#0"]);
    assert_eq!(v.dry_run.iter().map(|p| p.label.to_string()).collect::<Vec<_>>(), ["shop/dry"]);
}

#[test]
fn scopes_target_refs_namespaces_and_the_root_namespace() {
    let p = policies(&format!(
        "{}spec:\n  targetRefs: [{{kind: Service, name: web}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/t]}}}}]}}]\n---\n{}spec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/root]}}}}]}}]\n---\n{}spec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/other]}}}}]}}]\n",
        head("shop", "by-ref"),
        head("mesh-system", "everywhere"),
        head("other", "elsewhere")
    ));
    assert_eq!(decided(&p, &get(&sa("x"), "/t")), "deny shop/by-ref#0");
    assert_eq!(
        decided(&p, &get(&sa("x"), "/root")),
        "deny mesh-system/everywhere#0",
        "the root namespace applies everywhere"
    );
    assert_eq!(decided(&p, &get(&sa("x"), "/other")), "allow -", "another namespace's policy does not apply");
}

#[test]
fn bad_policies_are_refused_with_their_field_and_the_fix() {
    for (spec, want) in [
        ("spec: {rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]}", "policies[0].spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/a/sa/b\": write principals without spiffe://"),
        ("spec: {rules: [{from: [{source: {principals: [cluster.local/a/b]}}]}]}", "principals[0]: \"cluster.local/a/b\" is not a principal"),
        ("spec: {rules: [{to: [{operation: {paths: ['/a*b']}}]}]}", "policies[0].spec.rules[0].to[0].operation.paths[0]: \"/a*b\": a * may only begin or end a pattern"),
        ("spec: {rules: [{to: [{operation: {ports: ['http']}}]}]}", "operation.ports[0]: \"http\" is not a port"),
        ("spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "source.ipBlocks[0]: \"10.0.0.0/33\": the prefix length is not 0..32"),
        ("spec: {rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "policies[0].spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not implemented"),
        ("spec: {action: CUSTOM}", "policies[0].spec.action: CUSTOM (an external authorizer) is not implemented"),
        ("spec: {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}]}", "policies[0].spec: selector and targetRefs together"),
        ("spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}", "policies[0].spec.targetRefs[0]: gateway.networking.k8s.io/Gateway is not a Service"),
    ] {
        let e = match compiled(&format!("{}{spec}\n", head("shop", "p"))) {
            Ok(_) => panic!("{spec} was accepted"),
            Err(e) => e.join("\n"),
        };
        assert!(e.contains(want), "{spec}\nwant {want}\ngot {e}");
    }
    let unknown = serde_yaml::from_str::<PolicyDoc>(&format!("{}spec: {{rulez: []}}\n", head("shop", "p")));
    assert!(unknown.unwrap_err().to_string().contains("unknown field `rulez`"));
}

#[test]
fn a_policy_over_a_kernel_mode_service_is_refused_and_the_state_keeps_its_policies() {
    let doc = |policy: &str| {
        crate::model::parse_document(&format!(
            "nodes: [{{name: a, address: 172.18.0.2}}]\n\
             workloads: [{{name: db-0, namespace: shop, serviceAccount: db, node: a, ip: 10.244.1.7, netns: /x, labels: {{app: db}}}}]\n\
             services:\n\
             \x20- {{name: db, namespace: shop, vip: 10.96.0.30, mode: kernel, ports: [{{port: 5432}}], endpoints: [{{ip: 10.244.1.7, node: a}}]}}\n\
             \x20- {{name: web, namespace: shop, vip: 10.96.0.31, ports: [{{port: 80, appProtocol: http}}], endpoints: [{{ip: 10.244.1.8, node: a}}]}}\n\
             policies:\n  - {policy}\n"
        ))
        .unwrap()
    };
    let head =
        "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: p, namespace: shop}, spec: ";
    for spec in ["{selector: {matchLabels: {app: db}}}", "{targetRefs: [{kind: Service, name: db}]}", "{}"] {
        let e =
            crate::model::State::from_document(&doc(&format!("{head}{spec}}}"))).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("policies[0].spec: applies to service shop/db, which is in kernel mode"), "{spec}: {e}");
    }
    let ok =
        crate::model::State::from_document(&doc(&format!("{head}{{targetRefs: [{{kind: Service, name: web}}]}}}}")));
    assert_eq!(ok.unwrap().policies.list.len(), 1, "a policy over the proxy-mode service only");
}

#[test]
fn policies_are_looked_at_in_list_order_whatever_their_scope() {
    // A namespace-wide DENY, then one for the service by targetRefs, then
    // one by selector: the first that matches names the decision.
    let deny = |name: &str, scope: &str| {
        format!(
            "{}spec:\n  action: DENY\n{scope}  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]\n",
            head("shop", name)
        )
    };
    let p = policies(&format!(
        "{}---\n{}---\n{}",
        deny("by-ns", ""),
        deny("by-ref", "  targetRefs: [{kind: Service, name: web}]\n"),
        deny("by-label", "  selector: {matchLabels: {app: web}}\n")
    ));
    let del = Case { principal: None, ip: "10.244.1.9", req: Some(("DELETE", "/", &[])), port: 8080 };
    assert_eq!(decided(&p, &del), "deny shop/by-ns#0");
    let p = policies(&format!(
        "{}---\n{}---\n{}",
        deny("by-ref", "  targetRefs: [{kind: Service, name: web}]\n"),
        deny("by-label", "  selector: {matchLabels: {app: web}}\n"),
        deny("by-ns", "")
    ));
    assert_eq!(decided(&p, &del), "deny shop/by-ref#0");
    let p = policies(&format!(
        "{}---\n{}",
        deny("other-ref", "  targetRefs: [{kind: Service, name: other}]\n"),
        deny("by-label", "  selector: {matchLabels: {app: web}}\n")
    ));
    assert_eq!(decided(&p, &del), "deny shop/by-label#0", "a service no targetRefs names still gets the rest");
    let p = policies(&deny("other-ref", "  targetRefs: [{kind: Service, name: other}]\n"));
    assert_eq!(decided(&p, &del), "allow -", "another service's policy does not apply");
}

#[test]
fn the_principal_gate_skips_policies_that_cannot_match_the_caller_and_keeps_the_answers() {
    let p = policies(&format!(
        "{}spec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [{S}/a]}}}}]\n    to: [{{operation: {{paths: [/x]}}}}]\n  - from: [{{source: {{principals: [{S}/b], namespaces: [shop]}}}}]\n---\n{}spec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: ['*/sa/c']}}}}]\n",
        head("shop", "gated"),
        head("shop", "open")
    ));
    assert!(p.list[0].principal_gate.as_ref().is_some_and(|g| g.len() == 2), "exact principals only: gated");
    assert!(p.list[1].principal_gate.is_none(), "a pattern: not gated");
    let who = |sa: &str| Some(format!("{S}/{sa}"));
    assert_eq!(decided(&p, &get(&who("a"), "/x")), "deny shop/gated#0");
    assert_eq!(decided(&p, &get(&who("a"), "/y")), "allow -");
    assert_eq!(decided(&p, &get(&who("b"), "/y")), "deny shop/gated#1");
    assert_eq!(decided(&p, &get(&who("c"), "/x")), "deny shop/open#0");
    assert_eq!(decided(&p, &get(&who("d"), "/x")), "allow -", "no rule names d");
    assert_eq!(decided(&p, &get(&None, "/x")), "allow -");
}

#[test]
fn the_path_gate_skips_policies_whose_exact_paths_the_request_is_none_of_and_keeps_the_answers() {
    let p = policies(&format!(
        "{}spec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: [/admin], methods: [POST]}}}}]\n  - to: [{{operation: {{paths: [/debug]}}}}, {{operation: {{paths: [/metrics]}}}}]\n---\n{}spec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['/internal/*']}}}}]\n---\n{}spec:\n  rules:\n  - to: [{{operation: {{paths: [/a, /b]}}}}]\n",
        head("shop", "gated"),
        head("shop", "open"),
        head("shop", "allowed")
    ));
    assert!(p.list[0].path_gate.as_ref().is_some_and(|g| g.len() == 3), "exact paths only: gated");
    assert!(p.list[1].path_gate.is_none(), "a pattern: not gated");
    assert!(p.list[2].path_gate.as_ref().is_some_and(|g| g.len() == 2));
    let req = |method, path| Case { principal: None, ip: "10.244.1.9", req: Some((method, path, &[])), port: 8080 };
    assert_eq!(decided(&p, &req("POST", "/admin")), "deny shop/gated#0");
    assert_eq!(
        decided(&p, &req("GET", "/admin")),
        "deny -",
        "the path passes the gate, the method not: no ALLOW matched"
    );
    assert_eq!(decided(&p, &req("GET", "/metrics")), "deny shop/gated#1");
    assert_eq!(decided(&p, &req("GET", "/internal/x")), "deny shop/open#0");
    assert_eq!(decided(&p, &req("GET", "/a")), "allow shop/allowed#0");
    assert_eq!(decided(&p, &req("GET", "/c")), "deny -", "an ALLOW policy applies and none matched");
    // On a connection, a DENY rule's request parts match (Istio's rule for
    // TCP): the gate must not skip it.
    let tcp = Case { principal: None, ip: "10.244.1.9", req: None, port: 8080 };
    assert_eq!(decided(&p, &tcp), "deny shop/gated#0");
}

#[test]
fn a_rules_own_path_gate_skips_it_where_the_policy_has_none_and_keeps_the_answers() {
    let p = policies(&format!(
        "{}spec:\n  rules:\n  - to: [{{operation: {{paths: [/a]}}}}, {{operation: {{paths: [/b], methods: [POST]}}}}]\n  - to: [{{operation: {{paths: ['/p/*']}}}}]\n  - from: [{{source: {{principals: ['{S}/x']}}}}]\n    to: [{{operation: {{paths: [/c], notPaths: [/c]}}}}]\n  - {{}}\n",
        head("shop", "mixed")
    ));
    let gates: Vec<_> = p.list[0].rule_path_gates.iter().map(|g| g.as_ref().map(|g| g.len())).collect();
    assert!(p.list[0].path_gate.is_none(), "a prefix and `{{}}`: no gate for the policy");
    assert_eq!(gates, [Some(2), None, Some(1), None], "the rules of exact paths only have gates of their own");
    let x = Some(format!("{S}/x"));
    let req =
        |method, path| Case { principal: x.as_deref(), ip: "10.244.1.9", req: Some((method, path, &[])), port: 8080 };
    assert_eq!(decided(&p, &req("GET", "/a")), "allow shop/mixed#0");
    assert_eq!(decided(&p, &req("POST", "/b")), "allow shop/mixed#0");
    assert_eq!(decided(&p, &req("GET", "/b")), "allow shop/mixed#3", "through the gate, the method not: the next rule");
    assert_eq!(decided(&p, &req("GET", "/p/q")), "allow shop/mixed#1");
    assert_eq!(decided(&p, &req("GET", "/c")), "allow shop/mixed#3", "notPaths still checked past the gate");
    assert_eq!(decided(&p, &req("GET", "/z")), "allow shop/mixed#3", "gated rules skipped, `{{}}` decides");
    let tcp = Case { principal: x.as_deref(), ip: "10.244.1.9", req: None, port: 8080 };
    assert_eq!(
        decided(&p, &tcp),
        "allow shop/mixed#3",
        "on a connection no gate is used, an ALLOW rule's paths never match"
    );
}

#[test]
fn gated_deny_and_audit_policies_are_found_by_principal_and_path_in_list_order() {
    let doc = |name: &str, action: &str, scope: &str, rule: &str| {
        format!("{}spec:\n  action: {action}\n{scope}  rules: [{rule}]\n", head("shop", name))
    };
    let web = "  targetRefs: [{kind: Service, name: web}]\n";
    let p = policies(
        &[
            doc("a", "DENY", "", "{to: [{operation: {paths: [/w]}}]}"),
            doc(
                "b",
                "DENY",
                web,
                &format!("{{from: [{{source: {{principals: ['{S}/p']}}}}], to: [{{operation: {{paths: [/b]}}}}]}}"),
            ),
            doc("c", "DENY", web, "{to: [{operation: {methods: [DELETE]}}]}"),
            doc(
                "d",
                "DENY",
                "  targetRefs: [{kind: Service, name: other}]\n",
                &format!("{{from: [{{source: {{principals: ['{S}/p']}}}}]}}"),
            ),
            doc(
                "e",
                "AUDIT",
                web,
                &format!("{{from: [{{source: {{principals: ['{S}/p']}}}}], to: [{{operation: {{paths: [/y]}}}}]}}"),
            ),
            doc(
                "f",
                "DENY",
                web,
                &format!("{{from: [{{source: {{principals: ['{S}/q']}}}}], to: [{{operation: {{paths: [/x]}}}}]}}"),
            ),
        ]
        .join("---\n"),
    );
    let (gated, open): (Vec<_>, Vec<_>) =
        p.list.iter().partition(|p| p.principal_gate.is_some() || p.path_gate.is_some());
    assert_eq!((gated.len(), open.len()), (5, 1), "all but c are found through the gates");
    let (pp, q) = (Some(format!("{S}/p")), Some(format!("{S}/q")));
    let delete = Case { principal: pp.as_deref(), ip: "10.244.1.9", req: Some(("DELETE", "/w", &[])), port: 8080 };
    assert_eq!(decided(&p, &delete), "deny shop/a#0", "a path-gated policy before an open one");
    let delete_z = Case { req: Some(("DELETE", "/z", &[])), ..delete };
    assert_eq!(decided(&p, &delete_z), "deny shop/c#0");
    assert_eq!(decided(&p, &get(&pp, "/b")), "deny shop/b#0", "a principal-gated one with its path");
    assert_eq!(decided(&p, &get(&pp, "/z")), "allow -", "d names another service: it does not apply");
    assert_eq!(decided(&p, &get(&q, "/x")), "deny shop/f#0", "both gates passed");
    assert_eq!(decided(&p, &get(&q, "/b")), "allow -");
    assert_eq!(decided(&p, &get(&None, "/x")), "allow -", "no principal: no principal-gated policy matches");
    let svc = key("shop", "web");
    let dest = Dest { service: &svc, namespace: "shop", labels: None, port: 8080 };
    let h = HeaderMap::new();
    let caller = Caller { principal: pp.as_deref(), namespace: Some("shop"), ip: None };
    let r = Request { method: "GET", path: "/y", host: "web", headers: &h };
    let v = decide(&p, &dest, &caller, Some(&r));
    assert!(v.allowed);
    assert_eq!(v.audited.iter().map(|(p, i)| format!("{}#{i}", p.label)).collect::<Vec<_>>(), ["shop/e#0"]);
    // A connection has no path: every path-gated DENY policy is looked
    // at, and its request parts match (Istio's rule for TCP).
    let tcp = Case { principal: None, ip: "10.244.1.9", req: None, port: 8080 };
    assert_eq!(decided(&p, &tcp), "deny shop/a#0");
    let p = policies(&doc(
        "f",
        "DENY",
        web,
        &format!("{{from: [{{source: {{principals: ['{S}/q']}}}}], to: [{{operation: {{paths: [/x]}}}}]}}"),
    ));
    let tcp_q = Case { principal: q.as_deref(), ip: "10.244.1.9", req: None, port: 8080 };
    assert_eq!(decided(&p, &tcp_q), "deny shop/f#0", "its principal found, its paths unknown on a connection");
    assert_eq!(decided(&p, &tcp), "allow -");
}

#[test]
fn a_request_walks_its_services_gated_policies_and_the_unscoped_ones_never_another_services() {
    let doc = |name: &str, scope: &str| {
        format!(
            "{}spec:\n  action: DENY\n{scope}  rules: [{{from: [{{source: {{principals: ['{S}/p']}}}}]}}]\n",
            head("shop", name)
        )
    };
    let p = policies(
        &[
            doc("other", "  targetRefs: [{kind: Service, name: other}]\n"),
            doc("ns", ""),
            doc("web", "  targetRefs: [{kind: Service, name: web}]\n"),
            doc("label", "  selector: {matchLabels: {app: nope}}\n"),
        ]
        .join("---\n"),
    );
    let walked = |service: &ServiceKey, principal: &str| {
        let dest = Dest { service, namespace: "shop", labels: None, port: 8080 };
        let hashes = super::Hashes { principal: Some(gate_hash(principal)), path: Some(gate_hash("/")) };
        let (allowing, others) = p.applying(&dest, hashes);
        assert_eq!(allowing.count(), 0);
        others.map(|p| p.label.to_string()).collect::<Vec<_>>()
    };
    let p_sa = format!("{S}/p");
    assert_eq!(
        walked(&key("shop", "web"), &p_sa),
        ["shop/ns", "shop/web"],
        "not other's, not a selector's that does not apply"
    );
    assert_eq!(walked(&key("shop", "other"), &p_sa), ["shop/other", "shop/ns"]);
    assert_eq!(walked(&key("shop", "none"), &p_sa), ["shop/ns"], "a service no policy names: the unscoped ones");
    assert_eq!(walked(&key("shop", "web"), &format!("{S}/q")), Vec::<String>::new(), "no gate lets q in");
}

/// The principals of namespace shop's service accounts.
const S: &str = "cluster.local/ns/shop/sa";
