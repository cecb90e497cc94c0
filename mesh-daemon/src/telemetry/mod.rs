//! Metrics (one prometheus-client registry), the admin HTTP endpoint
//! that shows them, and the log writer.
#![forbid(unsafe_code)]

pub mod admin;
pub mod line;
pub mod logwriter;
pub mod metrics;
pub mod otlp;
mod process;

pub use metrics::Metrics;
