//! The document operators write (`--config`, later `PUT /v1/state`): plain
//! serde structs with addresses and numbers kept loose, so that validation
//! can report every bad field by path instead of stopping at the first.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub nodes: Vec<NodeDoc>,
    #[serde(default)]
    pub workloads: Vec<WorkloadDoc>,
    #[serde(default)]
    pub services: Vec<ServiceDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeDoc {
    pub name: String,
    /// Where other nodes (and this node's pods) reach this node.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadDoc {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_namespace")]
    pub service_account: String,
    pub node: String,
    pub ip: String,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Or: a process inside the pod; its `/proc/<pid>/ns/net` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDoc {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vip: String,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub ports: Vec<PortDoc>,
    #[serde(default)]
    pub endpoints: Vec<EndpointDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortDoc {
    pub port: i64,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointDoc {
    pub ip: String,
    pub node: String,
    #[serde(default = "default_weight")]
    pub weight: i64,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_mode() -> String {
    "proxy".into()
}
fn default_protocol() -> String {
    "TCP".into()
}
fn default_weight() -> i64 {
    1
}
