//! Both address families: dual-stack and IPv6-only documents, and every
//! family mistake refused at its field (helpers in the parent module).

use super::*;

/// The good document with both families: nodes, workloads and `web`
/// dual-stack, and `v6` an IPv6-only service.
fn dual() -> Document {
    let mut d = good();
    d.nodes[0].addresses = vec!["172.18.0.2".into(), "fd00:18::2".into()];
    d.nodes[1].addresses = vec!["172.18.0.3".into(), "fd00:18::3".into()];
    d.workloads[0].ips = vec!["10.244.1.2".into(), "fd00:244:1::2".into()];
    let web = d.service_mut(0);
    web.vip = String::new();
    web.vips = vec!["10.96.0.10".into(), "fd00:96::10".into()];
    let mut ep = web.endpoints[0].clone();
    ep.ip = "fd00:244:1::3".into();
    web.endpoints.push(ep);
    let mut v6 = web.clone();
    v6.name = "v6".into();
    v6.vips = vec!["fd00:96::20".into()];
    v6.endpoints = vec![EndpointDoc { ip: "fd00:244:2::4".into(), ..v6.endpoints[1].clone() }];
    d.services.push(Arc::new(v6));
    d
}

fn dual_errors(edit: impl FnOnce(&mut Document)) -> Vec<String> {
    errors_of(dual(), edit)
}

#[test]
fn dual_stack_and_ipv6_only_documents_are_accepted_with_a_frontend_per_family() {
    let s = State::from_document(&dual()).unwrap();
    assert_eq!(s.nodes[0].addresses.to_string(), "172.18.0.2, fd00:18::2");
    assert_eq!(s.workloads[0].ips.to_string(), "10.244.1.2, fd00:244:1::2");
    assert_eq!(s.workloads[1].ips.to_string(), "10.244.2.2", "`ip` is the one-address form");
    let web = &s.services[0];
    assert_eq!(web.vips.to_string(), "10.96.0.10, fd00:96::10");
    let v6: Vec<String> = web.endpoints_of(Family::V6).map(|(_, e)| e.ip.to_string()).collect();
    assert_eq!(v6, ["fd00:244:1::3"]);
    assert_eq!(s.services[1].vips.to_string(), "fd00:96::20");
    let ids = crate::model::ServiceIds::default().assign(&s.frontend_keys());
    let f: Vec<String> = s.frontends(&ids).iter().map(|f| SocketAddr::new(f.vip, f.port.0).to_string()).collect();
    // By (namespace, name, port, family): `v6` before `web`.
    let want = [
        "[fd00:96::20]:80",
        "[fd00:96::20]:443",
        "10.96.0.10:80",
        "[fd00:96::10]:80",
        "10.96.0.10:443",
        "[fd00:96::10]:443",
    ];
    assert_eq!(f, want);
    // `vip` beside `vips` is allowed when it is one of them.
    let mut d = dual();
    d.service_mut(0).vip = "fd00:96::10".into();
    assert!(State::from_document(&d).is_ok());
}

/// Every family mistake is refused at its field: a family mix that cannot
/// route, an address no connection is meshed through, a VIP that is a
/// pod's address in either family, two VIPs of one family.
#[test]
fn family_mistakes_are_refused_with_their_paths() {
    let has = |errs: Vec<String>, expected: &str| {
        assert!(errs.iter().any(|e| e == expected), "expected {expected:?} in {errs:#?}");
    };
    has(
        dual_errors(|d| d.service_mut(0).vips[1] = "10.96.0.11".into()),
        "services[0].vips[1]: 10.96.0.11 is a second IPv4 address (10.96.0.10 is one already): list one per family",
    );
    has(
        dual_errors(|d| d.service_mut(1).endpoints[0].ip = "10.244.2.9".into()),
        "services[1].endpoints[0].ip: 10.244.2.9 is IPv4, but the service has no IPv4 VIP (fd00:96::20): a VIP's connections go to endpoints of its family; add a IPv4 VIP to `vips`, or remove the endpoint",
    );
    has(
        errors(|d| d.service_mut(0).endpoints[0].ip = "fd00::5".into()),
        "services[0].endpoints[0].ip: fd00::5 is IPv6, but the service has no IPv6 VIP (10.96.0.10): a VIP's connections go to endpoints of its family; add a IPv6 VIP to `vips`, or remove the endpoint",
    );
    has(
        dual_errors(|d| d.service_mut(1).vips[0] = "fe80::20".into()),
        "services[1].vips[0]: fe80::20 is a link-local address (fe80::/10): give a unicast address that routes beyond one link",
    );
    has(
        errors(|d| d.service_mut(0).vip = "169.254.0.10".into()),
        "services[0].vip: 169.254.0.10 is a link-local address (169.254.0.0/16): give a unicast address that routes beyond one link",
    );
    has(
        dual_errors(|d| d.service_mut(0).endpoints[2].ip = "ff05::1".into()),
        "services[0].endpoints[2].ip: ff05::1 is a multicast address: give a unicast address that routes beyond one link",
    );
    has(
        errors(|d| d.workloads[0].ip = "::ffff:10.244.1.2".into()),
        r#"workloads[0].ip: "::ffff:10.244.1.2" is an IPv4-mapped IPv6 address: write the IPv4 address, 10.244.1.2"#,
    );
    has(
        dual_errors(|d| d.service_mut(1).vips[0] = "fd00:244:1::2".into()),
        "services[1].vips[0]: fd00:244:1::2 is the address of workload default/client (workloads[0]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
    );
    has(
        dual_errors(|d| d.service_mut(0).vips[1] = "fd00:18::3".into()),
        "services[0].vips[1]: fd00:18::3 is the address of node node-b (nodes[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
    );
    has(
        errors(|d| d.workloads[0].ips = vec!["10.244.1.2".into(), "fd00:244:1::2".into()]),
        "workloads[0].ips: fd00:244:1::2 is IPv6, but node node-a (nodes[0]) has no IPv6 address: add one to its `addresses`, or give the pod none of that family",
    );
    // The node is named by its place in the document, whatever nodes
    // before it failed.
    has(
        errors(|d| {
            d.nodes[0].name = "Node_A".into();
            d.workloads[1].ip = "fd00::9".into();
        }),
        "workloads[1].ip: fd00::9 is IPv6, but node node-b (nodes[1]) has no IPv6 address: add one to its `addresses`, or give the pod none of that family",
    );
    has(
        dual_errors(|d| d.nodes[0].addresses.push("fd00:18::9".into())),
        "nodes[0].addresses[2]: fd00:18::9 is a second IPv6 address (fd00:18::2 is one already): list one per family",
    );
    has(
        dual_errors(|d| d.service_mut(0).vip = "10.96.0.99".into()),
        "services[0].vip: 10.96.0.99 is not in `vips`: give `vips` alone, or one of them as `vip`",
    );
    has(
        dual_errors(|d| d.service_mut(0).vips.clear()),
        "services[0].vip: give `vip` (one address) or `vips` (one per family)",
    );
    has(
        dual_errors(|d| d.workloads[1].ip = "fd00:244:1::2".into()),
        "workloads[1].ip: fd00:244:1::2 is already the address of workloads[0]",
    );
}
