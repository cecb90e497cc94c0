use super::*;
use crate::model::State;

/// The fixture, as `kubectl get … -o yaml` printed it, sorted by kind.
struct Fixture {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
}

fn fixture() -> Fixture {
    let text = include_str!("../../../../tests/fixtures/discovery.yaml");
    let list: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let items = list["items"].as_sequence().unwrap();
    let of = |kind: &'static str| items.iter().filter(move |i| i["kind"] == kind).cloned();
    Fixture {
        services: of("Service").map(|v| serde_yaml::from_value(v).unwrap()).collect(),
        slices: of("EndpointSlice").map(|v| serde_yaml::from_value(v).unwrap()).collect(),
        namespaces: of("Namespace").map(|v| serde_yaml::from_value(v).unwrap()).collect(),
        pods: of("Pod").map(|v| serde_yaml::from_value(v).unwrap()).collect(),
    }
}

fn run(f: &Fixture, node: &str) -> Translation {
    run_with(f, node, &mut Memo::default())
}

fn run_with(f: &Fixture, node: &str, memo: &mut Memo) -> Translation {
    let (services, slices, namespaces, pods) = (refs(&f.services), refs(&f.slices), refs(&f.namespaces), refs(&f.pods));
    let objs = Objects { services: &services, slices: &slices, namespaces: &namespaces, pods: &pods };
    // Stands in for the /proc scan: a pid made from the pod's IP.
    let mut pid = |p: &Pod| {
        let ip: std::net::Ipv4Addr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
        Some(i64::from(ip.octets()[3]) + 1000)
    };
    translate_with(objs, node, &mut pid, memo)
}

#[test]
fn a_pass_translates_only_the_services_whose_objects_changed() {
    let mut f = fixture();
    let rv = |m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.resource_version = Some("1".into());
    f.services.iter_mut().for_each(|o| rv(&mut o.metadata));
    f.slices.iter_mut().for_each(|o| rv(&mut o.metadata));
    f.pods.iter_mut().for_each(|o| rv(&mut o.metadata));
    let mut memo = Memo::default();
    let first = run_with(&f, "node-a", &mut memo);
    assert!(first.services_translated >= 3, "{}", first.services_translated);
    let again = run_with(&f, "node-a", &mut memo);
    assert_eq!(again.services_translated, 0, "nothing changed");
    assert_eq!(again.document, first.document);
    assert_eq!(again.skipped, first.skipped, "what was left out is still told");

    // One slice of shop/web changes: that Service only.
    let sl = f.slices.iter_mut().find(|s| s.metadata.name.as_deref().is_some_and(|n| n.starts_with("web"))).unwrap();
    sl.metadata.resource_version = Some("2".into());
    sl.endpoints.retain(|e| e.addresses.iter().all(|a| a != "10.244.2.7"));
    let changed = run_with(&f, "node-a", &mut memo);
    assert_eq!(changed.services_translated, 1);
    let web = svc(&changed, "shop/web").unwrap();
    assert!(web.endpoints.iter().all(|e| e.ip != "10.244.2.7"), "{web:?}");
    // A pod's weight annotation is an input too.
    let p = f.pods.iter_mut().find(|p| p.metadata.name.as_deref() == Some("web-1")).unwrap();
    p.metadata.annotations.as_mut().unwrap().insert(WEIGHT_ANNOTATION.into(), "9".into());
    p.metadata.resource_version = Some("2".into());
    let reweighted = run_with(&f, "node-a", &mut memo);
    assert_eq!(reweighted.services_translated, 1);
    assert_eq!(svc(&reweighted, "shop/web").unwrap().endpoints[0].weight, 9);
}

fn refs<T>(v: &[T]) -> Vec<&T> {
    v.iter().collect()
}

fn svc<'a>(t: &'a Translation, key: &str) -> Option<&'a ServiceDoc> {
    t.document.services.iter().find(|s| format!("{}/{}", s.namespace, s.name) == key).map(|s| s.as_ref())
}

#[test]
fn a_service_with_two_ports_gets_ready_endpoints_drains_terminating_ones_and_drops_not_ready_ones() {
    let t = run(&fixture(), "node-a");
    let web = svc(&t, "shop/web").expect("shop/web");
    assert_eq!(web.vip, "10.96.0.50");
    assert_eq!(web.mode, "proxy");
    assert_eq!(web.mtls, None, "a meshed namespace: mTLS across nodes");
    let ports: Vec<(i64, Option<i64>)> = web.ports.iter().map(|p| (p.port, p.target_port)).collect();
    // The named target port `http` resolves through the slice to 8080.
    assert_eq!(ports, [(80, Some(8080)), (9090, Some(9090))]);
    let eps: Vec<(&str, &str, i64)> =
        web.endpoints.iter().map(|e| (e.ip.as_str(), e.node.as_str(), e.weight)).collect();
    // web-1 ready (weight 3 from its annotation), web-2 not ready (left
    // out), web-3 terminating (kept, weight 0: drained).
    assert_eq!(eps, [("10.244.1.5", "node-a", 3), ("10.244.2.7", "node-b", 0)]);
}

#[test]
fn active_checks_are_off_unless_a_service_asks_and_a_bad_ask_is_reported() {
    let mut f = fixture();
    let check = |t: &Translation| {
        let h = svc(t, "shop/web").unwrap().health_check.clone().unwrap();
        (h.protocol, h.path)
    };
    assert_eq!(check(&run(&f, "node-a")), ("none".to_owned(), None), "readiness and breakers by default");
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    let annotations = web.metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert(HEALTH_CHECK_ANNOTATION.into(), "http:/healthz".into());
    assert_eq!(check(&run(&f, "node-a")), ("http".to_owned(), Some("/healthz".to_owned())));
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    web.metadata.annotations.as_mut().unwrap().insert(HEALTH_CHECK_ANNOTATION.into(), "tcp".into());
    assert_eq!(check(&run(&f, "node-a")), ("tcp".to_owned(), None));
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    web.metadata.annotations.as_mut().unwrap().insert(HEALTH_CHECK_ANNOTATION.into(), "udp".into());
    let t = run(&f, "node-a");
    assert_eq!(check(&t), ("none".to_owned(), None));
    assert!(t.skipped.iter().any(|s| s.contains("shop/web") && s.contains("\"udp\"")), "{:?}", t.skipped);
    State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_access_log_comes_from_the_service_annotation_and_a_bad_one_is_reported() {
    let mut f = fixture();
    let set = |f: &mut Fixture, v: &str| {
        let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
        web.metadata.annotations.get_or_insert_with(Default::default).insert(ACCESS_LOG_ANNOTATION.into(), v.into());
    };
    let of = |t: &Translation| {
        let state = State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
        let web = state.services.iter().find(|s| s.key().to_string() == "shop/web").unwrap().access_log;
        web.to_string()
    };
    assert_eq!(of(&run(&f, "node-a")), "on", "every record by default");
    set(&mut f, "5%");
    assert_eq!(of(&run(&f, "node-a")), "5%");
    set(&mut f, "off");
    assert_eq!(of(&run(&f, "node-a")), "off");
    set(&mut f, "most");
    let t = run(&f, "node-a");
    assert_eq!(of(&t), "on");
    assert!(
        t.skipped.iter().any(|s| s.contains("shop/web") && s.contains("mesh.io/access-log: \"most\"")),
        "{:?}",
        t.skipped
    );
}

#[test]
fn the_weight_comes_from_the_pod_annotation_and_a_bad_one_is_reported() {
    let mut f = fixture();
    let t = run(&f, "node-a");
    assert_eq!(svc(&t, "shop/web").unwrap().endpoints[0].weight, 3);
    let web1 = f.pods.iter_mut().find(|p| p.metadata.name.as_deref() == Some("web-1")).unwrap();
    web1.metadata.annotations.as_mut().unwrap().insert(WEIGHT_ANNOTATION.into(), "70000".into());
    let t = run(&f, "node-a");
    assert_eq!(svc(&t, "shop/web").unwrap().endpoints[0].weight, 1);
    assert!(t.skipped.iter().any(|s| s.contains("shop/web-1") && s.contains("70000")), "{:?}", t.skipped);
}

#[test]
fn a_namespace_without_the_inject_label_enrolls_no_pod_and_its_service_crosses_nodes_in_plain_tcp() {
    let t = run(&fixture(), "node-a");
    let names: Vec<String> = t.document.workloads.iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
    // shop's running pods on node-a; not plain/api-1, not the finished
    // batch pod, not the host-network one, not node-b's pods.
    assert_eq!(names, ["shop/client", "shop/web-1"]);
    assert!(t.skipped.iter().any(|s| s.contains("shop/node-agent") && s.contains("host's network")));
    let client = &t.document.workloads[0];
    assert_eq!(
        (client.service_account.as_str(), client.ip.as_str(), client.node.as_str(), client.pid),
        ("client", "10.244.1.4", "node-a", Some(1004))
    );
    let api = svc(&t, "plain/api").expect("plain/api is still balanced");
    assert_eq!(api.mtls.as_deref(), Some("disabled"));
    assert_eq!(api.mode, "kernel", "mesh.io/mode: kernel");
    // Only the TCP port.
    assert_eq!(api.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [8000]);
    let on_b = run(&fixture(), "node-b");
    assert!(on_b.document.workloads.iter().all(|w| w.node == "node-b"));
}

#[test]
fn a_headless_service_is_no_vip_and_the_api_server_is_left_alone() {
    let t = run(&fixture(), "node-a");
    assert!(svc(&t, "shop/db").is_none(), "clusterIP None");
    assert!(svc(&t, "default/kubernetes").is_none(), "endpoints off the pod network");
    assert!(t.skipped.iter().any(|s| s.contains("default/kubernetes")), "{:?}", t.skipped);
}

#[test]
fn the_nodes_come_from_the_pods_and_the_document_is_a_valid_state() {
    let t = run(&fixture(), "node-a");
    let nodes: Vec<(&str, &str)> = t.document.nodes.iter().map(|n| (n.name.as_str(), n.address.as_str())).collect();
    assert_eq!(nodes, [("node-a", "172.18.0.2"), ("node-b", "172.18.0.3")]);
    let state = State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.services.len(), 2);
}

#[test]
fn the_per_request_policy_comes_from_service_annotations_and_a_bad_one_is_left_out() {
    let mut f = fixture();
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    let a = web.metadata.annotations.get_or_insert_with(Default::default);
    for (k, v) in [
        ("mesh.io/timeout", "2s"),
        ("mesh.io/retry-on", "5xx, unavailable"),
        ("mesh.io/retry-attempts", "3"),
        ("mesh.io/rate-limit", "100/s"),
        ("mesh.io/rate-limit-burst", "20"),
    ] {
        a.insert(k.into(), v.into());
    }
    let t = run(&f, "node-a");
    let http = svc(&t, "shop/web").unwrap().http.clone().expect("a policy");
    assert_eq!(http.timeout.as_deref(), Some("2s"));
    let r = http.retries.unwrap();
    assert_eq!((r.retry_on.unwrap(), r.attempts), (vec!["5xx".to_owned(), "unavailable".to_owned()], Some(3)));
    let rl = http.rate_limit.unwrap();
    assert_eq!((rl.requests_per_second, rl.burst, rl.per_identity), (100.0, Some(20), false));
    let state = State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
    let web = state.services.iter().find(|s| s.name.as_str() == "web").unwrap();
    assert_eq!(web.http.timeout, Some(std::time::Duration::from_secs(2)));

    // One bad value: the whole policy of that Service is left out, the
    // reason reported, and the state stays valid.
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    web.metadata.annotations.as_mut().unwrap().insert("mesh.io/retry-on".into(), "sometimes".into());
    let t = run(&f, "node-a");
    assert!(svc(&t, "shop/web").unwrap().http.is_none());
    assert!(t.skipped.iter().any(|s| s.contains("shop/web") && s.contains("sometimes")), "{:?}", t.skipped);
    State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn app_protocol_comes_from_the_port_or_its_name() {
    assert_eq!(app_protocol(Some("http"), Some("web")), Some("http"));
    assert_eq!(app_protocol(Some("kubernetes.io/h2c"), None), Some("http2"));
    assert_eq!(app_protocol(Some("http2"), None), Some("http2"));
    assert_eq!(app_protocol(Some("grpc"), Some("http-x")), Some("grpc"), "appProtocol wins over the name");
    assert_eq!(app_protocol(Some("kubernetes.io/ws"), Some("http-x")), None, "an unknown appProtocol is tcp");
    assert_eq!(app_protocol(None, Some("http-web")), Some("http"));
    assert_eq!(app_protocol(None, Some("http2-api")), Some("http2"));
    assert_eq!(app_protocol(None, Some("grpc")), Some("grpc"));
    assert_eq!(app_protocol(None, Some("https-web")), None, "TLS from the client is opaque");
    assert_eq!(app_protocol(None, Some("web")), None);
    assert_eq!(app_protocol(None, None), None);
}

/// The IPv6 address a test gives the holder of IPv4 address `v4`.
fn six(v4: &str) -> String {
    let o: Vec<&str> = v4.split('.').collect();
    format!("fd00:{}:{}:{}::{}", o[0], o[1], o[2], o[3])
}

/// The fixture made dual-stack: every pod and node with an IPv6 address
/// beside its IPv4 one (`podIPs`, `hostIPs`), shop/web with two
/// `clusterIPs` and an IPv6 slice beside its IPv4 one.
fn dual_stack(f: &mut Fixture) {
    use k8s_openapi::api::core::v1::{HostIP, PodIP};
    for p in &mut f.pods {
        let Some(s) = p.status.as_mut() else { continue };
        if let Some(ip) = s.pod_ip.clone() {
            s.pod_ips = Some(vec![PodIP { ip: ip.clone() }, PodIP { ip: six(&ip) }]);
        }
        if let Some(ip) = s.host_ip.clone() {
            s.host_ips = Some(vec![HostIP { ip: ip.clone() }, HostIP { ip: six(&ip) }]);
        }
    }
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    let spec = web.spec.as_mut().unwrap();
    spec.cluster_ips = Some(vec!["10.96.0.50".into(), "fd00:96::50".into()]);
    spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let mut v6 =
        f.slices.iter().find(|s| s.metadata.name.as_deref().is_some_and(|n| n.starts_with("web"))).unwrap().clone();
    v6.metadata.name = Some("web-v6".into());
    v6.address_type = "IPv6".into();
    for e in &mut v6.endpoints {
        e.addresses = e.addresses.iter().map(|a| six(a)).collect();
    }
    f.slices.push(v6);
}

#[test]
fn dual_stack_services_slices_and_pods_translate_to_both_families() {
    let mut f = fixture();
    dual_stack(&mut f);
    let t = run(&f, "node-a");
    let web = svc(&t, "shop/web").unwrap();
    assert_eq!((web.vip.as_str(), web.vips.clone()), ("", vec!["10.96.0.50".to_owned(), "fd00:96::50".to_owned()]));
    let eps: Vec<(&str, i64)> = web.endpoints.iter().map(|e| (e.ip.as_str(), e.weight)).collect();
    // Each family's slice gives its endpoints, with the same readiness
    // and weights.
    assert_eq!(
        eps,
        [("10.244.1.5", 3), ("10.244.2.7", 0), ("fd00:10:244:1::5", 3), ("fd00:10:244:2::7", 0)],
        "{eps:?}"
    );
    let n = t.document.nodes.iter().find(|n| n.name == "node-a").unwrap();
    assert_eq!(n.addresses.len(), 2, "{n:?}");
    let w = t.document.workloads.first().unwrap();
    assert_eq!(w.ips.len(), 2, "{w:?}");
    let state = State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.services.iter().find(|s| s.name.as_str() == "web").unwrap().vips.len(), 2);

    // A Service of one family takes only that family's slice; a pod's
    // address of a family its node lacks is not meshed, and said so.
    let web = f.services.iter_mut().find(|s| s.metadata.name.as_deref() == Some("web")).unwrap();
    web.spec.as_mut().unwrap().cluster_ips = Some(vec!["fd00:96::50".into()]);
    web.spec.as_mut().unwrap().cluster_ip = Some("fd00:96::50".into());
    for p in &mut f.pods {
        if let Some(s) = p.status.as_mut() {
            s.host_ips = None;
        }
    }
    let t = run(&f, "node-a");
    let web = svc(&t, "shop/web").unwrap();
    assert_eq!(web.vip, "fd00:96::50");
    assert!(web.endpoints.iter().all(|e| e.ip.starts_with("fd00:")), "{:?}", web.endpoints);
    assert!(t.document.workloads.iter().all(|w| w.ips.is_empty() && !w.ip.contains(':')), "{:?}", t.document.workloads);
    assert!(
        t.skipped.iter().any(|s| s.contains("its IPv6 address") && s.contains("has no IPv6 address")),
        "{:?}",
        t.skipped
    );
    State::from_document(&t.document).unwrap_or_else(|e| panic!("{e}"));
}
