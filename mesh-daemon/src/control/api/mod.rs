//! The control API: HTTP/1.1 + JSON over a Unix socket.
//!
//! Callers are checked by SO_PEERCRED: root, or members of `--api-group`.
//! Reads come from the last accepted state; writes go through
//! [`Control::write`] (validated whole, saved, synced to the kernel before
//! the answer). Request bodies may be JSON or YAML.
//!
//! The routes are in [`ROUTES`] (the reference page is generated from it).
//! Writes answer `{"generation": N}`; `If-Match: N` makes a write fail
//! with 409 when the state is no longer at generation N.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::drain::Drain;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tracing::info;

use super::{Control, StartError, WriteError};
use crate::model::{Document, EndpointDoc, FieldError, NodeDoc, ServiceDoc, ValidationErrors, WorkloadDoc};

const MAX_BODY: usize = 16 << 20;

/// One route of the control API, as the reference page lists it
/// (`mesh-daemon reference api`; a test calls each one).
#[derive(Debug, Clone, Copy)]
pub struct ApiRoute {
    pub method: &'static str,
    /// With `NS`, `NAME` and `IP` where the item's names go.
    pub path: &'static str,
    /// The request body, if any.
    pub body: &'static str,
    /// What it answers.
    pub answer: &'static str,
}

/// Every route the control API serves.
pub const ROUTES: &[ApiRoute] = &[
    ApiRoute {
        method: "GET",
        path: "/v1/status",
        body: "",
        answer: "The node, the state's generation, counts of nodes, workloads, services and endpoints, readiness \
                 (`ready`, `notReadyReason`) and the kernel programs' counters",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/state",
        body: "",
        answer: "`{\"generation\": N, \"state\": {...}}`: the accepted document",
    },
    ApiRoute {
        method: "PUT",
        path: "/v1/state",
        body: "The whole document (JSON or YAML)",
        answer: "`{\"generation\": N}`; 400 with every field's error, 409 when `If-Match` is stale",
    },
    ApiRoute {
        method: "PUT",
        path: "/v1/state?dryRun=true",
        body: "The whole document",
        answer:
            "`{\"dryRun\": true, \"generation\": N, \"changes\": [{\"kind\", \"name\", \"change\", \"detail\"}]}`: \
                 what the write would add, remove and change, checked as the write; nothing is applied",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/stats",
        body: "",
        answer: "One row per service port and endpoint: connections, bytes, requests by class, rate, \
                 latency quantiles (`?buckets=true` adds the latency sketch)",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/stats/routes",
        body: "",
        answer: "One row per route rule that decided a request: requests, success rate, rate, latency quantiles \
                 and the latency sketch",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/endpoints",
        body: "",
        answer: "Every endpoint with its configured and effective weight, priority, health and latency",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/datapath",
        body: "",
        answer: "What the kernel maps hold now (503 before the datapath is attached)",
    },
    ApiRoute {
        method: "GET",
        path: "/v1/metrics",
        body: "",
        answer: "The Prometheus text, as the admin endpoint's `/metrics`",
    },
    ApiRoute { method: "GET", path: "/v1/nodes", body: "", answer: "The state's nodes" },
    ApiRoute { method: "GET", path: "/v1/nodes/NAME", body: "", answer: "One node; 404 when it is not in the state" },
    ApiRoute {
        method: "PUT",
        path: "/v1/nodes/NAME",
        body: "A node",
        answer: "`{\"generation\": N}`: added or replaced",
    },
    ApiRoute { method: "DELETE", path: "/v1/nodes/NAME", body: "", answer: "`{\"generation\": N}`: removed" },
    ApiRoute { method: "GET", path: "/v1/workloads", body: "", answer: "The state's workloads (pods)" },
    ApiRoute { method: "GET", path: "/v1/workloads/NS/NAME", body: "", answer: "One workload" },
    ApiRoute {
        method: "PUT",
        path: "/v1/workloads/NS/NAME",
        body: "A workload",
        answer: "`{\"generation\": N}`: added or replaced",
    },
    ApiRoute { method: "DELETE", path: "/v1/workloads/NS/NAME", body: "", answer: "`{\"generation\": N}`: removed" },
    ApiRoute { method: "GET", path: "/v1/services", body: "", answer: "The state's services" },
    ApiRoute { method: "GET", path: "/v1/services/NS/NAME", body: "", answer: "One service" },
    ApiRoute {
        method: "PUT",
        path: "/v1/services/NS/NAME",
        body: "A service",
        answer: "`{\"generation\": N}`: added or replaced; errors name fields relative to the body",
    },
    ApiRoute { method: "DELETE", path: "/v1/services/NS/NAME", body: "", answer: "`{\"generation\": N}`: removed" },
    ApiRoute {
        method: "PATCH",
        path: "/v1/services/NS/NAME/endpoints/IP",
        body: "`{\"weight\": N}`",
        answer: "`{\"generation\": N}`: the endpoint's weight changed (however the IP is spelled)",
    },
];

type Reply = Response<Full<Bytes>>;

/// Who may call: root, and members of this group.
#[derive(Debug, Clone, Default)]
pub struct Access {
    group: Option<(String, u32, Vec<String>)>,
}

impl Access {
    /// `group`: a group name from the system's group database.
    pub fn new(group: Option<&str>) -> Result<Self, StartError> {
        let Some(name) = group else {
            return Ok(Self::default());
        };
        let g = nix::unistd::Group::from_name(name)?.ok_or_else(|| StartError::NoGroup(name.to_owned()))?;
        Ok(Self { group: Some((name.to_owned(), g.gid.as_raw(), g.mem)) })
    }

    fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 {
            return true;
        }
        let Some((_, group, members)) = &self.group else {
            return false;
        };
        if gid == *group {
            return true;
        }
        // Supplementary groups of the calling process.
        if let Some(pid) = pid {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(line) = status.lines().find(|l| l.starts_with("Groups:")) {
                    if line.split_whitespace().skip(1).any(|g| g.parse() == Ok(*group)) {
                        return true;
                    }
                }
            }
        }
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .is_some_and(|u| members.contains(&u.name))
    }

    fn who_may(&self) -> String {
        match &self.group {
            Some((name, _, _)) => format!("only root and members of group {name} may"),
            None => "only root may (give --api-group to let a group in)".to_owned(),
        }
    }
}

/// Creates the socket's folder (0750), replaces a stale socket, and
/// listens with mode 0660 (group: the API group).
pub fn bind(path: &Path, access: &Access) -> Result<UnixListener, StartError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)?;
            if let Some((_, gid, _)) = &access.group {
                nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(*gid)))?;
            }
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some((_, gid, _)) = &access.group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(*gid)))?;
    }
    info!(socket = %path.display(), "control API listening");
    Ok(listener)
}

/// Connections the control API serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;

/// Why a caller may not use the API (answered 403).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Forbidden {
    #[error("uid {uid} may not use the mesh API: {who_may}")]
    NotAllowed { uid: u32, who_may: String },
    #[error("cannot read the caller's credentials: {0}")]
    NoCredentials(String),
}

pub async fn serve(
    listener: UnixListener,
    control: Arc<Control>,
    access: Arc<Access>,
    header_timeout: Duration,
    drain: Drain,
) {
    let gate = crate::drain::Gate::new("control API", MAX_CONNECTIONS);
    crate::drain::accept_loop(listener, "control API", drain, move |stream, _| {
        let Some(pass) = gate.enter() else { return };
        let allowed = match stream.peer_cred() {
            Ok(c) => access
                .allows(c.uid(), c.gid(), c.pid())
                .then_some(())
                .ok_or_else(|| Forbidden::NotAllowed { uid: c.uid(), who_may: access.who_may() }),
            Err(e) => Err(Forbidden::NoCredentials(e.to_string())),
        };
        let control = control.clone();
        tokio::spawn(async move {
            let _pass = pass;
            serve_connection(stream, control, allowed, header_timeout).await;
        });
    })
    .await;
}

/// Serves one API connection; `allowed` is whether its caller may use
/// the API (the fuzz target of the request handling passes Ok). A
/// request's head and its body each have `header_timeout` to arrive.
pub(crate) async fn serve_connection<IO>(
    io: IO,
    control: Arc<Control>,
    allowed: Result<(), Forbidden>,
    header_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let control = control.clone();
        let allowed = allowed.clone();
        async move {
            Ok::<_, Infallible>(match allowed {
                Ok(()) => handle(req, control, header_timeout).await,
                Err(e) => error(StatusCode::FORBIDDEN, &e.to_string()),
            })
        }
    });
    crate::drain::serve_local_http1(io, svc, header_timeout, "control API").await;
}

fn respond(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    respond(status, &json!({ "error": msg }))
}

fn bad(msg: &str) -> Box<Reply> {
    Box::new(error(StatusCode::BAD_REQUEST, msg))
}

fn invalid(errors: &ValidationErrors) -> Response<Full<Bytes>> {
    respond(
        StatusCode::BAD_REQUEST,
        &json!({
            "error": format!("the request is invalid: {} bad field(s); nothing was changed", errors.0.len()),
            "fields": errors.0.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>(),
        }),
    )
}

fn write_error(e: WriteError) -> Response<Full<Bytes>> {
    match e {
        WriteError::Conflict { current, .. } => {
            respond(StatusCode::CONFLICT, &json!({ "error": e.to_string(), "generation": current }))
        }
        WriteError::Invalid(v) => invalid(&v),
        WriteError::NotFound(m) => error(StatusCode::NOT_FOUND, &m),
        WriteError::Stopped | WriteError::HandingOver => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Runs a write off the async runtime (it does file and bpf system calls).
async fn write(
    control: &Arc<Control>,
    if_match: Option<u64>,
    edit: impl FnOnce(&mut Document) -> Result<(), WriteError> + Send + 'static,
) -> Response<Full<Bytes>> {
    let c = control.clone();
    match tokio::task::spawn_blocking(move || c.write(if_match, edit)).await {
        Ok(Ok(generation)) => {
            // What the routes of this state name but cannot use: said to
            // the writer, who may have a typo to mend.
            let warnings = match control.unresolved_refs() {
                (g, w) if g == generation => w,
                _ => Vec::new(),
            };
            let mut body = json!({ "generation": generation });
            if !warnings.is_empty() {
                body["warnings"] = json!(warnings);
            }
            respond(StatusCode::OK, &body)
        }
        Ok(Err(e)) => write_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("write failed: {e}")),
    }
}

async fn body_bytes(req: Request<Incoming>, within: Duration) -> Result<Bytes, Box<Reply>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {} MiB; nothing was changed", MAX_BODY >> 20),
        ))
    };
    // A declared length past the limit is refused before any of it is read.
    if hyper::body::Body::size_hint(req.body()).lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let body = tokio::time::timeout(within, Limited::new(req.into_body(), MAX_BODY).collect()).await.map_err(|_| {
        Box::new(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("the body did not arrive within {within:?} (--client-header-timeout)"),
        ))
    })?;
    let body = body.map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
        Some(_) => too_large(),
        None => bad(&format!("cannot read the body: {e}")),
    })?;
    Ok(body.to_bytes())
}

fn value_of(bytes: &[u8]) -> Result<Value, Box<Reply>> {
    serde_yaml::from_slice(bytes).map_err(|e| bad(&format!("the body is not valid JSON or YAML: {e}")))
}

async fn body_value(req: Request<Incoming>, within: Duration) -> Result<Value, Box<Reply>> {
    value_of(&body_bytes(req, within).await?)
}

/// The body as a `T`: read straight from JSON or YAML (a large state
/// parsed through a generic value would cost its size over again). The
/// YAML parser's error names the field's path (`services[0].ports[0]:
/// unknown field ...`), as `meshctl validate` and the config loader do.
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Box<Reply>> {
    if let Ok(t) = serde_json::from_slice(bytes) {
        return Ok(t);
    }
    serde_yaml::from_slice(bytes).map_err(|e| match value_of(bytes) {
        Ok(_) => bad(&format!("the body is not a valid object: {e}")),
        Err(not_yaml) => not_yaml,
    })
}

/// Sets `key` of an object body from the URL, or checks it matches.
fn url_field(v: &mut Value, key: &str, from_url: &str) -> Result<(), Box<Reply>> {
    let Some(obj) = v.as_object_mut() else {
        return Err(bad("the body must be an object"));
    };
    match obj.get(key) {
        None => {
            obj.insert(key.to_owned(), Value::String(from_url.to_owned()));
            Ok(())
        }
        Some(Value::String(s)) if s == from_url => Ok(()),
        Some(other) => Err(bad(&format!("{key}: {other} does not match the URL's {from_url:?}"))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Box<Reply>> {
    serde_json::from_value(v).map_err(|e| bad(&format!("the body is not a valid object: {e}")))
}

fn if_match(req: &Request<Incoming>) -> Result<Option<u64>, Box<Reply>> {
    match req.headers().get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .map(|s| s.trim().trim_matches('"'))
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| bad("If-Match: give the generation number, e.g. If-Match: 12")),
    }
}

/// Rewrites errors of `prefix` (the edited item, e.g. `services[3]`) to be
/// relative to the request body.
fn relative(v: ValidationErrors, prefix: &str) -> ValidationErrors {
    ValidationErrors(
        v.0.into_iter()
            .map(|e| match e.path.strip_prefix(prefix) {
                Some(rest) => FieldError { path: rest.trim_start_matches('.').to_owned(), message: e.message },
                None => e,
            })
            .map(|e| if e.path.is_empty() { FieldError { path: "(body)".into(), ..e } } else { e })
            .collect(),
    )
}

/// Puts `item` into `list` where `same` finds it, or at the end; returns the index.
fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) -> usize {
    match list.iter().position(same) {
        Some(i) => {
            list[i] = item;
            i
        }
        None => {
            list.push(item);
            list.len() - 1
        }
    }
}

/// PUT of one item: upserts it and reports its errors relative to the body.
async fn put_item<T: Send + 'static>(
    control: &Arc<Control>,
    m: Option<u64>,
    kind: &'static str,
    item: T,
    place: impl FnOnce(&mut Document, T) -> usize + Send + 'static,
) -> Response<Full<Bytes>> {
    let c = control.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut at = None;
        let r = c.write(m, |doc| {
            at = Some(place(doc, item));
            Ok(())
        });
        (r, at)
    })
    .await;
    match done {
        Ok((Ok(generation), _)) => respond(StatusCode::OK, &json!({ "generation": generation })),
        Ok((Err(WriteError::Invalid(v)), Some(i))) => invalid(&relative(v, &format!("{kind}[{i}]"))),
        Ok((Err(e), _)) => write_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("write failed: {e}")),
    }
}

/// One request; its body has `body_timeout` to arrive.
async fn handle(req: Request<Incoming>, control: Arc<Control>, body_timeout: Duration) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method().clone();
    let m = match if_match(&req) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    if method != Method::GET {
        if let Some(owner) = control.managed_by() {
            let msg = format!(
                "the state is managed by {owner}: change the cluster's objects instead (Services, EndpointSlices, \
                 Pods, the mesh.io/* annotations); this API only reads"
            );
            return error(StatusCode::FORBIDDEN, &msg);
        }
    }
    let w = Write { control: &control, if_match: m, body_timeout };
    match (&method, segs.as_slice()) {
        (&Method::GET, route) => match read(&control, route, query_flag(&req, "buckets")).await {
            Some(r) => r,
            None => unknown(&method, &path),
        },
        (&Method::PUT, ["v1", "state"]) if query_flag(&req, "dryRun") => w.state_dry_run(req).await,
        (&Method::PUT, ["v1", "state"]) => w.state(req).await,
        (&Method::PUT, ["v1", kind @ ("nodes" | "workloads" | "services"), rest @ ..]) => match (*kind, rest) {
            ("nodes", [name]) => w.node(req, name).await,
            ("workloads", [ns, name]) => w.workload(req, ns, name).await,
            ("services", [ns, name]) => w.service(req, ns, name).await,
            _ => error(StatusCode::NOT_FOUND, &format!("no such resource {path}")),
        },
        (&Method::DELETE, ["v1", "nodes", name]) => w.delete_node(name).await,
        (&Method::DELETE, ["v1", kind @ ("workloads" | "services"), ns, name]) => w.delete(kind, ns, name).await,
        (&Method::PATCH, ["v1", "services", ns, name, "endpoints", ip]) => w.weight(req, ns, name, ip).await,
        _ => unknown(&method, &path),
    }
}

/// Whether the query sets `flag` (`?flag=true`, or `?flag`).
fn query_flag(req: &Request<Incoming>, flag: &str) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&').any(|p| p == flag || p.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) == Some("true"))
    })
}

fn unknown(method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path == "/v1" || path.starts_with("/v1/") {
        error(
            StatusCode::NOT_FOUND,
            &format!("no such resource {method} {path}; see `mesh-daemon reference api` or docs/src/reference/api.md"),
        )
    } else {
        error(StatusCode::NOT_FOUND, &format!("no such resource {path}: the API is under /v1/"))
    }
}

/// A GET: what the state, the counters or the maps hold; None: no such
/// resource. With `buckets`, stats rows carry their latency sketch.
async fn read(control: &Arc<Control>, route: &[&str], buckets: bool) -> Option<Response<Full<Bytes>>> {
    let snap = control.snapshot();
    let doc = &snap.state;
    Some(match route {
        ["v1", "status"] => status(control, snap.generation, doc),
        ["v1", "stats"] => {
            let mut rows = control.stats_rows();
            if !buckets {
                rows.iter_mut().for_each(|r| r.latency_buckets = Vec::new());
            }
            respond(StatusCode::OK, &rows)
        }
        ["v1", "stats", "routes"] => respond(StatusCode::OK, &control.route_rows()),
        ["v1", "state"] => respond(StatusCode::OK, &json!({ "generation": snap.generation, "state": doc })),
        ["metrics"] | ["v1", "metrics"] => {
            let mut r = Response::new(Full::new(Bytes::from(control.render_metrics())));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(crate::telemetry::admin::METRICS_TYPE));
            r
        }
        ["v1", "datapath"] => {
            // Walks every map entry: off the async workers.
            let c = control.clone();
            match tokio::task::spawn_blocking(move || c.dump()).await {
                Ok(Ok(d)) => respond(StatusCode::OK, &d),
                Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("reading the maps failed: {e}")),
            }
        }
        ["v1", "nodes"] => respond(StatusCode::OK, &doc.nodes),
        ["v1", "nodes", name] => found(doc.nodes.iter().find(|n| n.name == *name), format!("node {name}")),
        ["v1", "workloads"] => respond(StatusCode::OK, &doc.workloads),
        ["v1", "workloads", ns, name] => {
            found(doc.workloads.iter().find(|w| w.namespace == *ns && w.name == *name), format!("workload {ns}/{name}"))
        }
        ["v1", "services"] => respond(StatusCode::OK, &doc.services),
        ["v1", "services", ns, name] => {
            found(doc.services.iter().find(|s| s.namespace == *ns && s.name == *name), format!("service {ns}/{name}"))
        }
        ["v1", "endpoints"] => respond(StatusCode::OK, &control.endpoints()),
        _ => return None,
    })
}

/// One item of the document, or 404 naming `what`.
fn found(item: Option<&impl Serialize>, what: String) -> Response<Full<Bytes>> {
    match item {
        Some(i) => respond(StatusCode::OK, i),
        None => error(StatusCode::NOT_FOUND, &format!("{what} not found")),
    }
}

/// `GET /v1/status`: the node, the generation, readiness and the kernel's
/// counters.
fn status(control: &Control, generation: u64, doc: &Document) -> Response<Full<Bytes>> {
    let ready = control.readiness();
    let stats: serde_json::Map<String, Value> = match control.kernel_stats() {
        Ok(s) => s.into_iter().map(|(s, v)| (s.name().to_owned(), v.into())).collect(),
        Err(e) => [("error".to_owned(), Value::String(e.to_string()))].into_iter().collect(),
    };
    respond(
        StatusCode::OK,
        &json!({
            "node": control.node().as_str(),
            "generation": generation,
            "nodes": doc.nodes.len(),
            "workloads": doc.workloads.len(),
            "services": doc.services.len(),
            "endpoints": doc.services.iter().map(|s| s.endpoints.len()).sum::<usize>(),
            "ready": ready.is_ok(),
            "notReadyReason": ready.err().map(|e| e.0),
            "datapath": { "reused_at_start": control.datapath_reused(), "stats": stats },
        }),
    )
}

mod write;
use write::Write;

#[cfg(test)]
mod tests;
