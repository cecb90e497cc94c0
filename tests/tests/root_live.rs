//! End-to-end tests that a client connection held open follows every write
//! of the state (root, real kernel): each request is routed against the
//! state as it is when the request arrives, not as it was when its
//! connection was accepted. One connection (mt-http --follow) sends a batch
//! of requests after each write, as soon as `meshctl` has returned.

use std::collections::BTreeMap;

use mesh_tests::follow::Follower;
use mesh_tests::loadgen::assert_share;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";

// Shares depend on the backends answering at their own pace.
use mesh_tests::one_at_a_time as serial;

struct Live {
    d: Daemon,
    c: Cluster,
}

/// client and web-1..web-3 (mt-http on 8080) on one node.
fn cluster() -> Cluster {
    let mut spec = ClusterSpec::new().node("node-a").pod("client", "node-a");
    for n in ["web-1", "web-2", "web-3"] {
        spec = spec.pod(n, "node-a");
    }
    let c = Cluster::create(&spec).expect("mini cluster");
    for n in ["web-1", "web-2", "web-3"] {
        c.serve_http(n, 8080, &[]).unwrap();
    }
    c
}

/// The state with service `web` (VIP:80 -> 8080, `appProtocol: APP`), the
/// given endpoints (pod name, weight) and `http` as its request policy.
fn state(c: &Cluster, app: &str, endpoints: &[(&str, u16)], http: &str) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|(p, w)| format!("{{ ip: {}, node: node-a, weight: {w} }}", c.pod(p).ip)).collect();
    c.config(&format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: {app} }}]\n    \
         healthCheck: {{ protocol: none }}\n    endpoints: [{}]\n    http: {http}\n",
        eps.join(", ")
    ))
}

fn start(app: &str) -> Live {
    let c = cluster();
    let cfg = c.write_file("mesh.yaml", &state(&c, app, &[("web-1", 80), ("web-2", 20)], "{}")).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    Live { d, c }
}

/// Runs meshctl on node-a; it must succeed.
fn ctl(l: &Live, args: &[&str]) {
    let out = l.c.meshctl("node-a", args).unwrap();
    assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn apply(l: &Live, name: &str, text: &str) {
    let f = l.c.write_file(name, text).unwrap();
    ctl(l, &["apply", "-f", f.to_str().unwrap()]);
}

fn count(t: &BTreeMap<String, u64>, k: &str) -> u64 {
    t.get(k).copied().unwrap_or(0)
}

/// The steps, on one connection: weights 80/20 then 20/80, a drain, a new
/// endpoint, a timeout set and lifted, and the service removed.
fn follows_every_write(app: &str, h2: bool) {
    let l = start(app);
    let ip = |p: &str| l.c.pod(p).ip.to_string();
    let mut f = Follower::open(&l.c, "client", &format!("{VIP}:80"), h2).unwrap();

    let t = f.batch(400, "/").unwrap();
    assert_eq!(count(&t, "web-1") + count(&t, "web-2"), 400, "{t:?}");
    assert_share(count(&t, "web-1"), 400, 0.8, "80/20: web-1", &t);

    ctl(&l, &["set-weight", "web", &ip("web-1"), "20"]);
    ctl(&l, &["set-weight", "web", &ip("web-2"), "80"]);
    let t = f.batch(400, "/").unwrap();
    assert_eq!(count(&t, "web-1") + count(&t, "web-2"), 400, "{t:?}");
    assert_share(count(&t, "web-1"), 400, 0.2, "20/80 on the same connection: web-1", &t);

    ctl(&l, &["set-weight", "web", &ip("web-1"), "0"]);
    let t = f.batch(200, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("web-2".into(), 200)]), "web-1 drained: none of the next requests");

    apply(&l, "add.yaml", &state(&l.c, app, &[("web-1", 0), ("web-2", 80), ("web-3", 80)], "{}"));
    let t = f.batch(400, "/").unwrap();
    assert_eq!(count(&t, "web-2") + count(&t, "web-3"), 400, "web-1 still drained: {t:?}");
    assert_share(count(&t, "web-3"), 400, 0.5, "web-3 added: its share of the next requests", &t);

    let t = f.batch(10, "/delay/400").unwrap();
    assert_eq!(count(&t, "504"), 0, "no timeout yet: {t:?}");
    apply(&l, "timeout.yaml", &state(&l.c, app, &[("web-2", 1), ("web-3", 1)], "{ timeout: 100ms }"));
    let t = f.batch(10, "/delay/400").unwrap();
    assert_eq!(t, BTreeMap::from([("504".into(), 10)]), "the new timeout holds for the next requests");
    let t = f.batch(20, "/").unwrap();
    assert_eq!(count(&t, "web-2") + count(&t, "web-3"), 20, "quick requests are answered: {t:?}");
    apply(&l, "lifted.yaml", &state(&l.c, app, &[("web-2", 1), ("web-3", 1)], "{}"));
    let t = f.batch(10, "/delay/400").unwrap();
    assert_eq!(count(&t, "504"), 0, "the timeout lifted: {t:?}");

    apply(&l, "gone.yaml", &l.c.config("").replace("services:\n", "services: []\n"));
    let t = f.batch(5, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("503".into(), 5)]), "the service left the state: 503, the connection stays");

    assert_eq!(l.d.counter("proxy", "accepted").unwrap(), 1, "every batch went over one client connection");
}

#[test]
fn root_one_held_http2_connection_follows_every_write() {
    let _one = serial();
    follows_every_write("http2", true);
}

#[test]
fn root_one_held_http1_keepalive_connection_follows_every_write() {
    let _one = serial();
    follows_every_write("http", false);
}
