use super::*;
use crate::model::{parse_document, AccessLog};

#[path = "tests_families.rs"]
mod families;

const GOOD: &str = r#"
nodes:
  - { name: node-a, address: 172.18.0.2 }
  - { name: node-b, address: 172.18.0.3 }
workloads:
  - { name: client, namespace: default, serviceAccount: client, node: node-a, ip: 10.244.1.2, netns: /var/run/netns/c }
  - { name: other, node: node-b, ip: 10.244.2.2, pid: 42 }
services:
  - name: web
    vip: 10.96.0.10
    ports: [ { port: 80, targetPort: 8080 }, { port: 443 } ]
    endpoints:
      - { ip: 10.244.1.3, node: node-a, weight: 3 }
      - { ip: 10.244.2.4, node: node-b }
"#;

fn good() -> Document {
    parse_document(GOOD).unwrap()
}

/// Applies `edit` to the good document and returns the error messages.
fn errors(edit: impl FnOnce(&mut Document)) -> Vec<String> {
    errors_of(good(), edit)
}

/// Applies `edit` to `d` and returns the error messages.
fn errors_of(mut d: Document, edit: impl FnOnce(&mut Document)) -> Vec<String> {
    edit(&mut d);
    match State::from_document(&d) {
        Ok(_) => panic!("document should be rejected"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_error(edit: impl FnOnce(&mut Document), expected: &str) {
    let errs = errors(edit);
    assert!(errs.iter().any(|e| e == expected), "expected {expected:?} in {errs:#?}");
}

#[test]
fn good_document_is_accepted_with_defaults() {
    let s = State::from_document(&good()).unwrap();
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.workloads[1].namespace.as_str(), "default");
    assert_eq!(s.workloads[1].netns, NetnsRef::Pid(42));
    let web = &s.services[0];
    assert_eq!(web.mode, Mode::Proxy);
    assert_eq!(web.ports[0].target_port, Port(8080));
    assert_eq!(web.ports[1].target_port, Port(443), "targetPort defaults to port");
    assert_eq!(web.endpoints[1].weight, Weight(1), "weight defaults to 1");
}

#[test]
fn node_rules() {
    assert_error(|d| d.nodes[0].address = "x".into(), r#"nodes[0].address: "x" is not an IP address (IPv4 or IPv6)"#);
    assert_error(|d| d.nodes[1].name = "node-a".into(), r#"nodes[1].name: node "node-a" is listed twice"#);
    let e = errors(|d| d.nodes[0].name = "Node_A".into());
    assert!(e[0].starts_with("nodes[0].name: \"Node_A\" is not a valid node name"), "{e:?}");
}

#[test]
fn workload_rules() {
    assert_error(
        |d| d.workloads[0].ip = "10.0.0.300".into(),
        r#"workloads[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)"#,
    );
    assert_error(
        |d| d.workloads[1].ip = "10.244.1.2".into(),
        "workloads[1].ip: 10.244.1.2 is already the address of workloads[0]",
    );
    assert_error(
        |d| d.workloads[0].node = "node-z".into(),
        r#"workloads[0].node: node "node-z" is not in `nodes`; add it there or fix the name"#,
    );
    assert_error(
        |d| d.workloads[0].netns = Some("relative".into()),
        r#"workloads[0].netns: "relative" is not an absolute path"#,
    );
    assert_error(|d| d.workloads[1].pid = Some(0), "workloads[1].pid: 0 is not a process id");
    assert_error(
        |d| d.workloads[1].pid = None,
        "workloads[1]: give `netns` (a path) or `pid` to find the pod's network namespace",
    );
    assert_error(|d| d.workloads[0].pid = Some(7), "workloads[0]: give either `netns` or `pid`, not both");
    assert!(errors(|d| d.workloads[0].name = "-x".into())[0].starts_with("workloads[0].name: "));
    assert!(errors(|d| d.workloads[0].namespace = "A".into())[0].starts_with("workloads[0].namespace: "));
    assert!(errors(|d| d.workloads[0].service_account = "".into())[0].starts_with("workloads[0].serviceAccount: "));
}

#[test]
fn app_protocol_rules() {
    assert_error(
        |d| d.service_mut(0).ports[0].app_protocol = Some("quic".into()),
        r#"services[0].ports[0].appProtocol: "quic" is not an application protocol: use "tcp", "http", "http2", "grpc" or "auto""#,
    );
    assert_error(
        |d| {
            d.service_mut(0).mode = "kernel".into();
            d.service_mut(0).ports[1].app_protocol = Some("grpc".into());
        },
        r#"services[0].ports[1].appProtocol: "grpc" needs services[0].mode: proxy, not kernel: the kernel balances connections and cannot see requests"#,
    );
    let mut d = good();
    d.service_mut(0).mode = "kernel".into();
    d.service_mut(0).ports[0].app_protocol = Some("tcp".into());
    assert!(State::from_document(&d).is_ok(), "kernel mode with tcp is fine");
    d.service_mut(0).mode = "proxy".into();
    for (name, want) in [
        ("http", AppProtocol::Http),
        ("http2", AppProtocol::Http2),
        ("grpc", AppProtocol::Grpc),
        ("auto", AppProtocol::Auto),
    ] {
        d.service_mut(0).ports[0].app_protocol = Some(name.into());
        assert_eq!(State::from_document(&d).unwrap().services[0].ports[0].app_protocol, want);
    }
    assert_eq!(State::from_document(&good()).unwrap().services[0].ports[0].app_protocol, AppProtocol::Tcp, "default");
}

#[test]
fn service_rules() {
    assert_error(
        |d| d.service_mut(0).vip = "10.96.0".into(),
        r#"services[0].vip: "10.96.0" is not an IP address (IPv4 or IPv6)"#,
    );
    assert_error(
        |d| d.service_mut(0).mode = "fast".into(),
        r#"services[0].mode: "fast" is not a mode: use "proxy" or "kernel""#,
    );
    assert_error(|d| d.service_mut(0).ports.clear(), "services[0].ports: a service needs at least one port");
    assert_error(
        |d| d.service_mut(0).ports[0].port = 70000,
        "services[0].ports[0].port: 70000 is not a port: use 1 to 65535",
    );
    assert_error(
        |d| d.service_mut(0).ports[0].target_port = Some(0),
        "services[0].ports[0].targetPort: 0 is not a port: use 1 to 65535",
    );
    assert_error(|d| d.service_mut(0).ports[1].port = 80, "services[0].ports[1].port: port 80 is listed twice");
    assert_error(
        |d| d.service_mut(0).ports[0].protocol = "UDP".into(),
        r#"services[0].ports[0].protocol: "UDP" is not supported: use "TCP""#,
    );
    assert!(errors(|d| d.service_mut(0).name = "Web".into())[0].starts_with("services[0].name: "));
    assert!(errors(|d| d.service_mut(0).namespace = "".into())[0].starts_with("services[0].namespace: "));
    let dup = |d: &mut Document| {
        let mut s = d.service_mut(0).clone();
        s.vip = "10.96.0.11".into();
        d.services.push(Arc::new(s));
    };
    assert_error(dup, "services[1].name: service default/web is already services[0]");
    let same_address = |d: &mut Document| {
        let mut s = d.service_mut(0).clone();
        s.name = "web2".into();
        d.services.push(Arc::new(s));
    };
    assert_error(same_address, "services[1].ports[0].port: 10.96.0.10:80 is already served by services[0]");
}

#[test]
fn endpoint_rules() {
    assert_error(
        |d| d.service_mut(0).endpoints[0].ip = "10.0.0.300".into(),
        r#"services[0].endpoints[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)"#,
    );
    assert_error(
        |d| d.service_mut(0).endpoints[1].ip = "10.244.1.3".into(),
        "services[0].endpoints[1].ip: endpoint 10.244.1.3 is listed twice",
    );
    assert_error(
        |d| d.service_mut(0).endpoints[0].node = "nowhere".into(),
        r#"services[0].endpoints[0].node: node "nowhere" is not in `nodes`; add it there or fix the name"#,
    );
    assert_error(
        |d| d.service_mut(0).endpoints[0].weight = 70000,
        "services[0].endpoints[0].weight: weight 70000 is above the maximum 65535",
    );
    assert_error(
        |d| d.service_mut(0).endpoints[0].weight = -1,
        "services[0].endpoints[0].weight: weight -1 is negative: use 0 (drain) to 65535",
    );
}

#[test]
fn failover_and_health_rules() {
    assert_error(
        |d| d.service_mut(0).endpoints[0].priority = 300,
        "services[0].endpoints[0].priority: priority 300 is not in 0..255 (0 is the most preferred)",
    );
    let hc = |f: fn(&mut HealthCheckDoc)| {
        move |d: &mut Document| {
            let mut h = HealthCheckDoc {
                protocol: "http".into(),
                path: Some("/healthz".into()),
                interval: None,
                timeout: None,
                rise: None,
                fall: None,
            };
            f(&mut h);
            d.service_mut(0).health_check = Some(h);
        }
    };
    assert_error(
        hc(|h| h.protocol = "udp".into()),
        r#"services[0].healthCheck.protocol: "udp" is not a check: use "tcp", "http" or "none""#,
    );
    assert_error(
        hc(|h| h.path = Some("healthz".into())),
        r#"services[0].healthCheck.path: "healthz" must start with '/'"#,
    );
    assert_error(
        hc(|h| h.protocol = "tcp".into()),
        "services[0].healthCheck.path: a tcp check has no path; use protocol: http",
    );
    assert_error(
        hc(|h| h.interval = Some("5".into())),
        r#"services[0].healthCheck.interval: "5" is not a duration: write e.g. 500ms, 5s or 1m"#,
    );
    assert_error(
        hc(|h| h.interval = Some("10ms".into())),
        "services[0].healthCheck.interval: 10ms is not between 100ms and 3600s",
    );
    assert_error(
        hc(|h| h.timeout = Some("6s".into())),
        "services[0].healthCheck.timeout: 6s is longer than the interval 5s",
    );
    assert_error(hc(|h| h.rise = Some(0)), "services[0].healthCheck.rise: 0 is not in 1..100");
    assert_error(hc(|h| h.fall = Some(101)), "services[0].healthCheck.fall: 101 is not in 1..100");
    assert_error(|d| d.service_mut(0).retries = Some(11), "services[0].retries: 11 retries are not in 0..10");
    assert_error(
        |d| d.service_mut(0).connect_timeout = Some("5ms".into()),
        "services[0].connectTimeout: 5ms is not between 10ms and 60s",
    );
    assert_error(
        |d| d.service_mut(0).retry_budget = Some("x".into()),
        r#"services[0].retryBudget: "x" is not a duration: write e.g. 500ms, 5s or 1m"#,
    );
    let s = State::from_document(&good()).unwrap();
    let web = &s.services[0];
    assert_eq!(
        web.health_check,
        Some(HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3
        }),
        "tcp check with the documented defaults"
    );
    assert!(web.fail_open);
    assert_eq!((web.retries, web.connect_timeout), (3, Duration::from_secs(1)));
    let mut d = good();
    d.service_mut(0).health_check = Some(HealthCheckDoc {
        protocol: "none".into(),
        path: None,
        interval: None,
        timeout: None,
        rise: None,
        fall: None,
    });
    assert_eq!(State::from_document(&d).unwrap().services[0].health_check, None);
}

#[test]
fn access_log_rules() {
    assert_error(
        |d| d.service_mut(0).access_log = Some("sometimes".into()),
        r#"services[0].accessLog: "sometimes": write on, off, or the share of successful requests and connections to log (such as 10%; failures are always logged)"#,
    );
    assert_eq!(State::from_document(&good()).unwrap().services[0].access_log, AccessLog::ON, "on by default");
    let mut d = good();
    d.service_mut(0).access_log = Some("2.5%".into());
    assert_eq!(State::from_document(&d).unwrap().services[0].access_log.to_string(), "2.5%");
}

#[test]
fn mtls_and_authorization_rules() {
    assert_error(
        |d| d.service_mut(0).mtls = Some("maybe".into()),
        r#"services[0].mtls: "maybe" is not an mTLS mode: use "required" or "disabled""#,
    );
    let auth = |ids: &[&str], ns: &[&str]| {
        let a = AuthorizationDoc {
            identities: ids.iter().map(|s| s.to_string()).collect(),
            namespaces: ns.iter().map(|s| s.to_string()).collect(),
        };
        move |d: &mut Document| d.service_mut(0).authorization = Some(a)
    };
    assert_error(
        auth(&["spiffe://cluster.local/ns/a/sa/b", "web"], &[]),
        r#"services[0].authorization.identities[1]: "web" is not a SPIFFE ID: it must start with spiffe://"#,
    );
    assert!(errors(auth(&[], &["Bad_NS"]))[0].starts_with("services[0].authorization.namespaces[0]: "));
    let s = State::from_document(&good()).unwrap();
    assert!(s.services[0].mtls, "mTLS is required by default");
    assert_eq!(s.services[0].authorization, None);
}

#[test]
fn policy_decisions() {
    let id = |s: &str| Identity::parse(s).unwrap();
    let td = "cluster.local";
    let (web, other_ns, foreign) = (
        id("spiffe://cluster.local/ns/default/sa/web"),
        id("spiffe://cluster.local/ns/shop/sa/cart"),
        id("spiffe://evil.example/ns/default/sa/web"),
    );
    assert!(Authorization::allows(None, td, &web), "default: same trust domain");
    assert!(!Authorization::allows(None, td, &foreign), "default: other trust domains are denied");
    let by_id = Authorization { identities: vec![web.clone()], namespaces: vec![] };
    assert!(Authorization::allows(Some(&by_id), td, &web));
    assert!(!Authorization::allows(Some(&by_id), td, &other_ns));
    let by_ns = Authorization { identities: vec![], namespaces: vec![Name::parse("shop").unwrap()] };
    assert!(Authorization::allows(Some(&by_ns), td, &other_ns));
    assert!(!Authorization::allows(Some(&by_ns), td, &web));
    let foreign_shop = id("spiffe://evil.example/ns/shop/sa/cart");
    assert!(!Authorization::allows(Some(&by_ns), td, &foreign_shop), "namespaces only count in our trust domain");
    let empty = Authorization { identities: vec![], namespaces: vec![] };
    assert!(!Authorization::allows(Some(&empty), td, &web), "an empty allow list denies all");
}

#[test]
fn a_vip_may_not_shadow_a_node_a_workload_or_an_endpoint() {
    assert_error(
            |d| d.service_mut(0).vip = "172.18.0.3".into(),
            "services[0].vip: 172.18.0.3 is the address of node node-b (nodes[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
    assert_error(
            |d| d.service_mut(0).vip = "10.244.2.2".into(),
            "services[0].vip: 10.244.2.2 is the address of workload default/other (workloads[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
    // Another service's endpoint: the rule looks across services.
    let shadow = |d: &mut Document| {
        let mut s = d.service_mut(0).clone();
        s.name = "api".into();
        s.vip = "10.96.0.20".into();
        s.endpoints.truncate(1);
        s.endpoints[0].ip = "10.244.9.9".into();
        d.services.push(Arc::new(s));
        d.service_mut(0).vip = "10.244.9.9".into();
    };
    assert_error(
            shadow,
            "services[0].vip: 10.244.9.9 is the address of an endpoint of api (services[1].endpoints[0]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
}

#[test]
fn more_workloads_than_one_node_holds_are_left_to_the_capacity_check() {
    // Cluster-wide counts are not limits: each node holds only its own
    // workloads in its map (see capacity.rs).
    let mut d = good();
    let w = d.workloads[1].clone();
    d.workloads = (0..5000u32)
        .map(|i| WorkloadDoc { ip: std::net::Ipv4Addr::from(0x0a01_0000 + i).to_string(), ..w.clone() })
        .collect();
    assert!(State::from_document(&d).is_ok());
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let e = errors(|d| {
        d.nodes[0].address = "bad".into();
        d.service_mut(0).endpoints[0].weight = 70000;
        d.service_mut(0).vip = "nope".into();
    });
    assert_eq!(e.len(), 3, "{e:#?}");
}

/// A write validated by what it changes decides as a validation of the
/// whole document does: the same state, the same errors, and an index
/// that is the new state's.
#[test]
fn a_change_checked_against_the_index_decides_as_a_whole_validation() {
    let base = || {
        let mut d = good();
        let mut api = (*d.services[0]).clone();
        api.name = "api".into();
        api.vip = "10.96.0.30".into();
        api.endpoints.truncate(1);
        api.endpoints[0].ip = "10.244.3.3".into();
        d.services.push(Arc::new(api));
        d
    };
    let prev_doc = base();
    let prev = State::from_document(&prev_doc).unwrap();
    let index = Index::of(&prev, 256);
    fn ep(ip: &str) -> EndpointDoc {
        EndpointDoc { ip: ip.into(), node: "node-a".into(), weight: 1, priority: 0 }
    }
    type Edit = Box<dyn Fn(&mut Document)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("a weight", Box::new(|d| d.service_mut(0).endpoints[0].weight = 9)),
        ("nothing", Box::new(|_| {})),
        ("a removal", Box::new(|d| drop(d.services.remove(0)))),
        (
            "a new service",
            Box::new(|d| {
                let mut s = (*d.services[1]).clone();
                s.name = "new".into();
                s.vip = "10.96.0.40".into();
                d.services.push(Arc::new(s));
            }),
        ),
        (
            "a service moved to a freed VIP",
            Box::new(|d| {
                let mut s = (*d.services.remove(1)).clone();
                s.name = "moved".into();
                d.services.insert(0, Arc::new(s));
            }),
        ),
        (
            "a duplicate name",
            Box::new(|d| {
                let mut s = (*d.services[1]).clone();
                s.vip = "10.96.0.41".into();
                d.services.push(Arc::new(s));
            }),
        ),
        (
            "a duplicate address",
            Box::new(|d| {
                let mut s = (*d.services[0]).clone();
                s.name = "copy".into();
                d.services.push(Arc::new(s));
            }),
        ),
        ("a VIP at another service's endpoint", Box::new(|d| d.service_mut(1).vip = "10.244.1.3".into())),
        ("an endpoint at an unchanged VIP", Box::new(|d| d.service_mut(1).endpoints.push(ep("10.96.0.10")))),
        ("an endpoint at its own VIP", Box::new(|d| d.service_mut(1).endpoints.push(ep("10.96.0.30")))),
        ("a bad field", Box::new(|d| d.service_mut(1).endpoints[0].ip = "10.0.0.300".into())),
        (
            "an unknown node",
            Box::new(|d| d.service_mut(1).endpoints.push(EndpointDoc { node: "x".into(), ..ep("10.244.7.7") })),
        ),
        ("services reversed", Box::new(|d| d.services.reverse())),
        ("a node removed (a whole validation)", Box::new(|d| drop(d.nodes.pop()))),
    ];
    for (what, edit) in edits {
        let mut doc = prev_doc.clone();
        edit(&mut doc);
        let whole = validate(None, &doc, 256);
        let by_change = validate(Some((&prev_doc, &prev, &index)), &doc, 256);
        match (whole, by_change) {
            (Ok(w), Ok(c)) => {
                assert_eq!(w.state, c.state, "{what}");
                assert_eq!(c.changes.whole, what.contains("whole"), "{what}");
                let mut after = index.clone();
                if c.changes.whole {
                    after = Index::of(&c.state, 256);
                } else {
                    after.apply(&c.index_change);
                }
                assert_eq!(after, Index::of(&w.state, 256), "{what}");
            }
            (Err(w), Err(c)) => {
                let (mut w, mut c) = (w.0, c.0);
                w.sort_by(|a, b| a.path.cmp(&b.path));
                c.sort_by(|a, b| a.path.cmp(&b.path));
                assert_eq!(w, c, "{what}");
            }
            (w, c) => panic!("{what}: whole {:?}, by change {:?}", w.err(), c.err()),
        }
    }
}

/// With lists of several chunks, kept chunks are passed over whole
/// and the new state shares them with the state before.
#[test]
fn a_change_in_one_chunk_shares_the_others() {
    let mut text = String::from("nodes: [{name: a, address: 172.18.0.2}]\nservices:\n");
    for i in 0..200 {
        text += &format!(
            " - {{name: s{i}, vip: 10.96.{}.{}, ports: [{{port: 80}}], endpoints: [{{ip: 10.0.0.1, node: a}}]}}\n",
            i / 200,
            i % 200 + 1
        );
    }
    let prev_doc = parse_document(&text).unwrap();
    let prev = State::from_document(&prev_doc).unwrap();
    let index = Index::of(&prev, 256);
    type Edit = Box<dyn Fn(&mut Document)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("a weight in chunk 2", Box::new(|d| d.service_mut(130).endpoints[0].weight = 4)),
        ("a removal in chunk 1", Box::new(|d| drop(d.services.remove(70)))),
        (
            "an append",
            Box::new(|d| {
                let mut s = (*d.services[0]).clone();
                s.name = "new".into();
                s.vip = "10.96.9.9".into();
                d.services.push(Arc::new(s));
            }),
        ),
        ("a duplicate name in chunk 3", Box::new(|d| d.service_mut(199).name = "s3".into())),
    ];
    for (what, edit) in edits {
        let mut doc = prev_doc.clone();
        edit(&mut doc);
        let whole = validate(None, &doc, 256);
        let c = validate(Some((&prev_doc, &prev, &index)), &doc, 256);
        match (whole, c) {
            (Ok(w), Ok(c)) => {
                assert_eq!(w.state, c.state, "{what}");
                assert!(
                    Arc::ptr_eq(&c.state.services.chunks()[0], &prev.services.chunks()[0]),
                    "{what}: chunk 0 shared"
                );
                let touched = c.changes.changed.len() + c.changes.removed.len();
                assert!(touched <= 2, "{what}: {touched} services checked or removed");
            }
            (Err(w), Err(c)) => assert_eq!(w, c, "{what}"),
            (w, c) => panic!("{what}: whole {:?}, by change {:?}", w.err(), c.err()),
        }
    }
}
