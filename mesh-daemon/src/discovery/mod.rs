//! Kubernetes discovery: Services, EndpointSlices, Pods and Namespaces
//! turned into the mesh's state. The translation is a pure function
//! ([`translate`]); watching the API server is still to come (issue 7).
#![forbid(unsafe_code)]

pub mod procs;
pub mod translate;
