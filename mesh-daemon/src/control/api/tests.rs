//! Every route of the control API and every error it answers, in-process:
//! a control plane without a kernel datapath ([`Prepared::detached`]),
//! requests as bytes over an in-memory stream, answers read as a client
//! reads them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::telemetry::Metrics;

struct Api {
    control: Arc<Control>,
    dir: PathBuf,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn api(name: &str, managed_by: Option<&'static str>) -> Api {
    let dir = std::env::temp_dir().join(format!("mesh-api-{name}-{}", std::process::id()));
    let control = Arc::new(crate::control::testing::detached(&dir, Arc::new(Metrics::new()), managed_by));
    Api { control, dir }
}

/// Sends `head` (and `body`) on one connection; the status and the body
/// of the answer.
async fn send(api: &Api, allowed: Result<(), Forbidden>, timeout: Duration, raw: Vec<u8>) -> (u16, String) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let served = tokio::spawn(serve_connection(server, api.control.clone(), allowed, timeout));
    client.write_all(&raw).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer)).await.unwrap().unwrap();
    let _ = served.await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn request(method: &str, path: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

async fn call(api: &Api, method: &str, path: &str, body: &str) -> (u16, String) {
    send(api, Ok(()), Duration::from_secs(5), request(method, path, &[], body)).await
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn reads_answer_what_the_state_holds_and_404_what_it_does_not() {
    let a = api("reads", None);
    let (code, body) = call(&a, "GET", "/v1/state", "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["generation"], 1);
    assert_eq!(json(&body)["state"]["services"].as_array().unwrap().len(), 3);
    for (path, field, want) in [
        ("/v1/nodes/b", "address", "172.18.0.3"),
        ("/v1/workloads/default/client", "serviceAccount", "client"),
        ("/v1/services/default/web", "vip", "10.96.0.10"),
    ] {
        let (code, body) = call(&a, "GET", path, "").await;
        assert_eq!((code, json(&body)[field].as_str().unwrap()), (200, want), "{path}: {body}");
    }
    for (path, len) in [("/v1/nodes", 2), ("/v1/workloads", 1), ("/v1/services", 3), ("/v1/stats", 0)] {
        let (code, body) = call(&a, "GET", path, "").await;
        assert_eq!((code, json(&body).as_array().unwrap().len()), (200, len), "{path}: {body}");
    }
    let (code, body) = call(&a, "GET", "/v1/endpoints", "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("10.244.2.4"), "{body}");
    for (path, what) in [
        ("/v1/nodes/z", "node z not found"),
        ("/v1/workloads/default/nope", "workload default/nope not found"),
        ("/v1/services/shop/web", "service shop/web not found"),
    ] {
        let (code, body) = call(&a, "GET", path, "").await;
        assert_eq!((code, json(&body)["error"].as_str().unwrap()), (404, what), "{path}");
    }
    let (code, body) = call(&a, "GET", "/v1/metrics", "").await;
    assert_eq!(code, 200);
    assert!(body.contains("mesh_state_generation 1"), "the Prometheus text: {body}");
}

#[tokio::test]
async fn status_and_datapath_say_when_there_is_no_kernel_datapath() {
    let a = api("status", None);
    let (code, body) = call(&a, "GET", "/v1/status", "").await;
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!((v["node"].as_str(), v["generation"].as_u64()), (Some("a"), Some(1)));
    assert!(v["datapath"]["stats"]["error"].as_str().unwrap().contains("not attached"), "{body}");
    let (code, body) = call(&a, "GET", "/v1/datapath", "").await;
    assert_eq!((code, json(&body)["error"].as_str().unwrap()), (503, "the datapath is not attached yet"));
}

#[tokio::test]
async fn writes_apply_whole_and_say_the_new_generation() {
    let a = api("writes", None);
    let svc = r#"{"vip": "10.96.0.20", "ports": [{"port": 80}], "endpoints": [{"ip": "10.244.1.9", "node": "a"}]}"#;
    let (code, body) = call(&a, "PUT", "/v1/services/default/new", svc).await;
    assert_eq!((code, json(&body)["generation"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(a.control.snapshot().state.services.len(), 4);
    // The same in YAML, replacing it.
    let yaml = "vip: 10.96.0.20\nports: [{port: 80}]\nendpoints: [{ip: 10.244.1.9, node: a, weight: 2}]\n";
    let (code, _) = call(&a, "PUT", "/v1/services/default/new", yaml).await;
    assert_eq!(code, 200);
    let (code, body) = call(&a, "PATCH", "/v1/services/default/web/endpoints/10.244.1.4", r#"{"weight": 0}"#).await;
    assert_eq!((code, json(&body)["generation"].as_u64()), (200, Some(4)), "{body}");
    let (code, _) = call(&a, "PUT", "/v1/nodes/c", r#"{"address": "172.18.0.4"}"#).await;
    assert_eq!(code, 200);
    let (code, _) = call(&a, "DELETE", "/v1/services/default/new", "").await;
    assert_eq!(code, 200);
    let (code, body) = call(&a, "DELETE", "/v1/services/default/new", "").await;
    assert_eq!((code, json(&body)["error"].as_str().unwrap()), (404, "service default/new not found"));
    let (code, _) = call(&a, "DELETE", "/v1/workloads/default/client", "").await;
    assert_eq!(code, 200);
    let (code, body) = call(&a, "DELETE", "/v1/nodes/z", "").await;
    assert_eq!((code, json(&body)["error"].as_str().unwrap()), (404, "node z not found"));
    // Whole documents too.
    let (code, body) = call(&a, "GET", "/v1/state", "").await;
    assert_eq!(code, 200);
    let state = json(&body)["state"].to_string();
    let (code, body) = call(&a, "PUT", "/v1/state", &state).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_bad_write_is_refused_with_the_field_and_nothing_changes() {
    let a = api("bad-writes", None);
    let before = a.control.snapshot().generation;
    let bad_ip = r#"{"vip": "10.96.0.300", "ports": [{"port": 80}]}"#;
    let (code, body) = call(&a, "PUT", "/v1/services/default/new", bad_ip).await;
    assert_eq!(code, 400, "{body}");
    let v = json(&body);
    assert!(v["error"].as_str().unwrap().ends_with("nothing was changed"), "{body}");
    let field = &v["fields"][0];
    assert_eq!(field["path"], "vip", "the path within the item: {body}");
    assert!(field["message"].as_str().unwrap().contains("10.96.0.300"), "{body}");
    for (method, path, body, says) in [
        ("PUT", "/v1/services/default/web", "{not json", "the body is not valid JSON or YAML"),
        ("PUT", "/v1/services/default/web", r#"{"name": "other"}"#, "does not match the URL's"),
        ("PUT", "/v1/services/default/web", "[1, 2]", "the body must be an object"),
        ("PATCH", "/v1/services/default/web/endpoints/10.244.1.4", r#"{"w": 1}"#, "{\"weight\": N}"),
        // A whole document with a typo: the field's path, as `meshctl
        // validate` and the config loader name it.
        (
            "PUT",
            "/v1/state",
            "services:\n  - name: w\n    vip: 10.96.0.9\n    ports: [{ port: 80, prot: 1 }]\n",
            "services[0].ports[0]: unknown field `prot`",
        ),
    ] {
        let (code, answer) = call(&a, method, path, body).await;
        assert_eq!(code, 400, "{method} {path} {body}: {answer}");
        assert!(json(&answer)["error"].as_str().unwrap().contains(says), "{method} {path} {body}: {answer}");
    }
    let (code, body) = call(&a, "PATCH", "/v1/services/default/web/endpoints/10.9.9.9", r#"{"weight": 1}"#).await;
    assert_eq!(
        (code, json(&body)["error"].as_str().unwrap()),
        (404, "endpoint 10.9.9.9 of service default/web not found")
    );
    // A weight past the maximum is the model's to refuse, with its path.
    let (code, body) = call(&a, "PATCH", "/v1/services/default/web/endpoints/10.244.1.4", r#"{"weight": 70000}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("above the maximum"), "{body}");
    assert_eq!(a.control.snapshot().generation, before, "nothing was applied");
}

#[tokio::test]
async fn a_write_against_an_older_generation_is_a_conflict() {
    let a = api("conflict", None);
    let body = r#"{"weight": 2}"#;
    let path = "/v1/services/default/web/endpoints/10.244.1.4";
    let (code, _) = send(&a, Ok(()), Duration::from_secs(5), request("PATCH", path, &["If-Match: 1"], body)).await;
    assert_eq!(code, 200);
    let (code, answer) = send(&a, Ok(()), Duration::from_secs(5), request("PATCH", path, &["If-Match: 1"], body)).await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(json(&answer)["generation"], 2);
    assert!(json(&answer)["error"].as_str().unwrap().contains("read it again and retry"), "{answer}");
    let (code, answer) = send(&a, Ok(()), Duration::from_secs(5), request("PATCH", path, &["If-Match: x"], body)).await;
    assert_eq!(code, 400, "{answer}");
    // Each write is counted by its result (the unreadable If-Match never
    // reached a write).
    let (_, metrics) = call(&a, "GET", "/v1/metrics", "").await;
    for (result, n) in [("applied", 1), ("conflict", 1), ("invalid", 0)] {
        let line = format!("mesh_state_writes_total{{result=\"{result}\"}} {n}\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn unknown_routes_say_where_the_api_is() {
    let a = api("routes", None);
    let (code, body) = call(&a, "GET", "/v1/things", "").await;
    assert_eq!(code, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("see `mesh-daemon reference api`"), "{body}");
    let (code, body) = call(&a, "GET", "/state", "").await;
    assert_eq!(code, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("the API is under /v1/"), "{body}");
    let (code, _) = call(&a, "POST", "/v1/state", "{}").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_caller_not_allowed_gets_403_naming_who_may() {
    let a = api("forbidden", None);
    let no = Forbidden::NotAllowed { uid: 1000, who_may: "only root may (give --api-group to let a group in)".into() };
    let (code, body) = send(&a, Err(no), Duration::from_secs(5), request("GET", "/v1/state", &[], "")).await;
    assert_eq!(code, 403);
    assert_eq!(
        json(&body)["error"].as_str().unwrap(),
        "uid 1000 may not use the mesh API: only root may (give --api-group to let a group in)"
    );
}

#[tokio::test]
async fn a_state_managed_by_discovery_is_read_only() {
    let a = api("managed", Some("Kubernetes discovery"));
    let (code, _) = call(&a, "GET", "/v1/state", "").await;
    assert_eq!(code, 200);
    let (code, body) = call(&a, "DELETE", "/v1/services/default/web", "").await;
    assert_eq!(code, 403);
    assert!(json(&body)["error"].as_str().unwrap().contains("managed by Kubernetes discovery"), "{body}");
}

#[tokio::test]
async fn a_body_too_large_or_too_slow_is_refused_before_anything_changes() {
    let a = api("limits", None);
    let head = format!(
        "PUT /v1/state HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        (16 << 20) + 1
    );
    let (code, body) = send(&a, Ok(()), Duration::from_secs(5), head.into_bytes()).await;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("larger than 16 MiB"), "{body}");
    // Ten bytes declared, two sent: the body timeout (here 200 ms) answers.
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let served = tokio::spawn(serve_connection(server, a.control.clone(), Ok(()), Duration::from_millis(200)));
    client.write_all(b"PUT /v1/state HTTP/1.1\r\nHost: mesh\r\nContent-Length: 10\r\n\r\n{}").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 200ms"), "{text}");
    drop(client);
    let _ = served.await;
    assert_eq!(a.control.snapshot().generation, 1);
}

#[tokio::test]
async fn an_ipv6_endpoint_is_found_however_its_address_is_spelled() {
    let a = api("six", None);
    let svc =
        r#"{"vips": ["fd00:96::20"], "ports": [{"port": 80}], "endpoints": [{"ip": "fd00:0:0::9", "node": "a"}]}"#;
    let (code, body) = call(&a, "PUT", "/v1/services/default/six", svc).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(&a, "PATCH", "/v1/services/default/six/endpoints/fd00::9", r#"{"weight": 0}"#).await;
    assert_eq!(code, 200, "{body}");
    let state = a.control.snapshot().state.clone();
    let six = state.services.iter().find(|s| s.name.as_str() == "six").unwrap();
    assert_eq!((six.endpoints[0].ip.to_string(), six.endpoints[0].weight), ("fd00:0:0::9".to_owned(), 0));
}

#[tokio::test]
async fn a_dry_run_names_what_a_write_would_change_and_changes_nothing() {
    let a = api("dry-run", None);
    let (_, body) = call(&a, "GET", "/v1/state", "").await;
    let before = json(&body);
    let generation = before["generation"].as_u64().unwrap();
    let mut doc = before["state"].clone();
    let services = doc["services"].as_array_mut().unwrap();
    services[0]["endpoints"][0]["weight"] = serde_json::json!(0);
    let name =
        format!("{}/{}", services[0]["namespace"].as_str().unwrap_or("default"), services[0]["name"].as_str().unwrap());
    let ip = services[0]["endpoints"][0]["ip"].as_str().unwrap().to_owned();
    let (code, body) = call(&a, "PUT", "/v1/state?dryRun=true", &doc.to_string()).await;
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!((v["dryRun"].as_bool(), v["generation"].as_u64()), (Some(true), Some(generation)), "{body}");
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{body}");
    assert_eq!(changes[0]["kind"], "endpoint");
    assert_eq!(changes[0]["name"], format!("{name} {ip}"));
    assert_eq!(changes[0]["change"], "changed");
    assert!(changes[0]["detail"].as_str().unwrap().ends_with("-> 0"), "{body}");
    // Checked as a write: a bad document is refused with its fields.
    services_bad(&mut doc);
    let (code, body) = call(&a, "PUT", "/v1/state?dryRun=true", &doc.to_string()).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("10.96.0.300"), "{body}");
    assert_eq!(a.control.snapshot().generation, generation, "nothing was applied");
    let (_, after) = call(&a, "GET", "/v1/state", "").await;
    assert_eq!(json(&after), before, "the state is as it was");
}

fn services_bad(doc: &mut serde_json::Value) {
    doc["services"][0]["vip"] = serde_json::json!("10.96.0.300");
}

#[tokio::test]
async fn every_route_of_the_reference_is_served() {
    let a = api("route-table", None);
    let (_, state) = call(&a, "GET", "/v1/state", "").await;
    let state = json(&state)["state"].clone();
    let doc = |kind: &str, find: &dyn Fn(&serde_json::Value) -> bool| {
        state[kind].as_array().unwrap().iter().find(|v| find(v)).unwrap().to_string()
    };
    let node = doc("nodes", &|n| n["name"] == "b");
    let workload = doc("workloads", &|w| w["name"] == "client");
    let service = doc("services", &|s| s["name"] == "web");
    // Writes last: a DELETE takes what the reads and PUTs found.
    let mut routes: Vec<&ApiRoute> = ROUTES.iter().collect();
    routes.sort_by_key(|r| r.method == "DELETE");
    for r in routes {
        let path = match r.path {
            p if p.starts_with("/v1/nodes/") => p.replace("NAME", "b"),
            p if p.starts_with("/v1/workloads/") => p.replace("NS/NAME", "default/client"),
            p => p.replace("NS/NAME", "default/web").replace("IP", "10.244.2.4"),
        };
        let body = match (r.method, r.path) {
            ("PUT", "/v1/state" | "/v1/state?dryRun=true") => state.to_string(),
            ("PUT", p) if p.starts_with("/v1/nodes/") => node.clone(),
            ("PUT", p) if p.starts_with("/v1/workloads/") => workload.clone(),
            ("PUT", _) => service.clone(),
            ("PATCH", _) => r#"{"weight": 7}"#.to_owned(),
            _ => String::new(),
        };
        let (code, answer) = call(&a, r.method, &path, &body).await;
        // Routed: answered by its handler, not as an unknown route
        // (a node still in use is refused by validation, which is served).
        let served = match (r.method, r.path) {
            (_, "/v1/datapath") => code == 503,
            ("DELETE", "/v1/nodes/NAME") => code == 400 && answer.contains("is not in `nodes`"),
            _ => code == 200,
        };
        assert!(served, "{} {path}: {code} {answer}", r.method);
    }
}
