//! A small stand-in for the Kubernetes API server, enough for the daemon's
//! discovery and the issuer: cluster-wide list and watch of Services,
//! EndpointSlices, Namespaces and Pods; GET of one Pod or Namespace; pods
//! listed per namespace with a `spec.nodeName` field selector; and
//! TokenReviews of the tokens a test registers ([`FakeApiServer::add_token`]),
//! over plain HTTP in a test's network namespace.
//!
//! Lists carry a resourceVersion; a watch from version N first replays
//! every change after N, then streams new ones as JSON lines, as the real
//! server does. Objects are `serde_json::Value`s shaped as the API
//! returns them. [`FakeApiServer::set_down`] makes an outage: connections
//! are closed without an answer (as when the API server restarts) and open
//! watches are cut.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::sys;

/// (collection path, namespace, name)
type Key = (String, String, String);

struct Change {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    changes: Vec<Change>,
    /// Collections that are down ("*": all).
    down: Vec<String>,
    /// Bumped to end every open watch.
    epoch: u64,
    /// Request lines seen, for failure messages.
    requests: Vec<String>,
    /// Token -> what a TokenReview says of it.
    tokens: BTreeMap<String, Token>,
    /// Whether the Gateway API's CRDs are installed: HTTPRoute and
    /// GRPCRoute are served (else their collections answer 404).
    gateway_api: bool,
    /// Istio's AuthorizationPolicy CRD is installed.
    istio: bool,
}

/// A token the stand-in accepts, as the real server would review a
/// projected service-account token.
#[derive(Clone, Debug)]
pub struct Token {
    /// `system:serviceaccount:NS:NAME`.
    pub username: String,
    pub audiences: Vec<String>,
    /// (name, uid) of the pod it is bound to.
    pub pod: Option<(String, String)>,
    /// The node it was issued on (Kubernetes 1.32+ says).
    pub node: Option<String>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// The collection an object belongs to, from its apiVersion and kind.
fn collection(obj: &Value) -> anyhow::Result<String> {
    let plural = match obj["kind"].as_str() {
        Some("Service") => "services",
        Some("Pod") => "pods",
        Some("Namespace") => "namespaces",
        Some("EndpointSlice") => "endpointslices",
        Some("HTTPRoute") => "httproutes",
        Some("GRPCRoute") => "grpcroutes",
        Some("ReferenceGrant") => "referencegrants",
        Some("AuthorizationPolicy") => "authorizationpolicies",
        other => bail!("the fake API server does not serve kind {other:?}"),
    };
    Ok(match obj["apiVersion"].as_str() {
        Some("v1") => format!("/api/v1/{plural}"),
        Some(group) => format!("/apis/{group}/{plural}"),
        None => bail!("object without apiVersion: {obj}"),
    })
}

fn key(obj: &Value) -> anyhow::Result<Key> {
    let m = &obj["metadata"];
    let name = m["name"].as_str().context("object without metadata.name")?;
    Ok((collection(obj)?, m["namespace"].as_str().unwrap_or_default().to_owned(), name.to_owned()))
}

impl FakeApiServer {
    /// Listens on `ip`:(any port) inside `netns`, serving `objects`.
    pub fn start(netns: &Path, ip: std::net::Ipv4Addr, objects: Vec<Value>) -> anyhow::Result<Self> {
        let listener = sys::in_netns(netns, || TcpListener::bind((ip, 0)))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = FakeApiServer { addr, state: state.clone(), stop: stop.clone(), accept: None };
        for o in objects {
            server.put(o)?;
        }
        server.accept = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (state, stop) = (state.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, &state, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        Ok(server)
    }

    /// A kubeconfig for this server, written to `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Adds or replaces an object (ADDED or MODIFIED to watchers).
    pub fn put(&self, mut obj: Value) -> anyhow::Result<()> {
        let k = key(&obj)?;
        let mut s = self.state.lock().map_err(|_| anyhow::anyhow!("fake API server state poisoned"))?;
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let kind = if s.objects.contains_key(&k) { "MODIFIED" } else { "ADDED" };
        let (rv, collection) = (s.rv, k.0.clone());
        s.objects.insert(k, obj.clone());
        s.changes.push(Change { rv, collection, kind, object: obj });
        Ok(())
    }

    /// The stored object of `kind` `ns/name` (ns empty for cluster-scoped ones).
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let probe = json!({ "apiVersion": api_version, "kind": kind });
        let c = collection(&probe).ok()?;
        self.state.lock().ok()?.objects.get(&(c, ns.to_owned(), name.to_owned())).cloned()
    }

    /// Changes a stored object with `edit` and stores it again.
    pub fn edit(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> anyhow::Result<()> {
        let mut o = self.get(api_version, kind, ns, name).with_context(|| format!("no {kind} {ns}/{name}"))?;
        edit(&mut o);
        self.put(o)
    }

    /// Removes an object (DELETED to watchers).
    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> anyhow::Result<()> {
        let mut obj = self.get(api_version, kind, ns, name).with_context(|| format!("no {kind} {ns}/{name}"))?;
        let k = key(&obj)?;
        let mut s = self.state.lock().map_err(|_| anyhow::anyhow!("fake API server state poisoned"))?;
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let (rv, collection) = (s.rv, k.0.clone());
        s.objects.remove(&k);
        s.changes.push(Change { rv, collection, kind: "DELETED", object: obj });
        Ok(())
    }

    /// While down, every connection is closed unanswered and open watches
    /// are cut.
    pub fn set_down(&self, down: bool) {
        self.set_down_only(if down { &["*"] } else { &[] });
    }

    /// Installs Istio's AuthorizationPolicy CRD: served from now on.
    pub fn install_istio(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.istio = true;
        }
    }

    /// Installs the Gateway API's CRDs: HTTPRoute, GRPCRoute and
    /// ReferenceGrant are served from now on.
    pub fn install_gateway_api(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.gateway_api = true;
        }
    }

    /// Only these collections (e.g. `/api/v1/pods`) are down.
    pub fn set_down_only(&self, paths: &[&str]) {
        if let Ok(mut s) = self.state.lock() {
            s.down = paths.iter().map(|p| (*p).to_owned()).collect();
            s.epoch += 1;
        }
    }

    /// Registers a token that TokenReviews will accept.
    pub fn add_token(&self, token: &str, t: Token) {
        if let Ok(mut s) = self.state.lock() {
            s.tokens.insert(token.to_owned(), t);
        }
    }

    /// The request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().map(|s| s.requests.clone()).unwrap_or_default()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A JSON answer; with `close` the connection ends after it (lists and
/// unknown paths), otherwise it stays open for the next request.
fn respond(conn: &mut TcpStream, status: &str, body: &Value, close: bool) -> std::io::Result<()> {
    let body = body.to_string();
    let connection = if close { "Connection: close\r\n" } else { "" };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
}

/// `%XX` escapes and `+` of a query string, decoded.
fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the request's head and body (by Content-Length or chunked).
fn read_request(reader: &mut BufReader<TcpStream>) -> anyhow::Result<(String, Vec<u8>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let (mut length, mut chunked) = (0usize, false);
    let mut h = String::new();
    while reader.read_line(&mut h)? > 2 {
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        h.clear();
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)?;
            let mut chunk = vec![0u8; n + 2];
            std::io::Read::read_exact(reader, &mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        std::io::Read::read_exact(reader, &mut body)?;
    }
    Ok((line, body))
}

fn not_found_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}

/// What a TokenReview of `body` answers.
fn review(tokens: &BTreeMap<String, Token>, body: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> =
        req["spec"]["audiences"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let status = match tokens.get(token) {
        Some(t) if wanted.is_empty() || wanted.iter().any(|w| t.audiences.iter().any(|a| a == w)) => {
            let mut extra = serde_json::Map::new();
            if let Some((name, uid)) = &t.pod {
                extra.insert("authentication.kubernetes.io/pod-name".into(), json!([name]));
                extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
            }
            if let Some(n) = &t.node {
                extra.insert("authentication.kubernetes.io/node-name".into(), json!([n]));
            }
            let audiences: Vec<&str> =
                if wanted.is_empty() { t.audiences.iter().map(String::as_str).collect() } else { wanted };
            json!({ "authenticated": true, "audiences": audiences,
                    "user": { "username": t.username, "groups": ["system:serviceaccounts"], "extra": extra } })
        }
        Some(_) => json!({ "authenticated": false, "error": "token audiences do not match" }),
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
    };
    json!({ "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "spec": req["spec"], "status": status })
}

fn serve(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> anyhow::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    // Clients keep the connection for more requests (the issuer's does).
    loop {
        let (line, body) = match read_request(&mut reader) {
            Ok((l, b)) if !l.is_empty() => (l, b),
            _ => return Ok(()),
        };
        if !answer(&mut conn, &line, &body, state, stop)? {
            return Ok(());
        }
    }
}

/// Answers one request; false when the connection is done (a watch, an
/// outage).
fn answer(
    conn: &mut TcpStream,
    line: &str,
    body: &[u8],
    state: &Mutex<State>,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    let method = line.split_whitespace().next().unwrap_or_default().to_owned();
    let target = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| unescape(v)))
    };
    let mut s = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    s.requests.push(line.trim_end().to_owned());
    if s.down.iter().any(|d| d == "*" || d == path) {
        // Closed without an answer, as by a server that goes away.
        return Ok(false);
    }
    if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let r = review(&s.tokens, body);
        drop(s);
        respond(conn, "201 Created", &r, false)?;
        return Ok(true);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // A merge patch of a route's status subresource, as a controller writes it.
    if let ("PATCH", ["apis", group, "v1", "namespaces", ns, plural, name, "status"]) =
        (method.as_str(), segments.as_slice())
    {
        let k = (format!("/apis/{group}/v1/{plural}"), (*ns).to_owned(), (*name).to_owned());
        let Some(mut obj) = s.objects.get(&k).cloned() else {
            drop(s);
            respond(conn, "404 Not Found", &not_found_status(), false)?;
            return Ok(true);
        };
        let patch: Value = serde_json::from_slice(body).context("a PATCH body that is not JSON")?;
        merge_patch(&mut obj["status"], &patch["status"]);
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let (rv, collection) = (s.rv, k.0.clone());
        s.objects.insert(k, obj.clone());
        s.changes.push(Change { rv, collection, kind: "MODIFIED", object: obj.clone() });
        drop(s);
        respond(conn, "200 OK", &obj, false)?;
        return Ok(true);
    }
    // One object: /api/v1/namespaces/NAME and /api/v1/namespaces/NS/pods/NAME.
    let one = match segments.as_slice() {
        ["api", "v1", "namespaces", name] => Some(("/api/v1/namespaces".to_owned(), String::new(), (*name).to_owned())),
        ["api", "v1", "namespaces", ns, "pods", name] => {
            Some(("/api/v1/pods".to_owned(), (*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    };
    if let Some(k) = one {
        let found = s.objects.get(&k).cloned();
        drop(s);
        match found {
            Some(o) => respond(conn, "200 OK", &o, false)?,
            None => respond(conn, "404 Not Found", &not_found_status(), false)?,
        }
        return Ok(true);
    }
    // Pods of one namespace: /api/v1/namespaces/NS/pods, maybe on one node.
    let (collection, only_ns) = match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods"] => ("/api/v1/pods".to_owned(), Some((*ns).to_owned())),
        _ => (path.to_owned(), None),
    };
    let node = param("fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=").map(str::to_owned));
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|(k, _)| k.0 == collection && only_ns.as_ref().is_none_or(|ns| *ns == k.1))
        .filter(|(_, v)| node.as_ref().is_none_or(|n| v["spec"]["nodeName"].as_str() == Some(n)))
        .map(|(_, v)| v.clone())
        .collect();
    let (epoch, rv, gateway_api, istio) = (s.epoch, s.rv, s.gateway_api, s.istio);
    drop(s);
    let known = ["/api/v1/services", "/api/v1/pods", "/api/v1/namespaces", "/apis/discovery.k8s.io/v1/endpointslices"];
    let routes = [
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
    ];
    let istio = istio && collection == "/apis/security.istio.io/v1/authorizationpolicies";
    let served =
        known.contains(&collection.as_str()) || (gateway_api && routes.contains(&collection.as_str())) || istio;
    if !served {
        respond(conn, "404 Not Found", &not_found_status(), true)?;
        return Ok(false);
    }
    if param("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        watch(conn.try_clone()?, state, stop, &collection, from, epoch)?;
        return Ok(false);
    }
    let kind = match collection.rsplit('/').next() {
        Some("services") => "ServiceList",
        Some("pods") => "PodList",
        Some("namespaces") => "NamespaceList",
        Some("httproutes") => "HTTPRouteList",
        Some("grpcroutes") => "GRPCRouteList",
        Some("referencegrants") => "ReferenceGrantList",
        Some("authorizationpolicies") => "AuthorizationPolicyList",
        _ => "EndpointSliceList",
    };
    let api_version = match (collection.split('/').nth(2), collection.split('/').nth(3)) {
        (Some("v1"), _) | (None, _) => "v1".to_owned(),
        (Some(group), Some(version)) => format!("{group}/{version}"),
        (Some(group), None) => format!("{group}/v1"),
    };
    let body = json!({ "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": rv.to_string() }, "items": items });
    respond(conn, "200 OK", &body, true)?;
    Ok(false)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes,
/// anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in p {
        if v.is_null() {
            target.as_object_mut().map(|t| t.remove(k));
        } else {
            merge_patch(&mut target[k], v);
        }
    }
}

/// Streams the changes of `path` after version `from` until the epoch
/// changes (outage), the server stops, or the client goes away.
fn watch(
    mut conn: TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    path: &str,
    mut from: u64,
    epoch: u64,
) -> anyhow::Result<()> {
    // Delimited by closing: no length, no chunks.
    write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")?;
    while !stop.load(Ordering::Relaxed) {
        let lines: Vec<String> = {
            let s = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            if s.epoch != epoch {
                return Ok(());
            }
            let new: Vec<&Change> = s.changes.iter().filter(|c| c.rv > from && c.collection == path).collect();
            from = from.max(s.rv);
            new.iter().map(|c| json!({ "type": c.kind, "object": c.object }).to_string() + "\n").collect()
        };
        for l in lines {
            conn.write_all(l.as_bytes())?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
