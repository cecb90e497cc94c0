//! The mini cluster: nodes and pods made of network namespaces and cgroups
//! on one machine, with one mesh-daemon per node. Used by the end-to-end
//! tests, `cargo xtask demo` and `cargo xtask bench`.
//!
//! Layout of one cluster (every name starts with a unique run prefix
//! `mtXXXXXX`, and everything is torn down on drop):
//! - a fabric netns with a bridge; each node's `eth0` (172.18.0.N/24) hangs
//!   off it;
//! - per node a netns with a bridge `cbr0` (10.244.N.1/24) for its pods and
//!   routes to the other nodes' pod ranges; no default route, so nothing
//!   leaves the cluster; a cgroup `<root>/<prefix>/<node>`;
//! - per pod a netns with `eth0` (10.244.N.K/24, default route via its node)
//!   and a cgroup under its node's.

pub mod cluster;
pub mod fake_kube;
pub mod fixtures;
pub mod follow;
pub mod loadgen;
pub mod sys;

pub use cluster::{clean_leftovers, Cluster, ClusterSpec, Daemon, Node, Pod, Stack};

/// Tests whose shares and counts depend on their backends answering at
/// their own pace run one at a time within their test binary: hold this.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
