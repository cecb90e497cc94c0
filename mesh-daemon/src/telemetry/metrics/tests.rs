use super::*;

#[test]
fn latency_quantiles_are_known_to_within_a_quarter() {
    let s = LatencySketch::default();
    assert_eq!(s.quantile_ms(0.5), None);
    for _ in 0..98 {
        s.observe(std::time::Duration::from_micros(800));
    }
    s.observe(std::time::Duration::from_millis(50));
    s.observe(std::time::Duration::from_millis(50));
    let p50 = s.quantile_ms(0.5).unwrap();
    assert!((0.8..=1.0).contains(&p50), "p50 {p50}");
    let p99 = s.quantile_ms(0.99).unwrap();
    assert!((50.0..=62.5).contains(&p99), "p99 {p99}");
    s.observe(std::time::Duration::from_secs(3600));
    assert!(s.quantile_ms(1.0).unwrap() > 1000.0, "the last bucket takes the rest");
}

#[test]
fn the_rate_is_the_mean_of_the_last_ten_seconds() {
    let r = RecentRate::default();
    assert_eq!(r.per_second(0), 0.0);
    for s in 100..110 {
        for _ in 0..5 {
            r.record(s);
        }
    }
    assert_eq!(r.per_second(109), 5.0);
    // Seconds leave the window as it moves on; a bucket is reused by
    // the second ten later, starting from zero.
    assert_eq!(r.per_second(114), 2.5);
    r.record(115);
    assert_eq!(r.per_second(115), (20.0 + 1.0) / 10.0);
    assert_eq!(r.per_second(200), 0.0, "nothing recent");
}

#[test]
fn success_is_below_500_or_grpc_ok() {
    assert!(succeeded("2xx") && succeeded("4xx") && succeeded("OK"));
    assert!(!succeeded("5xx") && !succeeded("UNAVAILABLE") && !succeeded("UNKNOWN"));
}

#[test]
fn counters_get_their_total_name_and_openmetrics_lines_go() {
    let m = Metrics::new();
    m.retries.get_or_create(&ServiceLabels { service: "default/web:80".into(), direction: "outbound" }).inc();
    let text = m.encode();
    assert!(text.contains("# HELP mesh_retries_total "), "{text}");
    assert!(text.contains("# TYPE mesh_retries_total counter"), "{text}");
    assert!(text.contains("mesh_retries_total{service=\"default/web:80\",direction=\"outbound\"} 1"), "{text}");
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
}

#[test]
fn a_subsystem_registers_its_own_series_once() {
    let m = Metrics::new();
    let first = prometheus_client::metrics::gauge::Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    first.set(7);
    m.register("state_generation", "Generation of the accepted state", first.clone());
    // A second control plane on the same registry keeps the first's.
    m.register(
        "state_generation",
        "Generation of the accepted state",
        prometheus_client::metrics::gauge::Gauge::<i64, std::sync::atomic::AtomicI64>::default(),
    );
    let text = m.encode();
    assert_eq!(text.matches("# TYPE mesh_state_generation gauge").count(), 1, "{text}");
    assert!(text.contains("mesh_state_generation 7"), "{text}");
}

#[test]
fn a_route_rule_counts_its_requests_and_latency_and_goes_with_its_rule() {
    let m = Metrics::new();
    let (route, rule) = (Arc::<str>::from("default/web"), Arc::<str>::from("v2"));
    let s = m.rule_series(&route, &rule);
    assert!(Arc::ptr_eq(&s, &m.rule_series(&route, &rule)), "made once");
    for class in ["2xx", "2xx", "4xx", "5xx"] {
        s.answered(std::time::Duration::from_millis(3));
        s.finished(class, now_secs());
    }
    let rows = m.route_rows();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].route.as_str(), rows[0].rule.as_str(), rows[0].requests), ("default/web", "v2", 4));
    assert_eq!(rows[0].success_rate, Some(0.75), "4xx succeeds, 5xx does not");
    assert!((2.4..=3.75).contains(&rows[0].p50_ms.unwrap()), "{rows:?}");
    let text = m.encode();
    let count = "mesh_route_response_latency_seconds_count{route=\"default/web\",rule=\"v2\"} 4";
    assert!(text.contains(count), "{text}");
    // A backend of the rule leaving keeps it; the rule leaving (its key
    // without a backend) drops its series.
    m.forget_route_series([(route.clone(), rule.clone(), Arc::from("default/web-v2:80"))].iter());
    assert_eq!(m.route_rows().len(), 1);
    m.forget_route_series([(route.clone(), rule.clone(), Arc::from(""))].iter());
    assert!(m.route_rows().is_empty());
    assert!(!m.encode().contains("rule=\"v2\""), "{}", m.encode());
}
