//! `meshctl`: the operator's CLI, a thin client of mesh-daemon's Unix-socket
//! API. Tables for people, `-o json` for scripts; exit code 0 only on
//! success.
#![forbid(unsafe_code)]

mod authz;
mod print;
mod routes;
mod top;
mod validate;

use print::{print_dump, print_list, s, table};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Drive mesh-daemon through its node-local API")]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "MESH_SOCKET", default_value = "/run/mesh/mesh.sock")]
    socket: PathBuf,
    /// Output: table (for people) or json (for scripts).
    #[arg(short, long, global = true, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// The daemon's node, state generation, sizes and kernel counters.
    Status,
    /// Check a state document offline, as the daemon would (its parser,
    /// validation and kernel map room), naming every bad field; needs no
    /// daemon. Exit 0 when valid, 1 otherwise.
    Validate {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// The daemon's --slot-table-size the document must fit.
        #[arg(long, default_value_t = mesh_daemon::model::DEFAULT_SLOT_TABLE_SIZE, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
        slot_table_size: u32,
        /// The daemon's --slot-entries the document must fit.
        #[arg(long, default_value_t = mesh_daemon::model::DEFAULT_SLOT_ENTRIES, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
        slot_entries: u32,
    },
    /// Print the state document's JSON Schema (what deploy/schema/ holds):
    /// for editors (a yaml-language-server modeline) and CI validators.
    /// Needs no daemon.
    Schema,
    /// Replace the whole state with a document (YAML or JSON).
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Apply only if the state is still at this generation.
        #[arg(long, value_name = "GENERATION")]
        if_match: Option<u64>,
        /// Show what would change (services, endpoints, routes, policies
        /// added, removed or changed), checked as the write would be,
        /// without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// List nodes, workloads, services or endpoints, or show one.
    Get {
        kind: Kind,
        /// A node name, or a workload or service as [NAMESPACE/]NAME (for
        /// endpoints: the service whose endpoints to list).
        name: Option<String>,
    },
    /// Set one endpoint's weight (0 drains it).
    SetWeight {
        /// [NAMESPACE/]NAME
        service: String,
        /// The endpoint's IP.
        endpoint: String,
        weight: i64,
        #[arg(long, value_name = "GENERATION")]
        if_match: Option<u64>,
    },
    /// Enroll a pod in the mesh.
    Enroll {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        ip: String,
        /// The pod's network namespace.
        #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
        netns: Option<String>,
        /// A process in the pod.
        #[arg(long)]
        pid: Option<i64>,
    },
    /// Take a pod out of the mesh.
    Unenroll {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Delete a node, workload or service.
    Delete { kind: DeleteKind, name: String },
    /// Per service and endpoint: connections, bytes, errors and the current
    /// EWMA of connect time, from the daemon's metrics.
    Stats,
    /// A live table per service and direction, refreshed every interval:
    /// requests/s, success, p50/p99 and bytes and connections per second
    /// over the interval, from the daemon's counters. Redraws on a
    /// terminal, prints one table per interval when piped, a JSON line
    /// per interval with -o json.
    Top {
        /// Seconds between refreshes (what each figure is taken over).
        #[arg(long, default_value_t = 2.0, value_parser = interval_secs)]
        interval: f64,
        /// Stop after this many refreshes (default: run until stopped).
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
    },
    /// What is in the kernel.
    Datapath {
        #[command(subcommand)]
        command: DatapathCmd,
    },
    /// Traffic routes (Gateway API HTTPRoute, GRPCRoute).
    Route {
        #[command(subcommand)]
        command: RouteCmd,
    },
    /// Authorization policies (Istio AuthorizationPolicy).
    Authz {
        #[command(subcommand)]
        command: AuthzCmd,
    },
}

#[derive(Subcommand)]
enum AuthzCmd {
    /// What the policies decide for a caller reaching a service, at each
    /// of its endpoints, and which policy and rule decided: the proxy's
    /// own evaluation, run on the daemon's current state.
    Check {
        /// The service, [NAMESPACE/]NAME.
        service: String,
        /// The caller's identity, spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT.
        #[arg(long)]
        from: String,
        /// The service port (default: its first).
        #[arg(long)]
        port: Option<u16>,
        /// On a request port: the request's method and path.
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// A request header, NAME=VALUE; repeat for more.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The caller's address (counted only if a workload of its
        /// identity has it, as the proxy does).
        #[arg(long)]
        ip: Option<String>,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Which route, rule and backends a request would take, and why: the
    /// proxy's own decision, run on the daemon's current state.
    Check {
        /// The service the client dials, [NAMESPACE/]NAME.
        service: String,
        /// The request, e.g. http://web/v2/items?x=1 (the port picks the
        /// service port; 80 when absent).
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, NAME=VALUE; repeat for more.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The client's namespace (consumer routes of that namespace
        /// apply to it).
        #[arg(long, value_name = "NAMESPACE")]
        from: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Nodes,
    Workloads,
    Services,
    Endpoints,
    Routes,
    Policies,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeleteKind {
    Node,
    Workload,
    Service,
}

#[derive(Subcommand)]
enum DatapathCmd {
    /// The maps decoded: services, slots and their backends, workloads, counters.
    Dump,
}

/// An answer of the API that is not a success.
struct ApiError {
    status: StatusCode,
    body: Value,
}

/// Sends one request to the daemon: (status, body bytes). A write refused
/// because a new daemon is taking over (a second or so) is sent again,
/// for up to 10 s.
async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
    if_match: Option<u64>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut tries = 0;
    loop {
        let (status, bytes) = send_once(socket, method.clone(), path, body.clone(), if_match).await?;
        let handing_over = status == StatusCode::SERVICE_UNAVAILABLE
            && String::from_utf8_lossy(&bytes).contains("a new mesh-daemon is taking over");
        if !handing_over || tries == 50 {
            return Ok((status, bytes));
        }
        if tries == 0 {
            eprintln!("meshctl: a new mesh-daemon is taking over on this node; retrying for up to 10 s");
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn send_once(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
    if_match: Option<u64>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow!("cannot reach mesh-daemon at {} (is it running?): {e}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header(hyper::header::HOST, "mesh-daemon");
    if let Some(g) = if_match {
        req = req.header(hyper::header::IF_MATCH, g.to_string());
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::from(body)))?).await.context("talking to mesh-daemon")?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// A GET whose answer is text (`/metrics`).
async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    if_match: Option<u64>,
) -> anyhow::Result<Result<Value, ApiError>> {
    let (status, bytes) = send(socket, method, path, body.unwrap_or_default(), if_match).await?;
    let body: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
    Ok(if status.is_success() { Ok(body) } else { Err(ApiError { status, body }) })
}

/// `--interval`: seconds, from 0.1 to an hour.
fn interval_secs(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if (0.1..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("{v:?}: give the seconds between refreshes, from 0.1 to 3600 (e.g. 2 or 0.5)")),
    }
}

/// `[ns/]name` -> (ns, name)
fn ns_name(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => ("default".to_owned(), s.to_owned()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sock = cli.socket.as_path();
    let json_out = cli.output == Output::Json;
    if let Cmd::Top { interval, iterations } = cli.command {
        return top::top(sock, std::time::Duration::from_secs_f64(interval), iterations, json_out).await;
    }
    if let Cmd::Schema = cli.command {
        println!("{}", serde_json::to_string_pretty(&mesh_daemon::model::schema())?);
        return Ok(());
    }
    if let Cmd::Validate { file, slot_table_size, slot_entries } = &cli.command {
        return match validate::run(file, *slot_table_size, *slot_entries, json_out)? {
            true => Ok(()),
            false => Err(Reported.into()),
        };
    }
    if let Cmd::Stats = cli.command {
        let rows = match call(sock, Method::GET, "/v1/stats", None, None).await? {
            Ok(Value::Array(rows)) => rows,
            Ok(other) => bail!("the daemon answered /v1/stats with {other}, not a list"),
            Err(ApiError { status, body }) => bail!("the daemon refused the request ({status}): {}", s(&body["error"])),
        };
        if json_out {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            table(
                &[
                    "SERVICE",
                    "ENDPOINT",
                    "OPENED",
                    "CLOSED",
                    "BYTES SENT",
                    "BYTES RECEIVED",
                    "SERVICE ERRORS",
                    "EWMA RTT(ms)",
                    "REQUESTS",
                    "RPS(10s)",
                    "SUCCESS",
                    "P50(ms)",
                    "P99(ms)",
                ],
                rows.iter()
                    .map(|r| {
                        vec![
                            s(&r["service"]),
                            format!("{} ({})", s(&r["endpoint"]), s(&r["direction"])),
                            s(&r["opened"]),
                            s(&r["closed"]),
                            s(&r["bytesSent"]),
                            s(&r["bytesReceived"]),
                            s(&r["serviceErrors"]),
                            r["ewmaRttMs"].as_f64().map_or("-".into(), |v| format!("{v:.2}")),
                            s(&r["requests"]),
                            r["ratePerSecond"].as_f64().map_or("-".into(), |v| format!("{v:.1}")),
                            r["successRate"].as_f64().map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
                            r["p50Ms"].as_f64().map_or("-".into(), |v| format!("{v:.2}")),
                            r["p99Ms"].as_f64().map_or("-".into(), |v| format!("{v:.2}")),
                        ]
                    })
                    .collect(),
            );
        }
        return Ok(());
    }
    if matches!(
        cli.command,
        Cmd::Get { kind: Kind::Routes | Kind::Policies, .. } | Cmd::Route { .. } | Cmd::Authz { .. }
    ) {
        return route_command(sock, &cli.command, json_out).await;
    }
    let (method, path, body, if_match) = match &cli.command {
        Cmd::Status => (Method::GET, "/v1/status".to_owned(), None, None),
        Cmd::Apply { file, if_match, dry_run } => {
            let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let path = if *dry_run { "/v1/state?dryRun=true" } else { "/v1/state" };
            (Method::PUT, path.to_owned(), Some(text), *if_match)
        }
        Cmd::Get { kind, name } => {
            let path = match (kind, name) {
                (Kind::Nodes, Some(n)) => format!("/v1/nodes/{n}"),
                (Kind::Workloads, Some(n)) | (Kind::Services, Some(n)) => {
                    let (ns, n) = ns_name(n);
                    let k = if matches!(kind, Kind::Workloads) { "workloads" } else { "services" };
                    format!("/v1/{k}/{ns}/{n}")
                }
                (Kind::Nodes, None) => "/v1/nodes".into(),
                (Kind::Workloads, None) => "/v1/workloads".into(),
                (Kind::Services, None) => "/v1/services".into(),
                (Kind::Endpoints, _) => "/v1/endpoints".into(),
                (Kind::Routes | Kind::Policies, _) => unreachable!("handled above"),
            };
            (Method::GET, path, None, None)
        }
        Cmd::SetWeight { service, endpoint, weight, if_match } => {
            let (ns, n) = ns_name(service);
            let body = serde_json::to_vec(&json!({ "weight": weight }))?;
            (Method::PATCH, format!("/v1/services/{ns}/{n}/endpoints/{endpoint}"), Some(body), *if_match)
        }
        Cmd::Enroll { name, namespace, service_account, node, ip, netns, pid } => {
            let mut w = json!({ "name": name, "namespace": namespace, "serviceAccount": service_account, "node": node, "ip": ip });
            if let Some(n) = netns {
                w["netns"] = json!(n);
            }
            if let Some(p) = pid {
                w["pid"] = json!(p);
            }
            (Method::PUT, format!("/v1/workloads/{namespace}/{name}"), Some(serde_json::to_vec(&w)?), None)
        }
        Cmd::Unenroll { name, namespace } => (Method::DELETE, format!("/v1/workloads/{namespace}/{name}"), None, None),
        Cmd::Delete { kind, name } => {
            let path = match kind {
                DeleteKind::Node => format!("/v1/nodes/{name}"),
                DeleteKind::Workload => {
                    let (ns, n) = ns_name(name);
                    format!("/v1/workloads/{ns}/{n}")
                }
                DeleteKind::Service => {
                    let (ns, n) = ns_name(name);
                    format!("/v1/services/{ns}/{n}")
                }
            };
            (Method::DELETE, path, None, None)
        }
        Cmd::Datapath { command: DatapathCmd::Dump } => (Method::GET, "/v1/datapath".to_owned(), None, None),
        Cmd::Stats | Cmd::Route { .. } | Cmd::Authz { .. } | Cmd::Validate { .. } | Cmd::Schema | Cmd::Top { .. } => {
            unreachable!("handled above")
        }
    };
    let answer = call(sock, method.clone(), &path, body, if_match).await?;
    let v = match answer {
        Ok(v) => v,
        Err(ApiError { status, body }) => {
            if json_out {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                eprintln!("error: {} ({})", s(&body["error"]), status);
                for f in body["fields"].as_array().cloned().unwrap_or_default() {
                    eprintln!("  {}: {}", s(&f["path"]), s(&f["message"]));
                }
            }
            return Err(Reported.into());
        }
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &cli.command {
        Cmd::Status => {
            println!("node:        {}", s(&v["node"]));
            println!("generation:  {}", s(&v["generation"]));
            println!(
                "state:       {} nodes, {} workloads, {} services, {} endpoints",
                s(&v["nodes"]),
                s(&v["workloads"]),
                s(&v["services"]),
                s(&v["endpoints"])
            );
            match v["notReadyReason"].as_str() {
                None => println!("ready:       yes"),
                Some(why) => println!("ready:       no: {why}"),
            }
            println!("datapath:    taken over at start {}", s(&v["datapath"]["reused_at_start"]));
            if let Some(st) = v["datapath"]["stats"].as_object() {
                let parts: Vec<String> = st.iter().map(|(k, n)| format!("{k}={}", s(n))).collect();
                println!("counters:    {}", parts.join(" "));
            }
        }
        Cmd::Get { kind: Kind::Endpoints, name: Some(svc) } => {
            let (ns, n) = ns_name(svc);
            let want = format!("{ns}/{n}");
            let list: Vec<Value> =
                v.as_array().into_iter().flatten().filter(|e| e["service"] == want.as_str()).cloned().collect();
            print_list(Kind::Endpoints, &Value::Array(list));
        }
        Cmd::Get { kind, .. } => print_list(*kind, &v),
        Cmd::Datapath { .. } => print_dump(&v),
        Cmd::Apply { dry_run: true, .. } => {
            let changes = v["changes"].as_array().cloned().unwrap_or_default();
            if changes.is_empty() {
                println!("dry run: no change to generation {}", s(&v["generation"]));
            } else {
                println!(
                    "dry run: {} change(s) to generation {}; nothing was applied",
                    changes.len(),
                    s(&v["generation"])
                );
                table(
                    &["CHANGE", "KIND", "NAME", "DETAIL"],
                    changes
                        .iter()
                        .map(|c| vec![s(&c["change"]), s(&c["kind"]), s(&c["name"]), s(&c["detail"])])
                        .collect(),
                );
            }
        }
        _ => {
            println!("applied: generation {}", s(&v["generation"]));
            for w in v["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}; its share of the rule's requests is answered 500", s(w));
            }
        }
    }
    Ok(())
}

/// `get routes` and `route check`, read from the daemon's document.
async fn route_command(sock: &Path, cmd: &Cmd, json_out: bool) -> anyhow::Result<()> {
    let doc = match call(sock, Method::GET, "/v1/state", None, None).await? {
        Ok(v) => v["state"].clone(),
        Err(ApiError { status, body }) => bail!("the daemon refused the request ({status}): {}", s(&body["error"])),
    };
    let out = match cmd {
        Cmd::Route { command: RouteCmd::Check { service, url, method, headers, from } } => {
            let c = routes::Check { service, url, method, headers, from: from.as_deref() };
            routes::check(&doc, &c)?
        }
        Cmd::Authz { command: AuthzCmd::Check { service, from, port, method, path, headers, ip } } => {
            let c = authz::Check { service, from, method, path, port: *port, headers, ip: ip.as_deref() };
            let out = authz::check(&doc, &c)?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for e in out["endpoints"].as_array().into_iter().flatten() {
                    let by = match (e["policy"].as_str(), e["rule"].as_u64()) {
                        (Some(p), Some(r)) => format!(" by {p} rule {r}"),
                        _ => String::new(),
                    };
                    println!("{}: {}{by} ({})", s(&e["endpoint"]), s(&e["decision"]), s(&e["why"]));
                }
            }
            return Ok(());
        }
        Cmd::Get { kind: Kind::Policies, .. } => {
            let rows = authz::list(&doc);
            if json_out {
                println!("{}", serde_json::to_string_pretty(&Value::Array(rows))?);
            } else {
                let row = |r: &Value| {
                    vec![s(&r["name"]), s(&r["action"]), s(&r["appliesTo"]), s(&r["rules"]), s(&r["dryRun"])]
                };
                table(&["POLICY", "ACTION", "APPLIES TO", "RULES", "DRY RUN"], rows.iter().map(row).collect());
            }
            return Ok(());
        }
        Cmd::Get { name, .. } => {
            let mut rows = routes::list(&doc);
            if let Some(n) = name {
                let (ns, n) = ns_name(n);
                rows.retain(|r| r["name"] == format!("{ns}/{n}").as_str());
                if rows.is_empty() {
                    bail!("there is no route {ns}/{n}: see meshctl get routes");
                }
            }
            Value::Array(rows)
        }
        _ => unreachable!("only route commands come here"),
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match out {
        Value::Array(rows) => {
            let rules = |r: &Value| {
                let list = r["rules"].as_array().cloned().unwrap_or_default();
                let each: Vec<String> = list
                    .iter()
                    .map(|x| {
                        let b: Vec<String> = x["backends"].as_array().into_iter().flatten().map(s).collect();
                        let f: Vec<String> = x["filters"].as_array().into_iter().flatten().map(s).collect();
                        let f = if f.is_empty() { String::new() } else { format!(" [{}]", f.join(",")) };
                        format!("{}: {} match(es){f} -> {}", s(&x["name"]), s(&x["matches"]), b.join(" "))
                    })
                    .collect();
                each.join("; ")
            };
            let parents =
                |r: &Value| r["parents"].as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(",");
            table(
                &["ROUTE", "KIND", "PARENTS", "STATUS", "RULES"],
                rows.iter()
                    .map(|r| vec![s(&r["name"]), s(&r["kind"]), parents(r), s(&r["status"]), rules(r)])
                    .collect(),
            );
        }
        v => {
            println!("decision: {}", s(&v["decision"]));
            for k in ["service", "route", "rule", "status", "location"] {
                if !v[k].is_null() {
                    println!("{k}: {}", s(&v[k]));
                }
            }
            for b in v["backends"].as_array().into_iter().flatten() {
                let share = b["share"].as_f64().unwrap_or(0.0) * 100.0;
                println!("backend: {} weight {} ({share:.0}%)", s(&b["backend"]), s(&b["weight"]));
            }
            println!("why: {}", s(&v["why"]));
        }
    }
    Ok(())
}

/// The daemon's refusal was printed already: exit 1 without saying it again.
#[derive(Debug)]
struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the daemon refused the request")
    }
}

impl std::error::Error for Reported {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon's document `doc` as a state, and the index of service
/// `service` ([NAMESPACE/]NAME) in it.
fn state_with_service(doc: &serde_json::Value, service: &str) -> anyhow::Result<(mesh_daemon::model::State, usize)> {
    let doc: mesh_daemon::model::Document =
        serde_json::from_value(doc.clone()).context("the daemon's state is not a document")?;
    let state = mesh_daemon::model::State::from_document(&doc)
        .map_err(|e| anyhow!("the daemon's state does not validate here: {e}"))?;
    let (ns, name) = ns_name(service);
    let i = state
        .services
        .iter()
        .position(|s| s.namespace.as_str() == ns && s.name.as_str() == name)
        .ok_or_else(|| anyhow!("there is no service {ns}/{name}: see meshctl get services"))?;
    Ok((state, i))
}
