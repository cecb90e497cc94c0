//! The backend stage of a request: the chosen backend Service's policy
//! (its timeouts and retries, a route rule's before them, the retry
//! budget, the mirrors of the rule) decided once in a [`Plan`], then the
//! tries over its endpoints ([`Plan::run`]): pick an endpoint, send over
//! its pool, and on each outcome either answer or try again.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;
use tracing::warn;

use super::conn::Resolved;
use super::observe::{Finished, Observed};
use super::retry::{NoRetry, Retrying};
use super::upstream::{Body, ConnectedAt, Failed, SendError, UpstreamBody};
use super::{
    answer, chain, empty, failed_answer, forbidden, mirror, replay, request_timeout, retried_answer, retry,
    retry_policy, router, strip_hop_by_hop, timed_out, unavailable, Conn,
};
use crate::model::authz::Request as AuthzRequest;
use crate::model::route::{Backend, Mirror, Rule};
use crate::proxy::tries::Tries;
use crate::proxy::{Route, RouteEndpoint};
use crate::tunnel::SOURCE_HEADER;
use hyper::header::HeaderValue;

/// What the backend policy makes of one request before its first try.
pub(super) struct Plan<'a> {
    conn: &'a Conn,
    resolved: &'a Resolved,
    /// The rule and backendRef that chose this backend, if a route did.
    routed: Option<(&'a Rule, &'a Backend)>,
    started: Instant,
    /// The whole request's time, and each try's.
    timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retrying: Retrying<'a>,
    /// The mirrors this request is copied to (each drew its share).
    mirrors: Vec<&'a Mirror>,
    /// The body, kept (up to what a retry or a mirror needs) to be sent
    /// again.
    body: Option<replay::Replay>,
}

/// What one try came to.
enum Step {
    /// Try again after this pause.
    Again(Duration),
    /// The next endpoint, now (a connect failure the tries allow).
    Next,
    /// No more tries: answer the request as no endpoint took it.
    Stop,
}

impl<'a> Plan<'a> {
    /// The plan for the request `parts` (with `body`) on `resolved`'s
    /// route: the route rule's timeouts and retries come before the
    /// backend service's own.
    pub(super) fn new(
        conn: &'a Conn,
        resolved: &'a Resolved,
        routed: Option<(&'a Rule, &'a Backend)>,
        parts: &Parts,
        body: UpstreamBody,
        started: Instant,
    ) -> Self {
        let (route, env) = (&resolved.route, conn.env);
        let mut rules = route.policy.cfg.rules();
        if let Some((rule, _)) = routed {
            rules.timeout = rule.timeout.or(rules.timeout);
            rules.per_try_timeout = rule.backend_timeout.or(rules.per_try_timeout);
            rules.retries = rule.retry.as_ref().or(rules.retries);
        }
        let budget = route.retry_budget(routed.is_some_and(|(r, _)| r.retry.is_some()));
        let timeout = request_timeout(&rules, conn.grpc, &parts.headers);
        let retry = retry_policy(&rules, &parts.method, conn.grpc);
        let mirrors: Vec<&Mirror> = routed
            .map(|(rule, b)| {
                rule.filters.mirrors.iter().chain(&b.filters.mirrors).filter(|m| m.takes(env.unit())).collect()
            })
            .unwrap_or_default();
        let keep = retry.map_or(0, |r| r.max_body).max(if mirrors.is_empty() { 0 } else { mirror::MIRROR_BODY });
        let body = (!hyper::body::Body::is_end_stream(&body)).then(|| replay::Replay::new(body.boxed_unsync(), keep));
        if let Some(b) = budget {
            b.deposit(env.secs() as u64);
        }
        let deadline = timeout.map(|t| started + t);
        Plan {
            conn,
            resolved,
            routed,
            started,
            timeout,
            per_try_timeout: rules.per_try_timeout,
            retrying: Retrying { policy: retry, deadline, budget, retried: 0 },
            mirrors,
            body,
        }
    }

    fn route(&self) -> &'a Arc<Route> {
        &self.resolved.route
    }

    /// Whether one more try may repeat this request, after waiting the
    /// backoff (None also when the wait would pass the deadline).
    fn again(&self) -> Option<Duration> {
        let replayable = self.body.as_ref().is_none_or(replay::Replay::replayable);
        match self.retrying.again(replayable, self.conn.env) {
            Ok(pause) => Some(pause),
            Err(NoRetry::BudgetSpent) => {
                self.route().series().budget_exhausted.inc();
                None
            }
            Err(_) => None,
        }
    }

    /// Counts a retry, to be made after `pause`.
    fn retrying(&mut self, pause: Duration) -> Step {
        self.retrying.retried += 1;
        self.conn.counters.retries.inc();
        self.route().series().retries.inc();
        Step::Again(pause)
    }

    /// Tries the endpoints until one answers, or none can: a connect
    /// failure goes on to another endpoint (as [`Tries`] allows; nothing
    /// was sent), an answer or a lapsed try the retry policy names goes
    /// again when the request may be repeated (method, body kept whole)
    /// and the budget allows.
    pub(super) async fn run(mut self, parts: Parts, mut finished: Finished) -> Response<Body> {
        let (route, env) = (self.route(), self.conn.env);
        let mut tries = Tries::new(route, env, self.started);
        let mut reason = "no_endpoint";
        // `mesh-source`, made on the first try through the tunnel.
        let mut source_ip: Option<Option<HeaderValue>> = None;
        // The request as it came: copied for each try only when an answer
        // may be retried or mirrored; else moved into the try, and given
        // back by the pool if no connection could be had for it.
        let copied = self.retrying.policy.is_some() || !self.mirrors.is_empty();
        let mut parts = Some(parts);
        // Taken for each try (and put back when copied); None after a try
        // took it and the pool could not give it back.
        while let Some(original) = parts.take() {
            let retried = self.retrying.retried;
            let t0 = env.now();
            let picked = tries.pick(t0).or_else(|| {
                (retried > 0).then(|| {
                    tries.forget_tried();
                    tries.pick(t0)
                })?
            });
            let Some((i, ep)) = picked else { break };
            let tunnelled = crate::proxy::dial::via(ep, route).is_some();
            // The policies, for a try this node hands to the workload itself.
            let table = (!tunnelled).then(|| self.conn.routes.load());
            if let Some(table) = &table {
                match self.authorize(table.guard(), ep, &original) {
                    Ok(logged) => finished.authz = logged,
                    Err(denied) => {
                        // Decided here as the endpoint's node would: never
                        // the endpoint's fault, never tried elsewhere.
                        finished.authz = denied.logged();
                        return finished.failed("denied", self.started, forbidden(self.conn.grpc));
                    }
                }
            }
            let client = match self.resolved.client(i, ep, self.conn) {
                Ok(c) => c,
                Err(e) => {
                    crate::proxy::tries::blame(ep, &e, env);
                    warn!(service = %route.name, error = %e, "request refused; not retried");
                    return finished.failed(e.reason(), self.started, unavailable(self.conn.grpc, e.reason()));
                }
            };
            let b = self.body.as_ref().map_or_else(empty, replay::Replay::body);
            let in_flight = ep.state.start();
            let until = retry::try_deadline(self.retrying.deadline, self.per_try_timeout, t0);
            let mut head = if copied {
                let head = original.clone();
                parts = Some(original);
                head
            } else {
                original
            };
            match (&table, self.conn.source.as_ref()) {
                // Handed to the workload here: who called it, verified.
                (Some(table), Some(caller)) if route.policy.cfg.forward_client_cert => {
                    let server = table.guard().identity_at(ep.state.addr.ip());
                    if let Some(v) = crate::proxy::authz::client_cert_header(server, &caller.identity) {
                        head.headers.insert(crate::proxy::authz::XFCC, v);
                    }
                }
                // The client's address, for the policies of the endpoint's
                // node (believed there only of a workload of this identity).
                (None, _) => {
                    let v =
                        source_ip.get_or_insert_with(|| HeaderValue::from_str(&self.conn.client.ip().to_string()).ok());
                    if let Some(v) = v {
                        head.headers.insert(SOURCE_HEADER, v.clone());
                    }
                }
                _ => {}
            }
            let sent = client.send(Request::from_parts(head, b));
            let outcome = match until {
                Some(at) => tokio::time::timeout_at(at, sent).await.ok(),
                None => Some(sent.await),
            };
            drop(in_flight);
            finished.retries = self.retrying.retried;
            let step = match outcome {
                None => match self.out_of_time(ep, t0) {
                    Ok(step) => step,
                    Err(after) => return finished.failed("timeout", self.started, timed_out(self.conn.grpc, after)),
                },
                Some(Ok(resp)) => match self.answered(ep, resp, t0) {
                    Ok(answer) => return self.finish(i, answer, parts.as_ref(), finished),
                    Err(step) => step,
                },
                Some(Err(Failed { error: e, unsent })) => {
                    let SendError::Connect(c) = &e else {
                        // The endpoint took the request and then failed it.
                        warn!(service = %route.name, endpoint = %ep.state.addr, error = %chain(&e), "upstream request failed");
                        failed_answer(route, ep, env);
                        let r = answer(
                            self.conn.grpc,
                            StatusCode::BAD_GATEWAY,
                            14,
                            "upstream",
                            "the endpoint failed the request",
                        );
                        return finished.failed("upstream", self.started, r);
                    };
                    if parts.is_none() {
                        // Moved into this try: back as it came, but for
                        // what this try added.
                        parts = unsent.map(|r| {
                            let (mut p, _) = (*r).into_parts();
                            p.headers.remove(SOURCE_HEADER);
                            p.headers.remove(crate::proxy::authz::XFCC);
                            p
                        });
                    }
                    reason = c.reason();
                    if self.body.as_ref().is_some_and(|b| !b.replayable()) {
                        // Part of the body went with this try: it cannot go again.
                        crate::proxy::tries::blame(ep, c, env);
                        Step::Stop
                    } else if tries.failed(ep, c, &self.conn.counters).await {
                        Step::Next
                    } else {
                        Step::Stop
                    }
                }
            };
            match step {
                Step::Stop => break,
                Step::Next => {}
                Step::Again(pause) => tokio::time::sleep(pause).await,
            }
        }
        warn!(service = %route.name, reason, "no endpoint could take the request");
        finished.retries = self.retrying.retried;
        finished.failed(reason, self.started, unavailable(self.conn.grpc, reason))
    }

    /// A try ran out of its time (dropping it cancelled it upstream: a
    /// stream reset, or the connection closed): again, or Err with how
    /// long the request had, for its 504.
    fn out_of_time(&mut self, ep: &RouteEndpoint, t0: Instant) -> Result<Step, Duration> {
        let (route, env) = (self.route(), self.conn.env);
        let now = env.now();
        let waited = now - t0;
        ep.state.observe_rtt(waited, now);
        failed_answer(route, ep, env);
        let overall = self.retrying.deadline.is_some_and(|d| now >= d);
        if !overall {
            if let Some(pause) = self.again() {
                return Ok(self.retrying(pause));
            }
        }
        let after = if overall { self.timeout.unwrap_or(waited) } else { waited };
        Err(after)
    }

    /// `guard`'s decision on the request `parts` to `ep`, which this
    /// node hands it to directly: the policy and rule that allowed it (if
    /// one did), or Err with the one that denied it.
    fn authorize(
        &self,
        guard: &crate::proxy::authz::Guard,
        ep: &RouteEndpoint,
        parts: &Parts,
    ) -> Result<crate::proxy::authz::Logged, crate::proxy::authz::Denied> {
        if !guard.enforcing() {
            return Ok(Default::default());
        }
        let source = self.conn.source.as_ref().map(|w| &w.identity);
        let caller = guard.caller(source, Some(self.conn.client.ip()));
        let host = parts.uri.authority().map_or("", |a| a.as_str());
        let req = AuthzRequest { method: parts.method.as_str(), path: parts.uri.path(), host, headers: &parts.headers };
        let route = self.route();
        guard.check(&route.key.service, ep.state.addr, &caller, Some(&req), route.metrics(), self.conn.env)
    }

    /// An answer came: its latency observed; again when the retry policy
    /// names it and a retry is allowed (dropping the answer resets its
    /// stream, or closes its connection if its body was not read), else
    /// the answer to send on, with when it came.
    fn answered(
        &mut self,
        ep: &RouteEndpoint,
        resp: Response<UpstreamBody>,
        t0: Instant,
    ) -> Result<(Response<UpstreamBody>, Instant), Step> {
        let (route, env) = (self.route(), self.conn.env);
        // From the send, or from the connect if this request waited for one.
        let since = resp.extensions().get::<ConnectedAt>().map_or(t0, |c| c.0.max(t0));
        let now = env.now();
        let latency = now - since;
        ep.state.observe_rtt(latency, now);
        route.series().response_latency.observe(latency.as_secs_f64());
        ep.series().latency.observe(latency);
        if self.retrying.policy.is_some_and(|r| retried_answer(r, &resp, self.conn.grpc)) {
            if let Some(pause) = self.again() {
                drop(resp);
                failed_answer(route, ep, env);
                return Err(self.retrying(pause));
            }
        }
        Ok((resp, now))
    }

    /// The answer of endpoint `i` (come at `now`), on its way to the
    /// client: mirrored, its headers as the route rule says, watched to
    /// its end.
    fn finish(
        self,
        i: usize,
        (resp, now): (Response<UpstreamBody>, Instant),
        parts: Option<&Parts>,
        mut finished: Finished,
    ) -> Response<Body> {
        if let Some(parts) = parts {
            mirror::send(self.conn, &self.mirrors, parts, self.body.as_ref());
        }
        let (mut head, body) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        if let Some((rule, b)) = self.routed {
            router::rewrite_response(&mut head.headers, rule, b);
        }
        finished.retries = self.retrying.retried;
        let observed = Observed::new(body, finished.at(i, &head, self.started, now));
        Response::from_parts(head, observed.boxed_unsync())
    }
}
