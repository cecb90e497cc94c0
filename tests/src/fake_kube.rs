//! A small stand-in for the Kubernetes API server, enough for the daemon's
//! discovery: cluster-wide list and watch of Services, EndpointSlices,
//! Namespaces and Pods, over plain HTTP in a test's network namespace.
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

    /// Only these collections (e.g. `/api/v1/pods`) are down.
    pub fn set_down_only(&self, paths: &[&str]) {
        if let Ok(mut s) = self.state.lock() {
            s.down = paths.iter().map(|p| (*p).to_owned()).collect();
            s.epoch += 1;
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

fn respond(conn: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> anyhow::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The rest of the head; requests here have no body.
    let mut h = String::new();
    while reader.read_line(&mut h)? > 2 {
        h.clear();
    }
    let target = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_owned()))
    };
    let (epoch, list) = {
        let mut s = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        s.requests.push(line.trim_end().to_owned());
        if s.down.iter().any(|d| d == "*" || d == path) {
            // Closed without an answer, as by a server that goes away.
            return Ok(());
        }
        let items: Vec<Value> = s.objects.iter().filter(|(k, _)| k.0 == path).map(|(_, v)| v.clone()).collect();
        (s.epoch, (items, s.rv))
    };
    let known = ["/api/v1/services", "/api/v1/pods", "/api/v1/namespaces", "/apis/discovery.k8s.io/v1/endpointslices"];
    if !known.contains(&path) {
        let status =
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
        return Ok(respond(&mut conn, "404 Not Found", &status)?);
    }
    if param("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        return watch(conn, state, stop, path, from, epoch);
    }
    let (items, rv) = list;
    let kind = match path.rsplit('/').next() {
        Some("services") => "ServiceList",
        Some("pods") => "PodList",
        Some("namespaces") => "NamespaceList",
        _ => "EndpointSliceList",
    };
    let api_version = if path.starts_with("/api/v1") { "v1" } else { "discovery.k8s.io/v1" };
    let body = json!({ "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": rv.to_string() }, "items": items });
    Ok(respond(&mut conn, "200 OK", &body)?)
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
