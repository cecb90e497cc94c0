//! Watching the API server (`mesh-daemon run --kubernetes`, cargo feature
//! `kubernetes`): a reflector per kind keeps a local copy of every
//! Service, EndpointSlice, Namespace and Pod; after a change settles, the
//! copies are translated ([`super::translate`]) and, when the result
//! differs from the state, written as one whole state.
//!
//! - Nothing is written before all four kinds have been listed once, so a
//!   half-known cluster never replaces a good state (the state saved in
//!   `--state-dir` serves until then).
//! - A failed watch resumes with exponential backoff (kube-runtime's
//!   default: 800 ms doubling to 30 s, with jitter). Its copy keeps every
//!   object meanwhile, and a re-list replaces it only once complete, so
//!   an API-server outage drops nothing that is still valid. (Requests
//!   answered 429, 503 or 504 are first retried by kube-client itself.)
//! - What the translation leaves out (a pod without a process yet, a bad
//!   annotation) is logged once per reason, at info.
//! - A write that fails is tried again after [`RETRY`] even if nothing
//!   changes; one whose only bad fields are workloads that vanished
//!   between the /proc scan and the write is retried at once without them.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::procs;
use super::translate::{translate_with, Memo, Objects};
use crate::control::{Control, WriteError};
use crate::model::Document;

/// How long changes settle before they are applied: a rollout touches
/// pods, slices and more within moments, and one write covers them all.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// When a failed write is tried again without a new change.
pub const RETRY: Duration = Duration::from_secs(5);

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    /// Per route kind whose CRD is installed: (kind, its copy).
    routes: Vec<(&'static str, Store<DynamicObject>)>,
    /// ReferenceGrants, when their CRD is installed.
    grants: Option<Store<DynamicObject>>,
    /// AuthorizationPolicies, when Istio's CRD is installed.
    policies: Option<Store<DynamicObject>>,
}

impl Stores {
    /// What the copies hold now.
    fn seen(&self) -> Seen {
        Seen {
            services: self.services.state(),
            slices: self.slices.state(),
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            routes: self.routes.iter().map(|(k, st)| (*k, st.state())).collect(),
            grants: self.grants.as_ref().map(Store::state).unwrap_or_default(),
            policies: self.policies.as_ref().map(Store::state).unwrap_or_default(),
        }
    }
}

/// Drops what the translation never reads and which can dwarf the rest:
/// the field managers' bookkeeping and kubectl's copy of the last apply.
fn slim<K: ResourceExt>(o: &mut K) {
    o.managed_fields_mut().clear();
    o.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Starts watching one kind; `changed` is notified after every change of
/// its copy.
pub(super) fn reflect<K>(
    client: &Client,
    changed: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + ResourceExt + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream =
        reflector(writer, watcher(Api::<K>::all(client.clone()), watcher::Config::default()).modify(slim::<K>))
            .default_backoff();
    follow_events(kind, stream, changed, tasks);
    reader
}

/// Starts watching one custom kind (a Gateway API route kind,
/// ReferenceGrant, AuthorizationPolicy), read as dynamic objects.
pub(super) fn reflect_dynamic(
    client: &Client,
    ar: &ApiResource,
    changed: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), ar);
    let stream =
        reflector(writer, watcher(api, watcher::Config::default()).modify(slim::<DynamicObject>)).default_backoff();
    follow_events(ar.kind.clone(), stream, changed, tasks);
    reader
}

/// Whether the cluster serves custom kind `ar` (its CRD is installed: a
/// route kind, ReferenceGrant, AuthorizationPolicy). When it does not,
/// that kind is off, said once.
pub(super) async fn served(client: &Client, ar: &ApiResource) -> bool {
    let api = Api::<DynamicObject>::all_with(client.clone(), ar);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            info!(kind = %ar.kind, "the CRD of this kind is not installed: the mesh reads none of it (restart the daemon once it is)");
            false
        }
        Err(e) => {
            warn!(kind = %ar.kind, error = %e, "could not list routes; watching them anyway");
            true
        }
    }
}

/// Drives one watch stream, notifying `changed` after every change of
/// its copy, and says when it fails and resumes.
fn follow_events<K: Send + 'static>(
    kind: String,
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                // A re-list in progress: the copy changes once it is done.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        info!(kind, "watch resumed");
                    }
                    changed.notify_one();
                }
                // Once per outage at warn; each retry at debug.
                Err(e) if failing => debug!(kind, error = %e, "watch still failing"),
                Err(e) => {
                    failing = true;
                    warn!(kind, error = %e, "watch failed; resuming with backoff, keeping what was seen");
                }
            }
        }
    }));
}

/// Why discovery stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "--kubernetes: no API server to watch: {0} (in a pod: give it a service account; elsewhere: set KUBECONFIG)"
    )]
    NoApiServer(kube::Error),
    #[error("discovery stopped: {0}")]
    Stopped(String),
    #[error("applying the cluster's state panicked: {0}")]
    Panicked(tokio::task::JoinError),
}

/// The API server's client: in a pod, from its service account; elsewhere
/// from KUBECONFIG or ~/.kube/config. Nothing is contacted yet.
pub async fn connect() -> Result<Client, DiscoveryError> {
    Client::try_default().await.map_err(DiscoveryError::NoApiServer)
}

/// Follows the cluster until `stop`.
pub async fn run(
    client: Client,
    control: Arc<Control>,
    proc_root: PathBuf,
    stop: crate::drain::Drain,
) -> Result<(), DiscoveryError> {
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut routes = Vec::new();
    for (kind, plural) in super::routes::KINDS {
        let ar = super::routes::resource(kind, plural);
        if served(&client, &ar).await {
            routes.push((kind, reflect_dynamic(&client, &ar, changed.clone(), &mut tasks)));
        }
    }
    let grant = super::routes::grant_resource();
    let grants = match routes.is_empty() {
        false if served(&client, &grant).await => Some(reflect_dynamic(&client, &grant, changed.clone(), &mut tasks)),
        _ => None,
    };
    let policy = super::policies::resource();
    let policies = match served(&client, &policy).await {
        true => Some(reflect_dynamic(&client, &policy, changed.clone(), &mut tasks)),
        false => None,
    };
    let stores = Stores {
        services: reflect(&client, changed.clone(), &mut tasks),
        slices: reflect(&client, changed.clone(), &mut tasks),
        namespaces: reflect(&client, changed.clone(), &mut tasks),
        pods: reflect(&client, changed.clone(), &mut tasks),
        routes,
        grants,
        policies,
    };
    let result = tokio::select! {
        _ = stop.stopped() => Ok(()),
        r = follow(&control, &stores, &changed, proc_root) => r,
    };
    for t in tasks {
        t.abort();
    }
    result
}

async fn follow(
    control: &Arc<Control>,
    stores: &Stores,
    changed: &Notify,
    proc_root: PathBuf,
) -> Result<(), DiscoveryError> {
    info!("waiting for the first list of Services, EndpointSlices, Namespaces and Pods");
    let ready = async {
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
        stores.namespaces.wait_until_ready().await?;
        stores.pods.wait_until_ready().await?;
        for r in stores.routes.iter().map(|(_, r)| r).chain(&stores.grants).chain(&stores.policies) {
            r.wait_until_ready().await?;
        }
        Ok::<(), reflector::store::WriterDropped>(())
    };
    ready.await.map_err(|e| DiscoveryError::Stopped(e.to_string()))?;
    info!("the cluster is listed; following it");
    let mut pass = Pass { pids: PidCache::new(proc_root), skipped: Vec::new(), memo: Memo::default() };
    let mut retry = false;
    loop {
        if retry {
            // A failed write is tried again, sooner if something changes.
            let _ = tokio::time::timeout(RETRY, changed.notified()).await;
        } else {
            // Also the first pass: the permits of the initial lists.
            changed.notified().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
        let seen = stores.seen();
        // The /proc scan and the write block: off the runtime.
        let c = control.clone();
        let (ok, back) = tokio::task::spawn_blocking(move || {
            let ok = pass.apply(&c, &seen);
            (ok, pass)
        })
        .await
        .map_err(DiscoveryError::Panicked)?;
        pass = back;
        retry = !ok;
    }
}

/// The copies' contents at one moment.
struct Seen {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    namespaces: Vec<Arc<Namespace>>,
    pods: Vec<Arc<Pod>>,
    routes: Vec<(&'static str, Vec<Arc<DynamicObject>>)>,
    grants: Vec<Arc<DynamicObject>>,
    policies: Vec<Arc<DynamicObject>>,
}

/// What one pass of translating and writing keeps for the next.
struct Pass {
    pids: PidCache,
    /// What the last translation left out, so each reason is told once.
    skipped: Vec<String>,
    /// Each Service as last translated, kept while its inputs are unchanged.
    memo: Memo,
}

impl Pass {
    /// Translates `seen` and writes it when it differs from the state;
    /// false when the write failed.
    fn apply(&mut self, control: &Control, seen: &Seen) -> bool {
        let (services, slices, namespaces, pods) =
            (refs(&seen.services), refs(&seen.slices), refs(&seen.namespaces), refs(&seen.pods));
        let objs = Objects { services: &services, slices: &slices, namespaces: &namespaces, pods: &pods };
        let pids = &mut self.pids;
        let mut t = translate_with(objs, control.node().as_str(), &mut |p: &Pod| pids.pid_of(p), &mut self.memo);
        self.pids.forget_all_but(&pods);
        let routes: Vec<(&str, &DynamicObject)> =
            seen.routes.iter().flat_map(|(k, v)| v.iter().map(move |o| (*k, o.as_ref()))).collect();
        t.document.routes = super::routes::translate(&routes, &mut t.skipped);
        t.document.reference_grants = super::routes::grants(&seen.grants, &mut t.skipped);
        t.document.policies = super::policies::translate(&seen.policies, &mut t.skipped);
        for why in t.skipped.iter().filter(|w| !self.skipped.contains(w)) {
            info!(reason = %why, "left out of the mesh");
        }
        self.skipped = t.skipped;
        apply(control, t.document, t.services_translated)
    }
}

fn refs<K>(v: &[Arc<K>]) -> Vec<&K> {
    v.iter().map(Arc::as_ref).collect()
}

/// Writes `next` when it differs from the state; false when it failed.
/// `translated`: how many Services this pass translated (the others were
/// unchanged), for the log.
fn apply(control: &Control, mut next: Document, translated: usize) -> bool {
    if control.snapshot().state == next {
        debug!(services_translated = translated, "the cluster changed, the mesh's state did not");
        return true;
    }
    for attempt in 0..2 {
        let doc = next.clone();
        match control.write(None, move |d| {
            *d = doc;
            Ok(())
        }) {
            Ok(generation) => {
                info!(
                    generation,
                    services = next.services.len(),
                    services_translated = translated,
                    workloads = next.workloads.len(),
                    nodes = next.nodes.len(),
                    "state follows the cluster"
                );
                return true;
            }
            Err(WriteError::Invalid(errors)) if attempt == 0 => {
                let Some(out) = left_out(&errors) else {
                    warn!(errors = %errors, "the cluster's state is not valid; keeping the current one");
                    return false;
                };
                for i in out.workloads.into_iter().rev() {
                    let w = next.workloads.remove(i);
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), "its process exited; left out for now");
                }
                for (i, why) in out.routes.into_iter().rev() {
                    let r = next.routes.remove(i);
                    let route = format!("{} {}/{}", r.kind, r.metadata.namespace, r.metadata.name);
                    warn!(route, reason = %why, "route not accepted; left out, the others apply");
                }
                for (i, why) in out.grants.into_iter().rev() {
                    let g = next.reference_grants.remove(i);
                    let grant = format!("{}/{}", g.metadata.namespace, g.metadata.name);
                    warn!(grant, reason = %why, "ReferenceGrant not accepted; left out, the others apply");
                }
                for (i, why) in out.policies.into_iter().rev() {
                    let p = next.policies[i].clone();
                    let policy = format!("{}/{}", p.metadata.namespace, p.metadata.name);
                    let dry = p.metadata.annotations.get(crate::model::authz::DRY_RUN).is_some_and(|v| v == "true");
                    let spec = serde_json::to_value(&p.spec).unwrap_or_default();
                    match crate::model::authz::fail_closed(&p.metadata.name, &p.metadata.namespace, dry, &spec) {
                        Some(stand_in) if stand_in != *p => {
                            warn!(policy, reason = %why, "AuthorizationPolicy not accepted; it fails closed (a broken ALLOW allows nothing, a broken DENY denies all)");
                            next.policies[i] = Arc::new(stand_in);
                        }
                        _ => {
                            warn!(policy, reason = %why, "AuthorizationPolicy not accepted; left out");
                            next.policies.remove(i);
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "writing the cluster's state failed; retrying in {}s", RETRY.as_secs());
                return false;
            }
        }
    }
    false
}

/// What a write from the cluster leaves out when every error is one of
/// these, by index, ascending: workloads whose network namespace could
/// not be opened (`workloads[i].pid`), and routes and ReferenceGrants
/// with a bad field (with their reasons). A bad route is the cluster's to
/// fix; it must not hold back the rest.
#[derive(Debug, Default, PartialEq)]
struct LeftOut {
    workloads: Vec<usize>,
    routes: Vec<(usize, String)>,
    grants: Vec<(usize, String)>,
    /// Policies, to be replaced by their fail-closed stand-ins.
    policies: Vec<(usize, String)>,
}

fn left_out(errors: &crate::model::ValidationErrors) -> Option<LeftOut> {
    let mut out = LeftOut::default();
    let item = |list: &mut Vec<(usize, String)>, i: &str, e: &crate::model::FieldError| -> Option<()> {
        let i: usize = i.parse().ok()?;
        match list.iter_mut().find(|(j, _)| *j == i) {
            Some((_, why)) => why.push_str(&format!("; {e}")),
            None => list.push((i, e.to_string())),
        }
        Some(())
    };
    for e in &errors.0 {
        let at = |prefix: &str| e.path.strip_prefix(prefix).and_then(|r| r.split_once(']')).map(|(i, _)| i);
        if let Some(i) = e.path.strip_prefix("workloads[").and_then(|r| r.strip_suffix("].pid")) {
            out.workloads.push(i.parse().ok()?);
        } else if let Some(i) = at("routes[") {
            item(&mut out.routes, i, e)?;
        } else if let Some(i) = at("referenceGrants[") {
            item(&mut out.grants, i, e)?;
        } else if let Some(i) = at("policies[") {
            item(&mut out.policies, i, e)?;
        } else {
            return None;
        }
    }
    out.workloads.sort_unstable();
    out.workloads.dedup();
    out.routes.sort_by_key(|(i, _)| *i);
    out.grants.sort_by_key(|(i, _)| *i);
    out.policies.sort_by_key(|(i, _)| *i);
    (out != LeftOut::default()).then_some(out)
}

/// Pod UID → one of its pids, checked again before each use: a scan of
/// /proc only for pods not seen before or whose process has gone.
struct PidCache {
    proc_root: PathBuf,
    known: HashMap<String, i64>,
}

impl PidCache {
    fn new(proc_root: PathBuf) -> Self {
        PidCache { proc_root, known: HashMap::new() }
    }

    fn pid_of(&mut self, pod: &Pod) -> Option<i64> {
        let uid = pod.metadata.uid.as_deref()?;
        if let Some(&pid) = self.known.get(uid) {
            if procs::pid_in_pod(&self.proc_root, pid, uid) {
                return Some(pid);
            }
        }
        let pid = procs::pid_of_pod(&self.proc_root, uid);
        match pid {
            Some(p) => self.known.insert(uid.to_owned(), p),
            None => self.known.remove(uid),
        };
        pid
    }

    fn forget_all_but(&mut self, pods: &[&Pod]) {
        let live: std::collections::HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        self.known.retain(|uid, _| live.contains(uid.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FieldError, ValidationErrors};

    #[test]
    fn only_workload_pid_route_grant_and_policy_errors_are_left_out() {
        let e = |p: &str| FieldError { path: p.into(), message: "x".into() };
        let errs = ValidationErrors(vec![e("workloads[3].pid"), e("workloads[1].pid"), e("workloads[3].pid")]);
        assert_eq!(left_out(&errs), Some(LeftOut { workloads: vec![1, 3], ..LeftOut::default() }));
        let routes = ValidationErrors(vec![
            e("routes[2].spec.rules[0].backendRefs[0].name"),
            e("workloads[1].pid"),
            e("routes[0].kind"),
            e("routes[2].spec.parentRefs[0]"),
            e("referenceGrants[1].spec.to[0]"),
            e("policies[4].spec.rules[0].from[0].source.principals[0]"),
        ]);
        let want = vec![
            (0, "routes[0].kind: x".to_owned()),
            (2, "routes[2].spec.rules[0].backendRefs[0].name: x; routes[2].spec.parentRefs[0]: x".to_owned()),
        ];
        let grants = vec![(1, "referenceGrants[1].spec.to[0]: x".to_owned())];
        let policies = vec![(4, "policies[4].spec.rules[0].from[0].source.principals[0]: x".to_owned())];
        assert_eq!(left_out(&routes), Some(LeftOut { workloads: vec![1], routes: want, grants, policies }));
        let mixed = ValidationErrors(vec![e("workloads[1].pid"), e("services[0].vip")]);
        assert_eq!(left_out(&mixed), None, "another error: the state is invalid");
        assert_eq!(left_out(&ValidationErrors(vec![])), None);
    }
}
