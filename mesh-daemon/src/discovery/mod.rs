//! Kubernetes discovery: Services, EndpointSlices, Pods, Namespaces,
//! Gateway API routes and Istio AuthorizationPolicies turned into the
//! mesh's state. The translation is a pure function
//! ([`translate`]); [`watch`] (cargo feature `kubernetes`) follows the API
//! server and applies it.
#![forbid(unsafe_code)]

// Only `watch` uses them: without the feature they are not built.
#[cfg(feature = "kubernetes")]
pub mod policies;
#[cfg(feature = "kubernetes")]
pub mod procs;
#[cfg(feature = "kubernetes")]
pub mod routes;
#[cfg(feature = "kubernetes")]
pub mod status;
#[cfg(feature = "kubernetes")]
pub mod translate;
#[cfg(feature = "kubernetes")]
pub mod watch;
