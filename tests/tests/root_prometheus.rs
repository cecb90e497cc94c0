//! The Grafana dashboards and Prometheus alerts of `deploy/observability/`
//! against a real Prometheus (Debian's package) scraping both daemons of
//! a mini cluster while traffic flows: every panel's and every alert's
//! expression returns series (so no metric or label name is mistyped), and
//! the error-rate alert fires for a backend that fails half its requests.
//! The file checks (promtool, the PrometheusRule, names the daemon
//! exports) need no root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::follow::Follower;
use mesh_tests::{Cluster, ClusterSpec};

const WEB_VIP: &str = "10.96.0.10";
const FLAKY_VIP: &str = "10.96.0.11";
const PROMETHEUS: &str = "127.0.0.1:9090";
const METRICS_PORT: u16 = 15090;
const P: &str = "cluster.local/ns/default/sa";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

fn read(file: &str) -> String {
    std::fs::read_to_string(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn yaml(file: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every alert rule: (name, expression, `for`).
fn alerts() -> Vec<(String, String, Option<String>)> {
    let doc = yaml("alerts.yaml");
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let s = |k: &str| r[k].as_str().map(str::to_owned);
            out.push((s("alert").unwrap(), s("expr").unwrap(), s("for")));
        }
    }
    out
}

/// Every panel's expressions of a dashboard, with Grafana's variables set
/// as "All" would (and `$__rate_interval` at 30 s).
fn panel_exprs(file: &str) -> Vec<(String, String)> {
    let d: serde_json::Value = serde_json::from_str(&read(file)).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s")
                .replace("$service", ".*")
                .replace("$instance", ".*");
            out.push((format!("{file}: {}", p["title"].as_str().unwrap()), expr));
        }
    }
    out
}

/// The value part of an alert's expression: each operand of a top-level
/// `and`/`or`/`unless`, up to its top-level comparison (what must return
/// series whether or not the alert fires).
fn value_parts(expr: &str) -> Vec<String> {
    let (mut depth, mut parts, mut cur, mut quoted) = (0i32, Vec::new(), String::new(), false);
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut cut = false;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted {
            match c {
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' => depth -= 1,
                _ => {}
            }
        }
        let rest = &expr[i..];
        if depth == 0 && !quoted {
            if let Some(op) = [" and ", " or ", " unless "].iter().find(|op| rest.starts_with(**op)) {
                parts.push(std::mem::take(&mut cur));
                cut = false;
                i += op.len();
                continue;
            }
            if [">", "<", "==", "!="].iter().any(|op| rest.starts_with(op)) {
                cut = true;
            }
        }
        if !cut {
            cur.push(c);
        }
        i += 1;
    }
    parts.push(cur);
    parts.into_iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect()
}

/// Metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("mesh_") || word.starts_with("process_") {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
            out.push(base.to_owned());
        }
    }
    out
}

#[test]
fn value_parts_cut_at_the_top_level_comparison() {
    assert_eq!(value_parts("mesh_ready == 0"), ["mesh_ready"]);
    assert_eq!(
        value_parts("sum by (s) (rate(x{c!~\"a|b\"}[5m])) / sum(y) > 0.05"),
        ["sum by (s) (rate(x{c!~\"a|b\"}[5m])) / sum(y)"]
    );
    assert_eq!(value_parts("(a - time())\n  < 0.2 * (a - b)"), ["(a - time())"]);
    assert_eq!(value_parts("a > 1 and b{x=\"<\"} < 2"), ["a", "b{x=\"<\"}"]);
}

#[test]
fn every_expression_reads_series_the_daemon_exports() {
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/reference/metrics.md"))
            .unwrap();
    let exported: Vec<&str> = reference
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .map(|n| n.strip_suffix("_total").unwrap_or(n))
        .collect();
    let mut exprs = panel_exprs("mesh-overview.json");
    exprs.extend(panel_exprs("mesh-node.json"));
    exprs.extend(alerts().into_iter().map(|(n, e, _)| (n, e)));
    let mut missing = Vec::new();
    for (what, expr) in &exprs {
        for name in metric_names(expr) {
            let base = name.strip_suffix("_total").unwrap_or(&name);
            if !exported.contains(&base) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    assert!(exprs.len() > 40, "{exprs:?}");
    assert!(missing.is_empty(), "not in the metrics reference: {missing:?}");
}

#[test]
fn promtool_checks_the_rules_and_every_alert_has_a_passing_test() {
    let run = |args: &[&str]| {
        let out =
            Command::new("promtool").args(args).current_dir(dir()).output().expect("promtool (cargo xtask setup)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}: {text}");
        text
    };
    let checked = run(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", alerts().len())), "{checked}");
    run(&["test", "rules", "alerts.test.yaml"]);
    // Each alert is expected to fire in some test, and expected quiet in
    // another.
    let tests = yaml("alerts.test.yaml");
    for (name, _, _) in alerts() {
        let cases: Vec<_> = tests["tests"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap().iter())
            .filter(|c| c["alertname"].as_str() == Some(&name))
            .collect();
        let fires = cases.iter().any(|c| !c["exp_alerts"].as_sequence().unwrap().is_empty());
        let quiet = cases.iter().any(|c| c["exp_alerts"].as_sequence().unwrap().is_empty());
        assert!(fires, "no promtool test of {name} firing");
        assert!(quiet || name == "MeshDaemonDown", "no promtool test of {name} staying quiet");
    }
}

#[test]
fn the_kustomization_ships_the_rules_the_dashboards_and_a_monitor_of_the_metrics_listener() {
    let rule = yaml("prometheusrule.yaml");
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(rule["spec"]["groups"], yaml("alerts.yaml")["groups"], "edit alerts.yaml and copy its groups");
    let out = Command::new("kubectl").arg("kustomize").arg(dir()).output().expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let objects: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| objects.iter().find(|o| o["kind"] == k).unwrap_or_else(|| panic!("no {k}"));
    let dashboards = kind("ConfigMap");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
    for file in ["mesh-overview.json", "mesh-node.json"] {
        assert_eq!(dashboards["data"][file].as_str(), Some(read(file).as_str()), "{file}");
    }
    assert_eq!(kind("PrometheusRule")["spec"]["groups"], rule["spec"]["groups"]);
    // The monitor scrapes the port the DaemonSet's --metrics-listen names,
    // as the job the alerts read.
    let relabel = kind("PodMonitor")["spec"]["podMetricsEndpoints"][0]["relabelings"].clone();
    let text = serde_yaml::to_string(&relabel).unwrap();
    let ds = std::fs::read_to_string(dir().join("../daemonset.yaml")).unwrap();
    let port =
        ds.lines().find_map(|l| l.trim().strip_prefix("- --metrics-listen=$(POD_IP):")).expect("--metrics-listen");
    assert!(text.contains(&format!("$1:{port}")), "{text}");
    assert!(text.contains("replacement: mesh-daemon"), "{text}");
    // Panels: unique ids, each reading the dashboard's data source.
    for file in ["mesh-overview.json", "mesh-node.json"] {
        let d: serde_json::Value = serde_json::from_str(&read(file)).unwrap();
        let panels = d["panels"].as_array().unwrap();
        let mut ids: Vec<_> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "{file}: panel ids repeat");
        for p in panels.iter().filter(|p| p["type"] != "row") {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file}: {}", p["title"]);
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{file}: {}", p["title"]);
        }
    }
}

/// URL query encoding of `s`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus, run in node-a's network namespace.
struct Prom<'a> {
    c: &'a Cluster,
    addr: SocketAddr,
}

impl Prom<'_> {
    /// A GET in HTTP/1.0, so that the answer is not chunked.
    fn get(&self, path: &str) -> anyhow::Result<(String, String)> {
        use std::io::{Read, Write};
        let addr = self.addr;
        mesh_tests::sys::in_netns(&self.c.node("node-a").netns, || -> anyhow::Result<(String, String)> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
            Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
        })?
    }

    /// An instant query: the result's series.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (status, body) = self.get(&path).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{status} {body}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

#[test]
fn root_prometheus_evaluates_every_panel_and_alert_and_the_error_rate_alert_fires() {
    let _one = mesh_tests::one_at_a_time();
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client", "node-a")
            .pod("other", "node-a")
            .pod("web-1", "node-a")
            .pod("web-2", "node-b"),
    )
    .expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    c.serve_http("web-2", 8080, &[]).unwrap();
    // The flaky backend: half its answers are 503.
    c.serve_http("web-2", 8081, &["--fail-percent", "50"]).unwrap();
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let services = format!(
        "  - name: web\n    vip: {WEB_VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}]\n    \
         endpoints: [{{ ip: {w1}, node: node-a }}, {{ ip: {w2}, node: node-b }}]\n\
         \x20 - name: flaky\n    vip: {FLAKY_VIP}\n    ports: [{{ port: 80, targetPort: 8081, appProtocol: http }}]\n    \
         healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {w2}, node: node-b }}]\n"
    );
    let route = "routes:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    \
                 metadata: { name: web-route, namespace: default }\n    \
                 spec: { parentRefs: [{ group: \"\", kind: Service, name: web, port: 80 }], \
                 rules: [{ name: all, matches: [{ path: { type: PathPrefix, value: / } }], \
                 backendRefs: [{ name: web, port: 80 }] }] }\n";
    let policy = format!(
        "policies:\n  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
         metadata: {{ name: web-callers, namespace: default }}\n    \
         spec: {{ targetRefs: [{{ kind: Service, name: web }}], rules: [{{ from: [{{ source: {{ principals: [{P}/client] }} }}] }}] }}\n"
    );
    let cfg = c.write_file("mesh.yaml", &format!("{}{route}{policy}", c.config(&services))).unwrap();
    // Prometheus scrapes each daemon's metrics listener on its node's
    // address, as in a cluster (the admin endpoint stays on loopback).
    let metrics_at = |node: &str| format!("{}:{METRICS_PORT}", c.node(node).address);
    let a = c.start_daemon("node-a", &cfg, &["--metrics-listen", &metrics_at("node-a")]).unwrap();
    let _b = c.start_daemon("node-b", &cfg, &["--metrics-listen", &metrics_at("node-b")]).unwrap();
    let from_a = |node: &str, path: &str| {
        mesh_tests::sys::http_get(&c.node("node-a").netns, metrics_at(node).parse().unwrap(), path).unwrap()
    };
    assert_eq!(from_a("node-b", "/ready").0, 200);
    let (status, body) = from_a("node-b", "/config_dump");
    assert_eq!(status, 404, "the metrics listener serves no state: {body}");
    assert_eq!(a.admin_get("/config_dump").unwrap().0, 200, "the admin endpoint does");

    // The alerts as shipped, but the error-rate alert's `for:` shortened.
    let rules = read("alerts.yaml");
    let shortened = rules.replacen("        for: 5m\n", "        for: 10s\n", 1);
    assert_ne!(rules, shortened);
    assert!(shortened.find("for: 10s").unwrap() < shortened.find("alert: MeshHighLatency").unwrap());
    let rules_file = c.write_file("alerts.yaml", &shortened).unwrap();
    let targets = ["node-a", "node-b"].map(|n| format!("\"{}\"", metrics_at(n))).join(", ");
    let config = c
        .write_file(
            "prometheus.yml",
            &format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{}]\n\
                 scrape_configs:\n  - job_name: mesh-daemon\n    static_configs: [{{ targets: [{targets}] }}]\n",
                rules_file.display()
            ),
        )
        .unwrap();
    let data = config.with_file_name("prometheus-data");
    std::fs::create_dir_all(&data).unwrap();
    let prom_pid = c
        .spawn_on_node(
            "node-a",
            "prometheus",
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", data.display()),
                &format!("--web.listen-address={PROMETHEUS}"),
                "--log.level=warn",
            ],
        )
        .unwrap();
    let prom = Prom { c: &c, addr: PROMETHEUS.parse().unwrap() };
    let up = mesh_tests::sys::wait_until(Duration::from_secs(30), || {
        prom.query("up{job=\"mesh-daemon\"} == 1").is_ok_and(|r| r.len() == 2)
    });
    assert!(up, "Prometheus scrapes both daemons: {:?}", prom.query("up"));

    // Traffic: the client through the route to both web endpoints (one
    // across the tunnel), to the flaky service, and a caller the policy
    // denies.
    let mut web = Follower::open(&c, "client", &format!("{WEB_VIP}:80"), false).unwrap();
    let mut flaky = Follower::open(&c, "client", &format!("{FLAKY_VIP}:80"), false).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let (mut ok, mut failed) = (0, 0);
    while std::time::Instant::now() < deadline {
        let w = web.batch(20, "/").unwrap();
        assert!(w.keys().all(|k| k.starts_with("web-")), "{w:?}");
        let f = flaky.batch(20, "/").unwrap();
        ok += f.get("web-2").copied().unwrap_or(0);
        failed += f.get("503").copied().unwrap_or(0);
        let _ = c.curl("other", &format!("http://{WEB_VIP}/"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok > 20 && failed > 20, "the flaky backend answers about half 503: {ok} ok, {failed} failed");
    // Two more scrapes after the traffic.
    std::thread::sleep(Duration::from_secs(3));

    let mut exprs = panel_exprs("mesh-overview.json");
    exprs.extend(panel_exprs("mesh-node.json"));
    for (name, expr, _) in alerts() {
        exprs.extend(value_parts(&expr).into_iter().map(|p| (format!("alert {name}"), p)));
    }
    let mut empty = Vec::new();
    for (what, expr) in &exprs {
        match prom.query(expr) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => empty.push(format!("{what}: no series for {expr}")),
            Err(e) => empty.push(format!("{what}: {expr}: {e}")),
        }
    }
    assert!(empty.is_empty(), "{} of {} expressions:\n{}", empty.len(), exprs.len(), empty.join("\n"));

    // The error-rate alert fires for the flaky service only.
    let firing = "ALERTS{alertname=\"MeshHighErrorRate\", alertstate=\"firing\"}";
    let fired = mesh_tests::sys::wait_until(Duration::from_secs(40), || {
        prom.query(firing).is_ok_and(|r| r.iter().any(|s| s["metric"]["service"] == "default/flaky:80"))
    });
    assert!(fired, "MeshHighErrorRate: {:?}", prom.query("ALERTS"));
    let services: Vec<_> = prom.query(firing).unwrap().iter().map(|s| s["metric"]["service"].clone()).collect();
    assert_eq!(services, ["default/flaky:80"], "only the flaky service fails");
    let _ = c.terminate(prom_pid);
}
