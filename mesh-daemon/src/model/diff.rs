//! What a write would change, item by item: the answer of a dry run
//! (`meshctl apply --dry-run`), computed from the documents before and
//! after, never from the kernel or the proxy.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Document;

/// One item a write adds, removes or changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    /// `node`, `workload`, `service`, `endpoint`, `route`, `referenceGrant`
    /// or `policy`.
    pub kind: &'static str,
    /// Its name: `namespace/name` (an endpoint: `namespace/service ip`).
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// For a change: the fields that differ (an endpoint's weight as
    /// `weight 1 -> 0`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Every item that differs between `before` and `after`, in the order
/// nodes, workloads, services (each followed by its endpoints), routes,
/// reference grants, policies; each kind sorted by name.
pub fn diff(before: &Document, after: &Document) -> Vec<DiffEntry> {
    let mut out = Vec::new();
    list(&mut out, "node", &before.nodes, &after.nodes, |n| n.name.clone());
    list(&mut out, "workload", &before.workloads, &after.workloads, |w| format!("{}/{}", w.namespace, w.name));
    let services = |d: &Document| d.services.iter().map(|s| s.as_ref().clone()).collect::<Vec<_>>();
    let (b, a) = (services(before), services(after));
    let key = |s: &super::ServiceDoc| format!("{}/{}", s.namespace, s.name);
    let old: BTreeMap<String, &super::ServiceDoc> = b.iter().map(|s| (key(s), s)).collect();
    let new: BTreeMap<String, &super::ServiceDoc> = a.iter().map(|s| (key(s), s)).collect();
    for (name, s) in &new {
        match old.get(name) {
            None => out.push(entry("service", name, "added", String::new())),
            Some(o) if o != s => {
                let detail = fields(*o, *s, &["endpoints"]);
                if !detail.is_empty() {
                    out.push(entry("service", name, "changed", detail));
                }
                let ep = |e: &super::EndpointDoc| format!("{name} {}", e.ip);
                let mut eps = Vec::new();
                list(&mut eps, "endpoint", &o.endpoints, &s.endpoints, ep);
                for e in &mut eps {
                    let (Some(x), Some(y)) =
                        (o.endpoints.iter().find(|x| ep(x) == e.name), s.endpoints.iter().find(|y| ep(y) == e.name))
                    else {
                        continue;
                    };
                    let mut d = Vec::new();
                    if x.weight != y.weight {
                        d.push(format!("weight {} -> {}", x.weight, y.weight));
                    }
                    if x.priority != y.priority {
                        d.push(format!("priority {} -> {}", x.priority, y.priority));
                    }
                    if x.node != y.node {
                        d.push(format!("node {} -> {}", x.node, y.node));
                    }
                    e.detail = d.join(", ");
                }
                out.extend(eps);
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(entry("service", name, "removed", String::new()));
    }
    let meta = |m: &super::route::doc::MetadataDoc| format!("{}/{}", m.namespace, m.name);
    list(&mut out, "route", &before.routes, &after.routes, |r| meta(&r.metadata));
    list(&mut out, "referenceGrant", &before.reference_grants, &after.reference_grants, |g| meta(&g.metadata));
    list(&mut out, "policy", &before.policies, &after.policies, |p| {
        format!("{}/{}", p.metadata.namespace, p.metadata.name)
    });
    out
}

fn entry(kind: &'static str, name: &str, change: &'static str, detail: String) -> DiffEntry {
    DiffEntry { kind, name: name.to_owned(), change, detail }
}

/// Items of one kind added, removed or changed, by `key`.
fn list<T: PartialEq + Serialize>(
    out: &mut Vec<DiffEntry>,
    kind: &'static str,
    before: &[T],
    after: &[T],
    key: impl Fn(&T) -> String,
) {
    let old: BTreeMap<String, &T> = before.iter().map(|t| (key(t), t)).collect();
    let new: BTreeMap<String, &T> = after.iter().map(|t| (key(t), t)).collect();
    for (name, t) in &new {
        match old.get(name) {
            None => out.push(entry(kind, name, "added", String::new())),
            Some(o) if *o != *t => out.push(entry(kind, name, "changed", fields(*o, *t, &[]))),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(entry(kind, name, "removed", String::new()));
    }
}

/// The top-level fields whose values differ, comma-separated, `except`
/// those named.
fn fields<T: Serialize>(before: &T, after: &T, except: &[&str]) -> String {
    let (Ok(serde_json::Value::Object(b)), Ok(serde_json::Value::Object(a))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return String::new();
    };
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).filter(|k| !except.contains(&k.as_str())).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| b.get(*k) != a.get(*k)).map(String::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;

    #[test]
    fn adds_removals_and_changes_are_named_down_to_the_endpoint() {
        let before = parse_document(
            "nodes: [{ name: a, address: 172.18.0.2 }]\n\
             services:\n\
             - { name: web, vip: 10.96.0.10, ports: [{ port: 80 }], endpoints: [{ ip: 10.244.1.4, node: a, weight: 1 }, { ip: 10.244.1.5, node: a }] }\n\
             - { name: old, vip: 10.96.0.11, ports: [{ port: 80 }] }\n\
             - { name: same, vip: 10.96.0.12, ports: [{ port: 80 }] }\n",
        )
        .unwrap();
        let after = parse_document(
            "nodes: [{ name: a, address: 172.18.0.2 }, { name: b, address: 172.18.0.3 }]\n\
             services:\n\
             - { name: web, vip: 10.96.0.10, mode: kernel, ports: [{ port: 80 }], endpoints: [{ ip: 10.244.1.4, node: a, weight: 0 }, { ip: 10.244.1.6, node: a }] }\n\
             - { name: new, vip: 10.96.0.13, ports: [{ port: 80 }] }\n\
             - { name: same, vip: 10.96.0.12, ports: [{ port: 80 }] }\n",
        )
        .unwrap();
        let got: Vec<String> = diff(&before, &after)
            .iter()
            .map(|e| format!("{} {} {} {}", e.change, e.kind, e.name, e.detail).trim_end().to_owned())
            .collect();
        assert_eq!(
            got,
            [
                "added node b",
                "added service default/new",
                "changed service default/web mode",
                "changed endpoint default/web 10.244.1.4 weight 1 -> 0",
                "added endpoint default/web 10.244.1.6",
                "removed endpoint default/web 10.244.1.5",
                "removed service default/old",
            ]
        );
        assert!(diff(&after, &after).is_empty(), "the same document: nothing");
    }
}
