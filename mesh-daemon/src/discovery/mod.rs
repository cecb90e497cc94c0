//! Kubernetes discovery: Services, EndpointSlices, Pods and Namespaces
//! turned into the mesh's state. The translation is a pure function
//! ([`translate`]); [`watch`] (cargo feature `kubernetes`) follows the API
//! server and applies it.
#![forbid(unsafe_code)]

// Used by `watch`; built (and unit-tested) without the feature too.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub mod procs;
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub mod translate;
#[cfg(feature = "kubernetes")]
pub mod watch;
