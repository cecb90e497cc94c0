//! The frontend stage of a request: the routes (Gateway API) attached to
//! the service port the client dialled decide which backend Service takes
//! it (see [`super::router`], the pure decision), or answer it here: a
//! redirect, 404, 500. Backend policy (balancing, retries, timeouts) is
//! the next stage's, on the chosen Service's own route.

use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use tokio::time::Instant;

use super::conn::Resolved;
use super::observe::{DecidedBy, Finished};
use super::upstream::Body;
use super::{answer, empty, router, unavailable, Conn};
use crate::model::route::{self as router_types, Backend, Rule};
use crate::proxy::Route;

/// Where a request goes on: the route it takes (the dialled service's
/// own, or the backend's a rule chose), that rule and backendRef (their
/// filters and timeouts apply), and the router and rule index for the log.
pub(super) struct Target<'r> {
    pub resolved: Arc<Resolved>,
    pub routed: Option<(&'r Rule, &'r Backend)>,
    pub by: Option<DecidedBy>,
}

/// What the frontend stage decided.
pub(super) enum Decided<'r> {
    /// Send it on, to this target.
    To(Target<'r>),
    /// The answer to send back.
    Answer(Response<Body>),
}

/// The frontend decision for the request `parts` on `frontend` (the
/// dialled service port's route) with its `router`, if routes are
/// attached: the target, with the request rewritten as the rule says, or
/// the answer to send back.
pub(super) fn target<'r>(
    conn: &Conn,
    frontend: Arc<Resolved>,
    router: Option<&'r Arc<router_types::Router>>,
    parts: &mut Parts,
    started: Instant,
) -> Decided<'r> {
    let Some(shared) = router else {
        return Decided::To(Target { resolved: frontend, routed: None, by: None });
    };
    let head = router::Head { method: &parts.method, uri: &parts.uri, headers: &parts.headers };
    let ns = conn.source.as_ref().map(|w| w.namespace.as_str());
    let decided = router::decide(shared, frontend.route.key.port, ns, &head, conn.env.unit());
    let dialled = &frontend.route;
    match decided {
        router::Decision::Service => Decided::To(Target { resolved: frontend.clone(), routed: None, by: None }),
        router::Decision::Forward { entry, rule, backend: Some(b), prefix } => {
            router::rewrite_request(&mut parts.uri, &mut parts.headers, rule, b, prefix);
            let backend = rule.backends.iter().position(|x| std::ptr::eq(x, b));
            let by = dialled.rule_meter(entry.rule).map(|meter| DecidedBy { meter, backend });
            match conn.backend(&b.port) {
                Some(resolved) => Decided::To(Target { resolved, routed: Some((rule, b)), by }),
                None => Decided::Answer(direct(conn, dialled, parts, (started, by), Direct::BackendGone)),
            }
        }
        router::Decision::Forward { entry, rule, backend: None, .. } => Decided::Answer(direct(
            conn,
            dialled,
            parts,
            (started, dialled.rule_meter(entry.rule).map(|meter| DecidedBy { meter, backend: None })),
            Direct::NoBackend(if rule.total_weight == 0 {
                "the route rule's backends all have weight 0"
            } else {
                "the route rule's backendRef for this request does not resolve (see meshctl get routes)"
            }),
        )),
        router::Decision::NotFound => Decided::Answer(direct(conn, dialled, parts, (started, None), Direct::NotFound)),
        router::Decision::Redirect { entry, status, location } => {
            let by = dialled.rule_meter(entry.rule).map(|meter| DecidedBy { meter, backend: None });
            Decided::Answer(direct(conn, dialled, parts, (started, by), Direct::Redirect(status, location)))
        }
    }
}

/// An answer a route makes instead of a backend.
enum Direct {
    /// No rule matched: 404 (gRPC: UNIMPLEMENTED).
    NotFound,
    /// The rule's backends all weigh 0, or the draw fell on a backendRef
    /// that does not resolve (which of them, said): 500 (gRPC: INTERNAL).
    NoBackend(&'static str),
    /// The backend service left the state since the routes were read.
    BackendGone,
    /// A RequestRedirect: its status and `Location`.
    Redirect(u16, String),
}

/// Answers `parts` as the route said, counted and logged on the route's
/// service (`route`, the one the client dialled), with the rule that
/// decided it (`by`).
fn direct(
    conn: &Conn,
    route: &Arc<Route>,
    parts: &Parts,
    (started, by): (Instant, Option<DecidedBy>),
    d: Direct,
) -> Response<Body> {
    let mut finished = Finished::new(conn, route, &parts.method, &parts.uri);
    finished.by(by);
    let grpc = conn.grpc;
    match d {
        Direct::NotFound => finished.failed(
            "no_route",
            started,
            answer(grpc, StatusCode::NOT_FOUND, 12, "no_route", "no route rule matches the request"),
        ),
        Direct::NoBackend(why) => finished.failed(
            "no_backend",
            started,
            answer(grpc, StatusCode::INTERNAL_SERVER_ERROR, 13, "no_backend", why),
        ),
        Direct::BackendGone => {
            finished.failed("no_backend", started, unavailable(grpc, "the route's backend service is not in the mesh"))
        }
        Direct::Redirect(status, location) => {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    r.headers_mut().insert(header::LOCATION, v);
                    finished.answered("redirect", started, r)
                }
                Err(_) => finished.failed(
                    "bad_redirect",
                    started,
                    answer(
                        grpc,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        13,
                        "bad_redirect",
                        "the redirect location is not a header value",
                    ),
                ),
            }
        }
    }
}
