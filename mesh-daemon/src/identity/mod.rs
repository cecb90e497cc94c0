//! SPIFFE identities, certificates issued from the mesh CA, and the rustls
//! configurations of the tunnel.
//!
//! A workload's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`;
//! a node's is `spiffe://<trust-domain>/ns/mesh-system/node/<node>`.
#![forbid(unsafe_code)]

pub mod binding;
pub mod certs;
pub mod issuer;
pub mod kube;
pub mod manager;
pub mod parsed;
pub mod tls;

pub use crate::model::spiffe::{Identity, IdentityError};
