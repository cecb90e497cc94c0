//! The label sets of the metrics: each a bounded set of values (from the
//! state, or a fixed list), never anything per connection.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: &'static str,
}

impl ConnLabels {
    pub(super) fn endpoint_labels(&self) -> EndpointLabels {
        EndpointLabels { service: self.service.clone(), endpoint: self.endpoint.clone() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub service: String,
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: &'static str,
    /// `2xx`..`5xx`; for gRPC the call's status (`OK`, `UNAVAILABLE`, ...).
    pub class: &'static str,
}

/// A request a route rule (Gateway API) decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `namespace/name` of the route.
    pub route: Arc<str>,
    /// The rule's `name`, else its index.
    pub rule: Arc<str>,
    /// The backend Service port it went to (`namespace/name:port`);
    /// empty when the proxy answered it (a redirect, 500).
    pub backend: Arc<str>,
    pub class: &'static str,
}

/// An authorization decision a policy made (`policy` empty: ALLOW
/// policies applied and none matched).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub policy: Arc<str>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: &'static str,
    /// `allow`, `deny`, `audit`, or `dry_run` (a dry-run policy that would
    /// have decided otherwise).
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// One route rule (Gateway API).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub route: Arc<str>,
    pub rule: Arc<str>,
}
