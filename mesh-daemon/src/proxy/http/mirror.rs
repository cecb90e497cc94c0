//! RequestMirror: a copy of a routed request to another Service, fire and
//! forget. The copy goes once the original's answer began (its body, up
//! to 64 KiB, was kept whole by then; a larger or unfinished one is not
//! copied, and counted). Its answer is read and dropped; its failure never
//! reaches the client; each outcome is counted
//! (`mesh_outbound_events_total{event="mirrored"|"mirror_failed"|"mirror_skipped"}`).

use std::time::Duration;

use hyper::http::request::Parts;
use hyper::Request;

use super::replay::Replay;
use super::Conn;
use crate::model::route::Mirror;

/// How long a copy may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Bodies up to this size are kept for a copy.
pub const MIRROR_BODY: u64 = 64 << 10;

/// Sends a copy of the request (`parts`, `body`) to each of `mirrors`.
pub fn send(conn: &Conn, mirrors: &[&Mirror], parts: &Parts, body: Option<&Replay>) {
    if mirrors.is_empty() {
        return;
    }
    if body.is_some_and(|b| !b.whole()) {
        conn.counters.mirror_skipped.inc_by(mirrors.len() as u64);
        return;
    }
    for m in mirrors {
        let Some(resolved) = conn.backend(&m.port) else {
            conn.counters.mirror_failed.inc();
            continue;
        };
        let route = &resolved.route;
        let Some(i) = route.pick_index(&[], conn.env) else {
            conn.counters.mirror_failed.inc();
            continue;
        };
        let ep = &route.endpoints[i];
        let state = ep.state.clone();
        let Ok(client) = resolved.client(i, ep, conn).cloned() else {
            state.release_probe();
            conn.counters.mirror_failed.inc();
            continue;
        };
        let b = body.map_or_else(super::empty, Replay::body);
        let req = Request::from_parts(parts.clone(), b);
        let counters = conn.counters.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(MIRROR_TIMEOUT, async {
                let resp = client.request(req).await.ok()?;
                http_body_util::BodyExt::collect(resp.into_body()).await.ok()
            })
            .await;
            // The copy decides nothing about the endpoint: a probe it drew is given back.
            state.release_probe();
            match answered {
                Ok(Some(_)) => counters.mirrored.inc(),
                _ => counters.mirror_failed.inc(),
            };
        });
    }
}
