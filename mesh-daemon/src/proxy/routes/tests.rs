use super::*;
use crate::model::parse_document;

fn table(extra: &str) -> (RouteTable, Registry) {
    table_with(extra, &Arc::new(Metrics::new()))
}

fn table_with(extra: &str, metrics: &Arc<Metrics>) -> (RouteTable, Registry) {
    testing::table_with(extra, metrics)
}

#[test]
fn series_are_made_on_first_use_kept_across_writes_and_dropped_with_their_endpoint() {
    let m = Arc::new(Metrics::new());
    let eps = "   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}, {ip: 10.0.0.3, node: a}]\n";
    let (old, _) = table_with(eps, &m);
    assert!(!m.encode().contains("10.0.0."), "no series before an endpoint carries anything");
    for e in &old.route(1).unwrap().endpoints[..2] {
        e.series().opened.inc();
    }
    let text = m.encode();
    assert!(text.contains("10.0.0.1:8080") && !text.contains("10.0.0.3"), "{text}");
    let rows = old.stats_rows();
    assert_eq!(rows.len(), 3, "an idle endpoint still has a row");
    assert_eq!((rows[2].endpoint.as_str(), rows[2].opened), ("10.0.0.3:8080", 0));

    let (new, _) = table_with("   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.3, node: a}]\n", &m);
    new.adopt_all_series(&old);
    old.forget_series_missing_from(&new, &m);
    let text = m.encode();
    assert!(text.contains("endpoint=\"10.0.0.1:8080\""), "{text}");
    assert!(!text.contains("10.0.0.2"), "{text}");
    // The kept endpoint's series goes on counting; its row shows it.
    new.route(1).unwrap().endpoints[0].series().opened.inc();
    assert!(m.encode().contains(
        "mesh_connections_opened_total{service=\"default/web:80\",endpoint=\"10.0.0.1:8080\",direction=\"outbound\"} 2"
    ));
    assert_eq!(new.stats_rows()[0].opened, 2);
}

/// A routed request's backend port is taken in the client's family,
/// each family's route with its family's endpoints; a single-stack
/// backend answers either family.
#[test]
fn a_backend_port_is_taken_in_the_clients_family_else_its_other() {
    let doc = parse_document(
        "nodes: [{name: a, addresses: [172.18.0.2, 'fd00::2']}]\n\
         services:\n - {name: two, vips: [10.96.0.1, 'fd00:96::1'], ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}, {ip: 'fd00::11', node: a}]}\n\
         \x20- {name: six, vip: 'fd00:96::2', ports: [{port: 80}], endpoints: [{ip: 'fd00::12', node: a}]}\n",
    )
    .unwrap();
    let state = Arc::new(State::from_document(&doc).unwrap());
    let ids = crate::model::ServiceIds::default().assign(&state.frontend_keys());
    let local = Local { node: NodeName::parse("a").unwrap(), trust_domain: "cluster.local".into(), tunnel_port: 1 };
    let m = Arc::new(Metrics::new());
    let t = RouteTable::build(&state, &state.frontends(&ids), &Registry::default(), &Default::default(), &local, &m);
    let key = |name: &str| PortKey {
        service: state.services.iter().find(|s| s.name.as_str() == name).unwrap().key(),
        port: 80,
    };
    let endpoint = |r: &Route| r.endpoints[0].state.addr.to_string();
    for (family, want) in [(Family::V4, "10.0.0.1:80"), (Family::V6, "[fd00::11]:80")] {
        let (id, r) = t.route_of(&key("two"), family).unwrap();
        assert_eq!((r.family, endpoint(r), r.endpoints.len()), (family, want.to_owned(), 1));
        assert_eq!(t.route(id).map(|r| r.family), Some(family));
    }
    let (_, r) = t.route_of(&key("six"), Family::V4).unwrap();
    assert_eq!((r.family, endpoint(r)), (Family::V6, "[fd00::12]:80".to_owned()));
    assert!(t.has_port(&key("six")));
}

#[test]
fn a_rebuild_keeps_the_routes_of_services_that_did_not_change() {
    let doc = parse_document(
        "nodes: [{name: a, address: 172.18.0.2}]\n\
         services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}]}\n\
         \x20- {name: db, vip: 10.96.0.20, ports: [{port: 5432}], endpoints: [{ip: 10.0.0.2, node: a}]}\n",
    )
    .unwrap();
    let m = Arc::new(Metrics::new());
    let local = Local { node: NodeName::parse("a").unwrap(), trust_domain: "cluster.local".into(), tunnel_port: 15008 };
    let (registry, policies) = (Registry::default(), Policies::default());
    let state = Arc::new(State::from_document(&doc).unwrap());
    let ids = crate::model::ServiceIds::default().assign(&state.frontend_keys());
    let build = |state: &Arc<State>, prev: &RouteTable| {
        RouteTable::build_from(state, &state.frontends(&ids), 1, prev, &registry, &policies, &local, &m)
    };
    let one = build(&state, &RouteTable::default());
    // A write of web's weight: db's service is the same Arc.
    let mut doc2 = doc.clone();
    doc2.service_mut(0).endpoints[0].weight = 5;
    let index = crate::model::Index::of(&state, 256);
    let next = Arc::new(State::from_changes((&doc, &state, &index), &doc2, 256).unwrap().state);
    let two = build(&next, &one);
    let id = |t: &RouteTable, name: &str| t.by_id.values().find(|r| r.name == name).unwrap().clone();
    assert!(Arc::ptr_eq(&id(&one, "default/db:5432"), &id(&two, "default/db:5432")), "db did not change");
    assert!(!Arc::ptr_eq(&id(&one, "default/web:80"), &id(&two, "default/web:80")), "web's weight did");
    assert_eq!(id(&two, "default/web:80").endpoints[0].weight, 5);
    // The same content parsed again is not the same service: rebuilt.
    let three = build(&Arc::new(State::from_document(&doc2).unwrap()), &two);
    assert!(!Arc::ptr_eq(&id(&two, "default/db:5432"), &id(&three, "default/db:5432")));
}

#[tokio::test]
async fn drained_and_tried_endpoints_get_no_connections() {
    let (t, _) =
        table("   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a, weight: 0}, {ip: 10.0.0.3, node: a}]\n");
    let r = t.route(1).unwrap();
    assert_eq!(r.name, "default/web:80");
    let first: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    for _ in 0..20 {
        let e = r.pick(&[first], &crate::env::Live).unwrap();
        assert_eq!(e.state.addr, "10.0.0.3:8080".parse().unwrap(), "weight 0 and tried endpoints are skipped");
    }
    assert!(t.route(2).is_none());
}

#[tokio::test]
async fn lower_priority_serves_only_when_the_best_level_is_down() {
    let (t, reg) =
        table("   endpoints: [{ip: 10.0.0.1, node: a, priority: 0}, {ip: 10.0.0.2, node: a, priority: 1}]\n");
    let r = t.route(1).unwrap();
    let (p0, p1): (SocketAddr, SocketAddr) = ("10.0.0.1:8080".parse().unwrap(), "10.0.0.2:8080".parse().unwrap());
    assert!((0..20).all(|_| r.pick(&[], &crate::env::Live).unwrap().state.addr == p0));
    reg.get(p0).record_check(false, "refused", 1, 1);
    assert!((0..20).all(|_| r.pick(&[], &crate::env::Live).unwrap().state.addr == p1));
    reg.get(p0).record_check(true, "ok", 1, 1);
    assert!((0..20).all(|_| r.pick(&[], &crate::env::Live).unwrap().state.addr == p0), "traffic returns to priority 0");
}
