//! Streams arriving through the tunnel: which may reach which pod (a
//! pure decision, [`Inbound::check`]), the connect to the pod, the relay,
//! metrics and access log. The tunnel hands over the verified peer
//! identity, the target and the service the stream names.

mod view;
pub use view::{Deny, Inbound, InboundView, Target};

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::drain::Drain;
use crate::proxy::access::Record;
use crate::proxy::dial::{self, Upstream};
use crate::proxy::error::ConnectError;
use crate::proxy::http::upstream::{Dial, Endpoint, SendError, Upstreams};
use crate::relay::{relay, Transfer};
use crate::tunnel::client::Stream;
use crate::tunnel::server::{Refusal, StreamHandler, StreamRequest};
use crate::tunnel::{StreamProtocol, TunnelCounters};

/// How long the connect to a local pod may take.
const POD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The receiving end of tunnel streams on this node.
pub struct InboundHandler {
    pub view: Arc<ArcSwap<Inbound>>,
    pub counters: Arc<TunnelCounters>,
    /// Ends request streams gracefully when the daemon drains.
    pub drain: Drain,
    /// Spans of sampled requests.
    pub spans: Arc<crate::telemetry::otlp::Spans>,
    /// A stream that moves no byte either way this long is closed
    /// (`--idle-timeout`).
    pub idle: Duration,
    /// Connections to this node's pods for the requests of request
    /// streams, shared by all streams (and with this node's own clients).
    pub upstreams: Arc<Upstreams>,
}

/// A stream let through: what reaches the pod, and its target.
pub struct Accepted {
    pod: Pod,
    target: Arc<Target>,
}

/// How a stream reaches its pod.
enum Pod {
    /// A connection of its own, for the client's bytes as they are.
    Relay(Upstream),
    /// The pod's pooled connections, for requests the sending proxy
    /// terminated: a connection the pod ends is dialled again there.
    Requests(Arc<Endpoint>, StreamProtocol),
}

impl StreamHandler for InboundHandler {
    type Upstream = Accepted;

    async fn open(&self, req: &StreamRequest) -> Result<Accepted, Refusal> {
        let view = self.view.load();
        let (peer, target, service) = (&req.peer, req.target, req.service.as_deref());
        let found = match view.check(service, target, peer, req.from) {
            Ok(s) => s.clone(),
            Err(deny) => {
                let (counter, why) = match deny {
                    Deny::NotLocal => (&self.counters.denied_not_local, "the target is not a workload of this node"),
                    Deny::NotEndpoint => (
                        &self.counters.denied_not_endpoint,
                        "the target is not an endpoint of the service the stream names",
                    ),
                    Deny::Policy => (&self.counters.denied_policy, "authorization policy does not allow this identity"),
                    Deny::WrongNode => (
                        &self.counters.denied_wrong_node,
                        "this identity's workloads run on other nodes than the one the stream came from",
                    ),
                };
                counter.inc();
                let target_identity = view.workload_identity(target.ip()).map(tracing::field::display);
                warn!(identity = %peer, from = %req.from, target_identity, %target, service = service.unwrap_or(""), reason = deny.as_str(), "{why}; refused (403)");
                return Err(Refusal::Denied(deny.as_str()));
            }
        };
        // A connection is authorized here, once; a stream of requests per
        // request (`http::inbound`).
        if req.protocol.is_none() {
            let caller = view.guard.caller(Some(peer), req.source);
            if let Err(d) = view.guard.check(&found.service, target, &caller, None, found.metrics(), crate::env::live())
            {
                self.counters.denied_policy.inc();
                debug!(identity = %peer, %target, by = %d.describe(), "stream denied by authorization policy (403)");
                return Err(Refusal::Denied(Deny::Policy.as_str()));
            }
        }
        let pod = match req.protocol {
            None => dial::direct(target, POD_CONNECT_TIMEOUT).await.map(Pod::Relay).map_err(SendError::from),
            Some(protocol) => {
                let http2 = protocol == StreamProtocol::Http2;
                let pod = self.upstreams.endpoint(Dial::Direct(target), http2, None, POD_CONNECT_TIMEOUT);
                pod.warm().await.map(|()| Pod::Requests(pod, protocol))
            }
        };
        let pod = pod.map_err(|e| {
            self.counters.upstream_failures.inc();
            warn!(identity = %peer, %target, error = %e, "connect to the workload failed");
            match e {
                SendError::Connect(ConnectError::Timeout { .. }) => Refusal::TimedOut,
                _ => Refusal::Unreachable,
            }
        })?;
        self.counters.streams.inc();
        Ok(Accepted { pod, target: found })
    }

    async fn carry(&self, req: StreamRequest, accepted: Accepted, mut stream: Stream) {
        let Accepted { pod, target } = accepted;
        let series = target.series();
        let mut upstream = match pod {
            Pod::Relay(upstream) => upstream,
            Pod::Requests(pod, protocol) => {
                // Requests the sending proxy terminated: each proxied,
                // counted and logged here too.
                series.opened.inc();
                let ctx = (self.spans.clone(), self.view.clone());
                let drain = self.drain.clone();
                crate::proxy::http::inbound::serve(stream, pod, protocol, req, target.clone(), ctx, drain).await;
                target.series().closed.inc();
                return;
            }
        };
        let started = Instant::now();
        series.opened.inc();
        let Transfer { up, down, error } = relay(&mut stream, &mut upstream, self.idle).await;
        series.closed.inc();
        series.sent.inc_by(up);
        series.received.inc_by(down);
        Record {
            direction: "inbound",
            source: None,
            identity: Some(&req.peer),
            client: None,
            service: &series.labels.service,
            endpoint: Some(req.target),
            node: Some("local"),
            bytes_up: Some(up),
            bytes_down: down,
            duration: started.elapsed(),
            outcome: crate::relay::outcome(&error),
            error: error.as_ref().map(|e| e as &(dyn std::fmt::Display + Sync)),
            request: None,
        }
        .log(target.access_log, crate::env::live());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` makes, without making it.
    fn made<F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'static InboundHandler, StreamRequest, Accepted, Stream) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// A tunnel stream's task lives as long as the stream, and all it
    /// holds is the carry's future: while it relays to a pod, the relay,
    /// not the state of the HTTP requests another stream would serve
    /// (boxed by `http::inbound::serve`; some kilobytes unboxed).
    #[test]
    fn a_carried_stream_holds_only_its_relay_while_it_relays() {
        let size = made(|h, req, accepted, stream| h.carry(req, accepted, stream));
        assert!(size <= 2048, "a carried stream's future is {size} bytes");
    }
}
